"""Adapter methods, one module per method. Importing this package registers all of them."""

from mm.adapters import lora
from mm.adapters.base import ADAPTERS, Adapter, NotMergeableError

__all__ = ["ADAPTERS", "Adapter", "NotMergeableError", "lora"]
