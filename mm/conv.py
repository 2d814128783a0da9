"""Convolutions as adaptable layers: the rules conv adapters share (``mm.layer.AdaptedConv`` wraps the layer).

A low-rank adapter on a ``nn.Conv{1,2,3}d`` of weight (out, in/groups, *kernel) follows PEFT's layout, so
export and import are exact: A is a convolution with the layer's own kernel, stride, padding, dilation and
padding mode, in -> r; B is a 1x1 convolution r -> out. A grouped layer (depthwise included) gets a grouped A
as well as a grouped B, r/groups ranks per group, so the update is itself a kernel of the layer's grouped
shape and merges exactly (PEFT 0.21 keeps A dense there, which cannot merge and can outgrow the layer).

An adapter never has more parameters than the layer it adapts (the trap of PEFT issue #2202: a rank-1
LoRA on a 3x3 depthwise convolution is larger than the convolution). ``check_conv_rank`` refuses such a
rank with the largest one that fits; no rank fits a depthwise layer with one filter per channel.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mm.config import AdapterConfig, ConfigError

PLAIN_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FNS: dict[int, Callable[..., torch.Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def is_plain_conv(module: nn.Module) -> bool:
    """A ``nn.Conv1d/2d/3d`` computing torch's own convolution.

    Subclasses that change the computation (timm's ``Conv2dSame`` pads in ``forward``, diffusers'
    ``LoRACompatibleConv`` adds its own update) are left alone: an adapter reusing the layer's geometry would
    not match what the layer computes, and merging would change the output.
    """
    cls = type(module)
    torch_cls = next((c for c in PLAIN_CONVS if issubclass(cls, c)), None)
    return torch_cls is not None and cls.forward is torch_cls.forward and cls._conv_forward is torch_cls._conv_forward


def conv_fn(conv: nn.Module) -> Callable[..., torch.Tensor]:
    """``F.conv1d``, ``F.conv2d`` or ``F.conv3d`` for this layer's number of spatial dimensions."""
    return _CONV_FNS[conv.weight.dim() - 2]


def describe_conv(conv: nn.Module) -> str:
    """'Conv2d(16->32, kernel (3, 3), groups 4)': what error messages say about a layer."""
    groups = f", groups {conv.groups}" if conv.groups > 1 else ""
    return f"{type(conv).__name__}({conv.in_channels}->{conv.out_channels}, kernel {tuple(conv.kernel_size)}{groups})"


def supports_layer_kind(config: AdapterConfig, kind: str) -> bool:
    """Whether ``config``'s method adapts layers of ``kind`` ('linear' or 'conv').

    A method states its kinds in its own config class (``layer_kinds``); subclasses do not inherit conv
    support, because their updates (PiSSA's SVD, DyLoRA's truncation, the mixtures' routers) are written for
    (out, in) matrices. Without a statement a method adapts linear layers only.
    """
    narrowed = getattr(config, "instance_layer_kinds", None)  # an option may narrow them (LoRA's init 'olora')
    return kind in vars(type(config)).get("layer_kinds", ("linear",)) and (narrowed is None or kind in narrowed())


def conv_lora_parameters(conv: nn.Module, r: int) -> int:
    """Parameters of a rank-``r`` A/B pair on ``conv``: A (r, in/groups, *kernel), B (out, r/groups, 1...)."""
    return r * (conv.in_channels // conv.groups) * math.prod(conv.kernel_size) + conv.out_channels * (r // conv.groups)


def largest_fitting_rank(conv: nn.Module) -> int:
    """The largest multiple of ``groups`` whose A/B pair is no larger than the layer's weight (0: none)."""
    # With r = groups * m, the pair holds m * (in * kernel + out) parameters.
    per_group_rank = conv.weight.numel() // (conv.in_channels * math.prod(conv.kernel_size) + conv.out_channels)
    return conv.groups * per_group_rank


def check_conv_rank(layer_name: str, conv: nn.Module, r: int, method: str) -> None:
    """Refuse a rank that does not split over the groups, or whose adapter outgrows the layer."""
    if r % conv.groups:
        raise ConfigError(
            f"{method}: layer {layer_name!r} is a {describe_conv(conv)}: key 'r' must be a multiple of "
            f"{conv.groups} (each group gets r/groups ranks), got {r}; exclude it or pick another r")
    adapter, layer = conv_lora_parameters(conv, r), conv.weight.numel()
    if adapter > layer:
        fit = largest_fitting_rank(conv)
        hint = (f"use r <= {fit} or exclude it" if fit else
                "no rank fits (one filter per channel): exclude it")
        raise ConfigError(
            f"{method}: a rank-{r} adapter on layer {layer_name!r}, a {describe_conv(conv)}, would have "
            f"{adapter} parameters, more than the layer's {layer}; {hint}")
