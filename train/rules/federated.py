"""Federated fine-tuning with FFA-LoRA (Sun et al., 2024), optionally with DP-SGD on every client.

FFA-LoRA is LoRA with A frozen at its random init (``mm.LoRAConfig(freeze_a=True)``): clients train only B
and the server averages what trains. Every client holds the same A, so the mean of the clients' updates is
mean_i(B_i A) = (mean_i B_i) A: averaging B is exact. With plain LoRA, averaging A and B separately gives
mean(B_i) mean(A_i), which is not the mean of the clients' B_i A_i (the discordance the paper names).

``federated_average`` simulates the protocol on one machine: each round every client starts from the
global trainable state, takes ``local_steps`` optimizer steps on its own batches, and the server averages
the clients' trainable tensors weighted by their sample counts (FedAvg). Everything that trains is
averaged (with FFA-LoRA: the B matrices, plus e.g. a classifier head if one trains).

Privacy (the paper's DP setting) is DP-SGD (Abadi et al., 2016) per local step: per-sample gradients of
all trainable parameters, each clipped to L2 norm ``clip_norm`` as one vector, summed, plus Gaussian noise
with std ``noise_multiplier * clip_norm``, divided by the batch size. Per-sample gradients come from
``torch.func`` (``vmap`` over ``grad`` of a functional call), or from a plain loop over samples. Privacy
accounting (epsilon for a given sigma, sampling rate and step count) is not computed here.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

Batch = Any  # a tensor, or a tuple / list / dict of tensors whose first dimension indexes samples
LossFn = Callable[[nn.Module, Batch], torch.Tensor]  # (model, batch) -> mean loss over the batch


@dataclass
class DPConfig:
    """DP-SGD settings: per-sample clipping norm C and noise multiplier sigma (noise std = sigma * C)."""

    clip_norm: float
    noise_multiplier: float
    per_sample: Literal["vmap", "loop"] = "vmap"

    def __post_init__(self) -> None:
        if not self.clip_norm > 0:
            raise ValueError(f"DPConfig: clip_norm must be > 0 (math.inf: no clipping), got {self.clip_norm}")
        if self.noise_multiplier < 0:
            raise ValueError(f"DPConfig: noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.noise_multiplier > 0 and math.isinf(self.clip_norm):
            raise ValueError("DPConfig: noise needs a finite clip_norm (its std is noise_multiplier * clip_norm)")
        if self.per_sample not in ("vmap", "loop"):
            raise ValueError(f"DPConfig: per_sample must be 'vmap' or 'loop', got {self.per_sample!r}")


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters; attach an adapter first")
    return params


def map_batch(fn: Callable[[torch.Tensor], torch.Tensor], batch: Batch) -> Batch:
    """Apply ``fn`` to every tensor of a (nested) tuple / list / dict batch; other leaves pass through."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {key: map_batch(fn, value) for key, value in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(map_batch(fn, value) for value in batch)
    return batch


def batch_size(batch: Batch) -> int:
    sizes: list[int] = []
    map_batch(lambda t: sizes.append(int(t.shape[0])) or t, batch)
    if not sizes:
        raise ValueError(f"a batch must hold tensors (samples along dim 0), got {type(batch).__name__}")
    return sizes[0]


class _LossOf(nn.Module):
    """``loss_fn(model, batch)`` as a module, so ``functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def per_sample_gradients(
    model: nn.Module, loss_fn: LossFn, batch: Batch, how: Literal["vmap", "loop"] = "vmap",
) -> dict[str, torch.Tensor]:
    """Gradient of each sample's loss w.r.t. every trainable parameter: {name: (n, *param.shape)}."""
    params = trainable_parameters(model)
    if how == "loop":
        names, tensors = list(params), list(params.values())
        rows = []
        for i in range(batch_size(batch)):
            sample = map_batch(lambda t, i=i: t[i : i + 1], batch)
            rows.append(torch.autograd.grad(loss_fn(model, sample), tensors, allow_unused=True))
        return {
            name: torch.stack([g if g is not None else torch.zeros_like(p) for g in per_param])
            for name, p, per_param in zip(names, tensors, zip(*rows, strict=True), strict=True)
        }
    from torch.func import functional_call, grad, vmap

    wrapper = _LossOf(model, loss_fn)
    detached = {f"model.{name}": p.detach() for name, p in params.items()}

    def sample_loss(weights: dict[str, torch.Tensor], sample: Batch) -> torch.Tensor:
        one = map_batch(lambda t: t.unsqueeze(0), sample)
        return functional_call(wrapper, weights, (one,))

    with warnings.catch_warnings():
        # Ops without a batching rule (fused addmm_, CPU flash attention) fall back to a loop: correct, slower.
        warnings.filterwarnings("ignore", message="There is a performance drop")
        grads = vmap(grad(sample_loss), in_dims=(None, 0), randomness="different")(detached, batch)
    return {name[len("model."):]: g for name, g in grads.items()}


