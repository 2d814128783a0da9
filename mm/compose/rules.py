"""The element-wise merging rules over stacked task tensors (TIES, DARE, magnitude pruning), as PEFT's
``add_weighted_adapter`` applies them, so that results match it number for number.

Every rule takes ``tensors`` (one per task, same shape) and ``weights`` (one float per task) and returns one
merged tensor. The random rule (DARE) draws its keep-mask with ``torch.bernoulli`` one tensor at a time in
task order, so a generator seeded like PEFT's global RNG gives PEFT's very masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from mm.config import ConfigError

SignMethod = Literal["total", "frequency"]


def _broadcast(weights: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """``weights`` (T,) shaped (T, 1, 1, ...) to scale the stacked (T, ...) task tensors."""
    return weights.reshape(weights.shape + (1,) * (stacked.dim() - 1)).to(stacked)


def magnitude_keep(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """``tensor`` with all but its ``int(density * numel)`` largest-magnitude entries set to zero."""
    if density >= 1:
        return tensor
    keep = int(density * tensor.numel())
    flat_mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    flat_mask[torch.topk(tensor.abs().reshape(-1), k=keep, largest=True).indices] = 1
    return tensor * flat_mask.reshape(tensor.shape)


def random_keep(tensor: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE's drop-and-rescale: keep each entry with probability ``density``, divide survivors by it.

    The rescale keeps the tensor's expected value, which is what lets DARE drop 90% of a delta and keep its
    effect (Yu et al., 2024).
    """
    if density >= 1:
        return tensor
    keep = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * keep / density


def majority_sign_mask(stacked: torch.Tensor, method: SignMethod = "total") -> torch.Tensor:
    """TIES' elected sign per entry (by summed mass, or by vote count), and which task entries agree with it."""
    signs = stacked.sign()
    if method == "total":
        mass = stacked.sum(dim=0)
    elif method == "frequency":
        mass = signs.sum(dim=0)
    else:
        raise ConfigError(f"merge: 'majority_sign_method' must be 'total' or 'frequency', got {method!r}")
    elected = torch.where(mass >= 0, 1.0, -1.0).to(stacked)
    return signs == elected


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """TIES' disjoint merge: per entry, the mean over the tasks that agree with the elected sign."""
    kept = (weighted * agree).sum(dim=0)
    return kept / agree.sum(dim=0).clamp(min=1.0)


def combine(
    rule: str, tensors: Sequence[torch.Tensor], weights: torch.Tensor, density: float = 1.0,
    majority_sign_method: SignMethod = "total", generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Merge same-shaped task tensors by ``rule``: linear, ties, dare_linear, dare_ties or magnitude_prune."""
    if rule in ("ties", "magnitude_prune"):
        tensors = [magnitude_keep(t, density) for t in tensors]
    elif rule in ("dare_linear", "dare_ties"):
        tensors = [random_keep(t, density, generator) for t in tensors]
    elif rule != "linear":
        raise ConfigError(f"merge: unknown rule {rule!r}; known: linear, ties, dare_linear, dare_ties, "
                          "magnitude_prune")
    stacked = torch.stack(list(tensors))
    weighted = stacked * _broadcast(weights, stacked)
    if rule in ("ties", "dare_ties"):
        # The sign is elected on the unweighted (pruned) tensors, as PEFT does, then the weighted ones merge.
        return disjoint_mean(weighted, majority_sign_mask(stacked, majority_sign_method))
    return weighted.sum(dim=0)
