"""Adapter methods, one module per method. Importing this package registers all of them."""

from mm.adapters import (  # noqa: F401  (importing registers them)
    block_lora,
    bone,
    diffora,
    dora,
    dylora,
    eva,
    loldu,
    lora,
    lora_ga,
    lora_sb,
    lora_xs,
    mixlora,
    mm_lora,
    mole,
    mos,
    mtsk,
    nola,
    pissa,
    randlora,
    trainable_tokens,
)
from mm.adapters.base import ADAPTERS, Adapter, NotMergeableError

__all__ = ["ADAPTERS", "Adapter", "NotMergeableError", "lora"]
