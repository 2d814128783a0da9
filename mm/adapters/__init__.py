"""Adapter methods, one module per method. Importing this package registers all of them."""

from mm.adapters import dylora, loldu, lora, lora_sb, lora_xs  # noqa: F401  (importing registers them)
from mm.adapters.base import ADAPTERS, Adapter, NotMergeableError

__all__ = ["ADAPTERS", "Adapter", "NotMergeableError", "lora"]
