"""The opt-in near-linear attention path of ``mm.poly_attention`` for chosen attention layers.

``enable_polynomial_attention(model, layers)`` makes the named attention modules compute
``polynomial_attention`` (forward and its linear-cost backward) instead of exact softmax attention;
``below_threshold(report)`` names the layers ``mm.limits.measure_limits`` found below the threshold,
where the paper's guarantee holds. Every other layer, and every call the path cannot take exactly (a
padding mask, attention weights requested, dropout while training), keeps exact attention.

Two kinds of attention module are supported without editing their libraries:

- transformers models (Llama, GPT-2, ...): a function registered in transformers' ``AttentionInterface``
  (with the masks of the implementation it replaces), chosen per layer by a marker on the module;
- mmtune's ``SplitMultiheadAttention`` (open_clip towers): the module's ``attention`` hook.

transformers is imported only when a transformers model is passed (``mm/`` itself needs only torch).
"""

from __future__ import annotations

import types

import torch
from torch import nn

from mm.config import ConfigError
from mm.mha import SplitMultiheadAttention
from mm.poly_attention import polynomial_attention

IMPLEMENTATION = "mmtune_polynomial"
_MARK = "_mmtune_polynomial"  # (degree, chunk) on a module that takes the path


def below_threshold(report) -> list[str]:
    """Names of the layers a ``LimitsReport`` found below the threshold."""
    return [row.layer for row in report.layers if row.side == "below"]


def _causal_or_none(mask: torch.Tensor | None, q_len: int, k_len: int, causal_module: bool) -> bool | None:
    """True/False: the mask is exactly causal / absent; None: a mask the path cannot take (padding...)."""
    if mask is None:
        return causal_module and q_len == k_len
    if q_len != k_len:
        return None
    keep = mask if mask.dtype == torch.bool else mask == 0
    tril = torch.ones(q_len, k_len, dtype=torch.bool, device=mask.device).tril()
    return True if bool((keep == tril).all()) else None


def _hf_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature: query (B, H, L, d), key/value (B, H_kv, S, d)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    settings = getattr(module, _MARK, None)
    causal = None if settings is None or (dropout and module.training) else _causal_or_none(
        attention_mask, query.shape[-2], key.shape[-2], bool(getattr(module, "is_causal", False)))
    if causal is None:
        fallback = ALL_ATTENTION_FUNCTIONS[getattr(module, "_mmtune_fallback", "sdpa")]
        return fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: each key head serves `groups` heads
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    degree, chunk = settings
    out = polynomial_attention(query, key, value, scaling, degree, causal, chunk)
    return out.transpose(1, 2).contiguous(), None


def _register_transformers(fallback: str) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, _hf_attention)
    # Masks as the replaced implementation builds them, so padding is seen (and sent to the exact path).
    AttentionMaskInterface.register(IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS[fallback])


def _split_attention(module: SplitMultiheadAttention, q, k, v, mask, dropout_p):
    settings = getattr(module, _MARK, None)
    causal = None if settings is None or dropout_p else _causal_or_none(mask, q.shape[-2], k.shape[-2], False)
    if causal is None:
        return SplitMultiheadAttention.attention(module, q, k, v, mask, dropout_p)
    degree, chunk = settings
    return polynomial_attention(q, k, v, None, degree, causal, chunk)


def enable_polynomial_attention(model: nn.Module, layers: list[str], degree: int = 4, chunk: int = 64) -> None:
    """Send the attention of ``layers`` (attention-module names) through ``polynomial_attention``."""
    if degree < 2 or degree % 2:
        raise ConfigError(f"degree: expected an even integer >= 2, got {degree}")
    modules = dict(model.named_modules())
    unknown = [name for name in layers if name not in modules]
    if unknown:
        raise ConfigError(f"{', '.join(unknown)}: not a module of the model")
    for name in layers:
        module = modules[name]
        if isinstance(module, SplitMultiheadAttention):
            module.attention = types.MethodType(_split_attention, module)
        elif getattr(getattr(module, "config", None), "_attn_implementation", None) is None:
            raise ConfigError(f"{name}: expected a transformers attention module or a split "
                              f"nn.MultiheadAttention, got {type(module).__name__}")
        setattr(module, _MARK, (degree, chunk))
    for top in model.modules():  # every transformers model that owns a marked layer dispatches through us
        if not hasattr(top, "set_attn_implementation"):
            continue
        current = top.config._attn_implementation
        if current == IMPLEMENTATION:
            continue
        _register_transformers(current)
        for module in top.modules():
            module._mmtune_fallback = current
        top.set_attn_implementation(IMPLEMENTATION)


def disable_polynomial_attention(model: nn.Module) -> None:
    """Exact attention again everywhere (the transformers implementation the model had before)."""
    for module in model.modules():
        if hasattr(module, _MARK):
            delattr(module, _MARK)
        if isinstance(module, SplitMultiheadAttention) and "attention" in module.__dict__:
            del module.attention
    for top in model.modules():
        if hasattr(top, "set_attn_implementation") and top.config._attn_implementation == IMPLEMENTATION:
            top.set_attn_implementation(getattr(top, "_mmtune_fallback", "sdpa"))
