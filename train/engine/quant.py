"""QLoRA plumbing: a frozen backbone in bitsandbytes 4-bit (nf4/fp4) or 8-bit, adapters on top.

``quantize_linears`` works on any ``nn.Module`` built in full precision (the tiny test models, encoders
from other libraries); ``bnb_config`` is for transformers models loaded from a folder straight into
4/8 bits. Either way the adapters then attach to the quantised layers (``mm.quant`` tells ``mm`` how
to read their weights).
"""

from __future__ import annotations

import torch
from torch import nn

from mm.layer import AdaptedLinear
from mm.quant import is_quantised_linear
from train.engine.config import QuantConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_device() -> torch.device:
    """Where quantised weights live: this process's GPU, else the CPU (bitsandbytes has CPU kernels)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _skipped(name: str, skip: list[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def quantised_copy(linear: nn.Linear, config: QuantConfig, device: torch.device) -> nn.Module:
    """A bitsandbytes layer holding ``linear``'s weight quantised (quantisation happens on ``.to``)."""
    import bitsandbytes as bnb

    weight = linear.weight.data.detach().float().cpu()
    bias = linear.bias
    if config.mode in ("nf4", "fp4"):
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias is not None,
                                  compute_dtype=DTYPES[config.compute_dtype], quant_type=config.mode,
                                  device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=config.mode)
    elif config.mode == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias is not None,
                                    has_fp16_weights=False, threshold=0.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        raise ValueError(f"quant.mode {config.mode!r} is not a quantisation mode (nf4, fp4, int8)")
    if bias is not None:
        layer.bias = nn.Parameter(bias.data.detach().float().cpu(), requires_grad=False)
    return layer.to(device)


def quantize_linears(model: nn.Module, config: QuantConfig, device: torch.device | None = None) -> list[str]:
    """Replace every plain ``nn.Linear`` of ``model`` (except ``config.skip`` suffixes) by its 4/8-bit
    version, in place; returns the replaced names. Already quantised and adapted layers are left alone."""
    device = device or load_device()
    replaced, already = [], 0
    for name, module in list(model.named_modules()):
        already += is_quantised_linear(module)
        if (type(module) is not nn.Linear or not name or _skipped(name, config.skip)
                or isinstance(_parent(model, name), AdaptedLinear)):
            continue
        setattr(_parent(model, name), name.rpartition(".")[2], quantised_copy(module, config, device))
        replaced.append(name)
    if not replaced and not already:  # a model loaded in 4/8 bits already is fine as it is
        raise ValueError(f"quant.mode={config.mode}: {type(model).__name__} has no nn.Linear to quantise "
                         f"(skip={config.skip})")
    return replaced


def _parent(model: nn.Module, name: str) -> nn.Module:
    parent = name.rpartition(".")[0]
    return model.get_submodule(parent) if parent else model


def bnb_config(config: QuantConfig):
    """transformers' ``BitsAndBytesConfig`` for loading a model from a folder straight into 4/8 bits."""
    from transformers import BitsAndBytesConfig

    if config.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=config.skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=config.mode,
                              bnb_4bit_compute_dtype=DTYPES[config.compute_dtype],
                              llm_int8_skip_modules=config.skip)
