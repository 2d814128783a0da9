"""The adapter registry and the small interface every adapter module implements."""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from mm.errors import MMTuneError
from mm.registry import Registry

#: Adapter methods by name -> their config class (each config builds its module).
ADAPTERS: Registry[type] = Registry("adapter method")


class NotMergeableError(MMTuneError, RuntimeError):
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
    #: Whole-FFN mixtures (mm.adapters.moe_ffn): the block's input projections return (..., k, out), one row
    #: per chosen expert, and its output projection folds those rows back (``fold`` runs before the base).
    expands_output: bool = False
    folds_input: bool = False

    def forward(self, x: torch.Tensor, out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return out + self.delta(x, base).to(out.dtype)

    def delta(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """The update this adapter adds to the base output for input ``x``."""
        raise NotImplementedError

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """The update as an (out_features, in_features) weight, for merging (on a conv: the kernel's shape)."""
        raise NotMergeableError(f"{type(self).__name__} has no single weight delta and cannot be merged")

    def release(self, base: nn.Module) -> None:
        """Called when the adapter is deleted: undo what attaching did to ``base`` (e.g. PiSSA's residual)."""


def _fast_path(out: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether the hand-written autograd functions below apply: same dtypes, contiguous ``out``, and none
    of the cases a plain ``autograd.Function`` cannot serve (autocast, ``torch.func`` transforms such as
    the per-sample ``vmap(grad(...))`` of DP training)."""
    return (
        out.is_contiguous()
        and all(t.dtype == out.dtype for t in tensors)
        and not torch.is_autocast_enabled(out.device.type)
        and not torch._C._are_functorch_transforms_active()
    )


def _addmm_into_(ctx, out: torch.Tensor, h2: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """``out + h2 @ weight_t`` inside an autograd.Function's forward, reusing ``out``'s memory if it may.

    Autograd sees the in-place write as ours (``mark_dirty``) rather than as an ``addmm_`` on a reshaped
    view of ``out``; the latter makes it rebuild ``out`` through ``CopySlices``, which clones the full
    (tokens, out_features) gradient twice per layer in backward. If ``out`` is itself a view (``F.linear``
    with a bias on 3-D input returns one), writing into it would bring ``CopySlices`` back, so a fresh
    tensor is cheaper there.
    """
    out2 = out.view(-1, out.shape[-1])
    if out._is_view():
        return torch.addmm(out2, h2, weight_t).view(out.shape)
    out2.addmm_(h2, weight_t)
    ctx.mark_dirty(out)
    return out


class _AddMatmul(torch.autograd.Function):
    """``out + h @ weight.T``; backward hands ``out`` its gradient untouched (no copy)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # h and weight are inputs, so saving them keeps their history: double backward stays correct.
        ctx.save_for_backward(h, weight)
        return _addmm_into_(ctx, out, h.reshape(-1, h.shape[-1]), weight.t())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, weight = ctx.saved_tensors
        grad2 = grad.reshape(-1, grad.shape[-1])
        grad_h = grad2.mm(weight).view(h.shape) if ctx.needs_input_grad[1] else None
        grad_weight = grad2.t().mm(h.reshape(-1, h.shape[-1])) if ctx.needs_input_grad[2] else None
        return (grad if ctx.needs_input_grad[0] else None), grad_h, grad_weight


def add_matmul_(out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``out + h @ weight.T`` as one fused matmul-accumulate, in place when autograd allows it.

    Adding into the base layer's fresh output saves a full-size temporary and a separate add kernel,
    which is most of LoRA's overhead over the frozen base at small ranks. ``out`` may be overwritten:
    use the returned tensor.
    """
    if not _fast_path(out, h, weight):
        return out + torch.nn.functional.linear(h, weight).to(out.dtype)
    if torch.is_grad_enabled() and (out.requires_grad or h.requires_grad or weight.requires_grad):
        return _AddMatmul.apply(out, h, weight)
    out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), weight.t())
    return out


class _AddLowRank(torch.autograd.Function):
    """``out + scaling * (x @ a.T) @ b.T`` as one autograd node (LoRA's whole update).

    Forward saves only ``x`` (which the base layer saves anyway) and the r-wide hidden ``h``; backward
    passes ``out``'s gradient through untouched and computes the three others from one r-wide product
    ``grad @ b``. Against autograd's own graph (mm, mul, addmm) this drops the nodes' bookkeeping and the
    r-wide temporaries of a separate scaling step. Second derivatives are refused (``h`` is an
    intermediate here), which LoRA training never needs.
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                scaling: float) -> torch.Tensor:
        h = x.reshape(-1, x.shape[-1]).mm(a.t())
        if scaling != 1.0:
            h.mul_(scaling)  # scale the r-wide hidden, not the out-wide result: same value, r/out the work
        ctx.save_for_backward(x, h, a, b)
        ctx.scaling = scaling
        return _addmm_into_(ctx, out, h, b.t())

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, h, a, b = ctx.saved_tensors
        needs_out, needs_x, needs_a, needs_b, _ = ctx.needs_input_grad
        grad2 = grad.reshape(-1, grad.shape[-1])
        grad_b = grad2.t().mm(h) if needs_b else None
        grad_x = grad_a = None
        if needs_x or needs_a:
            grad_h = grad2.mm(b)
            if ctx.scaling != 1.0:
                grad_h.mul_(ctx.scaling)
            grad_a = grad_h.t().mm(x.reshape(-1, x.shape[-1])) if needs_a else None
            grad_x = grad_h.mm(a).view(x.shape) if needs_x else None
        return (grad if needs_out else None), grad_x, grad_a, grad_b, None


def add_low_rank_(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  scaling: float) -> torch.Tensor:
    """``out + scaling * (x @ a.T) @ b.T`` (LoRA's update, ``a``: (r, in), ``b``: (out, r)), fused.

    ``out`` may be overwritten: use the returned tensor. Falls back to autograd's own ops whenever the
    fused function does not apply (mixed dtypes, autocast, ``torch.func`` transforms).
    """
    if not _fast_path(out, x, a, b):
        h = torch.nn.functional.linear(x.to(a.dtype), a) * scaling
        return add_matmul_(out, h.to(out.dtype), b.to(out.dtype))
    if torch.is_grad_enabled() and any(t.requires_grad for t in (out, x, a, b)):
        return _AddLowRank.apply(out, x, a, b, scaling)
    h = x.reshape(-1, x.shape[-1]).mm(a.t())
    if scaling != 1.0:
        h.mul_(scaling)
    out.view(-1, out.shape[-1]).addmm_(h, b.t())
    return out


class FactoredLoRA(Adapter):
    """An adapter whose update is ``scaling * B A`` with A, B assembled on each call by ``factors()``
    (NOLA's basis mixtures, MoS's shards). Subclasses set ``scaling`` and ``dropout`` (a module or None)."""

    scaling: float
    dropout: nn.Module | None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of shapes (r, in) and (out, r)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        lora_a, lora_b = self.factors()
        if x.dtype != lora_a.dtype:
            x = x.to(lora_a.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        # Once assembled, B A is LoRA's shape: LoRA's fused node serves it.
        return add_low_rank_(out, x, lora_a, lora_b, self.scaling)

    def delta(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        lora_a, lora_b = self.factors()
        if self.dropout is not None:
            x = self.dropout(x)
        return torch.nn.functional.linear(torch.nn.functional.linear(x, lora_a), lora_b) * self.scaling

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        lora_a, lora_b = self.factors()
        return (lora_b @ lora_a) * self.scaling
