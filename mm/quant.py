"""bitsandbytes-quantised linear layers (``Linear4bit``, ``Linear8bitLt``) seen as linear-like layers.

They subclass ``nn.Linear`` and keep ``in_features``/``out_features``, but their ``weight`` holds packed
integers. Adapters need the float weight (for their dtype, for data-driven inits, for merging): these
helpers dequantise it explicitly. bitsandbytes is imported only when such a layer exists, so ``mm``
itself still depends on torch alone.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

QUANTISED_LINEARS = {"Linear4bit": "4-bit", "Linear8bitLt": "8-bit"}


def quantised_kind(module: nn.Module) -> str | None:
    """'4-bit' or '8-bit' for a bitsandbytes quantised linear layer, else None (no import needed)."""
    for cls in type(module).__mro__:
        if cls.__name__ in QUANTISED_LINEARS and cls.__module__.startswith("bitsandbytes"):
            return QUANTISED_LINEARS[cls.__name__]
    return None


def is_quantised_linear(module: nn.Module) -> bool:
    return quantised_kind(module) is not None


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The float dtype the layer computes in (fp32 when bitsandbytes left it unset)."""
    dtype = getattr(module, "compute_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


@torch.no_grad()
def dequantised_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) float weight of a quantised linear layer: a new tensor, not a view of the storage."""
    kind = quantised_kind(module)
    weight = module.weight
    if kind == "4-bit":
        import bitsandbytes.functional as bnbf

        if getattr(weight, "quant_state", None) is None:
            raise RuntimeError(f"{type(module).__name__}: weight is not quantised yet; move the layer to its "
                               "device first (bitsandbytes quantises on .to(device))")
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # An eval-mode CPU forward repacked the bits for bitsandbytes' CPU kernel. Unpack a copy, as
            # bitsandbytes does before saving (its inverse edits the state in place: not the layer's own).
            data, state = bnbf._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
        dense = bnbf.dequantize_4bit(data, state)
    elif kind == "8-bit":
        if weight.dtype != torch.int8:  # has_fp16_weights=True keeps a float weight
            dense = weight.data
        else:
            scales = getattr(weight, "SCB", None)
            if scales is None:
                scales = getattr(getattr(module, "state", None), "SCB", None)
            if scales is None:
                raise RuntimeError("Linear8bitLt: no row scales (SCB) found; move the layer to its device first")
            dense = weight.data.float() * scales.float().unsqueeze(1) / 127.0
    else:
        raise TypeError(f"{type(module).__name__} is not a bitsandbytes quantised linear layer")
    return dense.reshape(module.out_features, module.in_features).to(compute_dtype(module))


def dequantise_linear(module: nn.Module) -> nn.Linear:
    """A plain ``nn.Linear`` (in the compute dtype) with the quantised layer's dequantised weight and bias."""
    weight = dequantised_weight(module)
    dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                      device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if module.bias is not None:
            dense.bias.copy_(module.bias.to(weight.dtype))
    dense.requires_grad_(False)
    return dense
