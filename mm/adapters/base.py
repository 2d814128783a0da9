"""The adapter registry and the small interface every adapter module implements."""

from __future__ import annotations

import torch
from torch import nn

from mm.registry import Registry

#: Adapter methods by name -> their config class (each config builds its module).
ADAPTERS: Registry[type] = Registry("adapter method")


class NotMergeableError(RuntimeError):
    """The adapter's update is not a fixed weight delta (e.g. a routed mixture), so it cannot be merged."""


class Adapter(nn.Module):
    """One adapter on one linear layer.

    ``AdaptedLinear`` calls ``forward(x, out, base)`` with the layer input, the base output and the frozen
    base module, and uses what it returns, so an adapter may fuse its addition into ``out`` (LoRA does,
    with one ``addmm_``). ``base`` is there for methods whose update depends on the base weight (Bone);
    ``mm.layer.weight_out_in(base)`` gives that weight as (out, in) whatever the layer type.
    """

    #: False for adapters whose update depends on the input beyond a fixed matrix (routed mixtures).
    mergeable: bool = True

    def forward(self, x: torch.Tensor, out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return out + self.delta(x, base).to(out.dtype)

    def delta(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """The update this adapter adds to the base output for input ``x``."""
        raise NotImplementedError

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """The update as an (out_features, in_features) weight, for merging."""
        raise NotMergeableError(f"{type(self).__name__} has no single weight delta and cannot be merged")

    def release(self, base: nn.Module) -> None:
        """Called when the adapter is deleted: undo what attaching did to ``base`` (e.g. PiSSA's residual)."""


def add_matmul_(out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``out + h @ weight.T`` as one fused matmul-accumulate, in place when autograd allows it.

    Adding into the base layer's fresh output saves a full-size temporary and a separate add kernel,
    which is most of LoRA's overhead over the frozen base at small ranks.
    """
    if out.is_contiguous() and out.dtype == h.dtype:
        out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), weight.t())
        return out
    return out + torch.nn.functional.linear(h, weight).to(out.dtype)