def privatize(
    per_sample: dict[str, torch.Tensor], dp: DPConfig, generator: torch.Generator | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """DP-SGD's gradient from per-sample gradients: clip each sample to norm C, sum, add noise, average.

    Returns the gradients and the per-sample norms after clipping (each <= C).
    """
    squares = [g.flatten(1).pow(2).sum(dim=1) for g in per_sample.values()]
    norms = torch.stack(squares).sum(dim=0).sqrt()
    factors = (dp.clip_norm / (norms + 1e-12)).clamp(max=1.0)
    n = norms.shape[0]
    out = {}
    for name, g in per_sample.items():
        total = (g * factors.view(-1, *([1] * (g.dim() - 1))).to(g.dtype)).sum(dim=0)
        if dp.noise_multiplier > 0:
            noise = torch.randn(total.shape, generator=generator, dtype=total.dtype, device="cpu")
            total = total + noise.to(total.device) * (dp.noise_multiplier * dp.clip_norm)
        out[name] = total / n
    return out, norms * factors


def dp_sgd_step(
    model: nn.Module, loss_fn: LossFn, batch: Batch, optimizer: torch.optim.Optimizer, dp: DPConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One private optimizer step on ``batch``; returns the per-sample gradient norms after clipping."""
    grads, clipped_norms = privatize(per_sample_gradients(model, loss_fn, batch, dp.per_sample), dp, generator)
    params = trainable_parameters(model)
    for name, g in grads.items():
        params[name].grad = g.to(params[name].dtype)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return clipped_norms


def average_states(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Weighted mean of several {name: tensor} states (weights are normalised to sum to one)."""
    total = float(sum(weights))
    if not states or total <= 0:
        raise ValueError("averaging needs at least one state and positive weights")
    return {
        name: sum((w / total) * state[name] for w, state in zip(weights, states, strict=True))
        for name in states[0]
    }


@dataclass
class FederatedResult:
    global_state: dict[str, torch.Tensor]  # the averaged trainable tensors after the last round
    client_states: list[dict[str, torch.Tensor]]  # each client's trainable tensors at the end of the last round
    losses: list[list[float]] = field(default_factory=list)  # [round][client]: mean local training loss


def _local_training(
    model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn, *, steps: int, lr: float,
    dp: DPConfig | None, generator: torch.Generator,
) -> float:
    params = list(trainable_parameters(model).values())
    optimizer = torch.optim.SGD(params, lr=lr)
    losses = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        if dp is None:
            loss = loss_fn(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        else:
            with torch.no_grad():
                loss = loss_fn(model, batch)
            dp_sgd_step(model, loss_fn, batch, optimizer, dp, generator)
        losses.append(float(loss.detach()))
    optimizer.zero_grad(set_to_none=True)
    return sum(losses) / len(losses)


def federated_average(
    model: nn.Module, clients: Sequence[Sequence[Batch]], loss_fn: LossFn, *, rounds: int, local_steps: int,
    lr: float, dp: DPConfig | None = None, seed: int = 0,
) -> FederatedResult:
    """Simulate FedAvg over ``clients`` (each a list of batches); ``model`` ends holding the global state."""
    if not clients or any(len(c) == 0 for c in clients):
        raise ValueError(f"federated_average needs clients with at least one batch each; got sizes "
                         f"{[len(c) for c in clients]}")
    if rounds < 1 or local_steps < 1:
        raise ValueError(f"rounds and local_steps must be >= 1, got {rounds} and {local_steps}")
    params = trainable_parameters(model)
    generator = torch.Generator().manual_seed(seed)
    weights = [float(sum(batch_size(b) for b in batches)) for batches in clients]
    global_state = {name: p.detach().clone() for name, p in params.items()}
    result = FederatedResult(global_state, [])
    for _ in range(rounds):
        client_states, round_losses = [], []
        for batches in clients:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(global_state[name])
            round_losses.append(_local_training(model, batches, loss_fn, steps=local_steps, lr=lr, dp=dp,
                                                generator=generator))
            client_states.append({name: p.detach().clone() for name, p in params.items()})
        global_state = average_states(client_states, weights)
        result.losses.append(round_losses)
        result.client_states = client_states
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(global_state[name])
    result.global_state = global_state
    return result
