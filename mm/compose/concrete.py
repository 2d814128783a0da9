"""Concrete subspace merging (Tang et al., 2023, "Concrete Subspace Learning based Interference Elimination
for Multi-task Model Fusion"): learn ONE mask shared by all task vectors, so that they are merged inside a
common subspace where they interfere less.

Task vectors tau_t (one per task, per weight tensor) merge as ``theta = theta_0 + sum_t lambda_t (m * tau_t)``.
The mask m is a Concrete (relaxed Bernoulli) sample ``sigmoid((logits + log u - log(1 - u)) / temperature)``
with u ~ U(0, 1), divided by its mean per tensor (the public code's rescale, which keeps the task vectors'
overall size). Bi-level: the outer level learns the mask logits by Adam on the merged model's objective
(entropy of its predictions on unlabeled inputs, as in the paper, or a loss on a small labelled validation
set); the inner level merges: task arithmetic (lambda fixed) or AdaMerging (lambda per task, per tensor
when layer-wise, learned on the same objective). As in the public code the inner level is first order: each
outer step resets lambda, takes one inner step on it with the mask detached, and the mask steps with that
lambda held fixed; with AdaMerging a final phase then learns lambda under the final mask.

Evaluation mask: ``continuous`` = the noise-free relaxation sigmoid(logits / temperature) (the public code
draws one more noisy sample there; we keep the result deterministic), ``discrete`` = logits > 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from mm.compose.adapters import MergeError

#: ``loss_fn(model, batch, task_index) -> scalar``: the objective of the merged model on task ``task_index``.
LossFn = Callable[[nn.Module, Any, int], torch.Tensor]


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the softmax rows of ``logits`` (N, classes): the paper's unlabeled objective."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1).mean()


@dataclass
class ConcreteConfig:
    """Settings of Concrete subspace merging (defaults: the public code's, but steps and lr for small runs)."""

    inner: Literal["task_arithmetic", "adamerging"] = "task_arithmetic"
    scaling: float = 0.3  # task arithmetic's lambda, and AdaMerging's initial lambda
    temperature: float = 0.5
    initial_logits: float = 0.0
    mask_lr: float = 1e-2
    steps: int = 100
    layer_wise: bool = True  # AdaMerging: one lambda per task and weight tensor (else per task)
    inner_lr: float = 1e-2  # the inner level's one step on lambda
    adamerging_lr: float = 1e-2
    adamerging_steps: int = 50
    eval_mask: Literal["continuous", "discrete"] = "continuous"
    seed: int = 0

    def __post_init__(self) -> None:
        choices = {"inner": ("task_arithmetic", "adamerging"), "eval_mask": ("continuous", "discrete")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise MergeError(f"concrete: key {key!r} must be one of {allowed}, got {getattr(self, key)!r}")
        for key in ("temperature", "mask_lr", "inner_lr", "adamerging_lr"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise MergeError(f"concrete: key {key!r} must be a positive number, got {value!r}")
        for key in ("scaling", "initial_logits"):
            if not math.isfinite(float(getattr(self, key))):
                raise MergeError(f"concrete: key {key!r} must be finite, got {getattr(self, key)!r}")
        for key in ("steps", "adamerging_steps", "seed"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise MergeError(f"concrete: key {key!r} must be an integer >= 0, got {value!r}")


@dataclass
class ConcreteResult:
    """The learned mask (rescaled, per weight tensor), the lambdas (tasks x tensors), and the merged deltas."""

    mask: dict[str, torch.Tensor]
    weights: torch.Tensor
    deltas: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)

    @property
    def kept(self) -> float:
        """Share of task-vector entries the mask keeps (mask above half its mean)."""
        total = sum(m.numel() for m in self.mask.values())
        return sum(int((m > 0.5).sum()) for m in self.mask.values()) / max(total, 1)


class _Objective(nn.Module):
    """Runs ``loss_fn`` on the model, so ``functional_call`` can swap the model's weights for merged ones."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: Any, task: int) -> torch.Tensor:
        return self.loss_fn(self.model, batch, task)


def _sample_mask(logits: dict[str, torch.Tensor], temperature: float, generator: torch.Generator | None,
                 kind: str = "sample") -> dict[str, torch.Tensor]:
    mask = {}
    for key, logit in logits.items():
        if kind == "discrete":
            m = (logit > 0).to(logit.dtype)
        elif kind == "continuous":
            m = torch.sigmoid(logit / temperature)
        else:
            u = torch.rand(logit.shape, generator=generator).to(logit).clamp(1e-6, 1 - 1e-6)
            m = torch.sigmoid((logit + torch.log(u) - torch.log1p(-u)) / temperature)
        mask[key] = m / m.mean().clamp(min=1e-12)
    return mask


class ConcreteMerger:
    """Merged weights ``base + sum_t lambda_t (mask * tau_t)`` over named weight tensors of ``model``."""

    def __init__(self, model: nn.Module, vectors: dict[str, torch.Tensor], loss_fn: LossFn,
                 batches: Sequence[Sequence[Any]], config: ConcreteConfig,
                 linked: Mapping[str, Sequence[str]] | None = None) -> None:
        """``linked``: weight key -> other weights of ``model`` that take the same merged value (copies of the
        base inside ``model``, e.g. one per task, so every task's objective sees the one merged encoder)."""
        params = dict(model.named_parameters())
        tasks = {v.shape[0] for v in vectors.values()}
        if len(tasks) != 1 or not vectors:
            raise MergeError(f"concrete: task vectors need one stacked (tasks, ...) tensor per weight; got {tasks}")
        self.tasks = tasks.pop()
        if len(batches) != self.tasks:
            raise MergeError(f"concrete: {len(batches)} batch list(s) for {self.tasks} task(s); give one per task")
        for t, task_batches in enumerate(batches):
            if len(task_batches) == 0:
                raise MergeError(f"concrete: task {t} has no batches for the merging objective")
        for key, tau in vectors.items():
            if key not in params or params[key].shape != tau.shape[1:]:
                have = tuple(params[key].shape) if key in params else "no such weight"
                raise MergeError(f"concrete: task vector {key!r} has shape {tuple(tau.shape[1:])}; model: {have}")
        self.linked = {key: list((linked or {}).get(key, ())) for key in vectors}
        for key, others in self.linked.items():
            for other in others:
                if other not in params or not torch.equal(params[other].detach(), params[key].detach()):
                    raise MergeError(f"concrete: weight {other!r} is linked to {key!r} but is not the same base "
                                     "weight (a different base model?)")
        self.model, self.vectors, self.batches, self.config = model, vectors, batches, config
        self.base = {key: params[key].detach() for key in vectors}
        self.objective = _Objective(model, loss_fn)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.logits = {key: torch.full_like(self.base[key], config.initial_logits, dtype=torch.float32,
                                            requires_grad=True) for key in vectors}
        columns = len(vectors) if config.layer_wise and config.inner == "adamerging" else 1
        self.initial_weights = torch.full((self.tasks, columns), float(config.scaling))

    def merged_deltas(self, mask: dict[str, torch.Tensor], weights: torch.Tensor) -> dict[str, torch.Tensor]:
        deltas = {}
        for i, (key, tau) in enumerate(self.vectors.items()):
            lam = weights[:, i if weights.shape[1] > 1 else 0].to(tau)
            deltas[key] = (lam.reshape(-1, *[1] * (tau.dim() - 1)) * tau).sum(0) * mask[key].to(tau)
        return deltas

    def loss(self, mask: dict[str, torch.Tensor], weights: torch.Tensor, step: int) -> torch.Tensor:
        """Sum over tasks of the objective on each task's next batch, with the merged weights in place."""
        merged = {}
        for key, delta in self.merged_deltas(mask, weights).items():
            value = self.base[key] + delta
            merged.update({f"model.{name}": value for name in (key, *self.linked[key])})
        total = torch.zeros(())
        for task, task_batches in enumerate(self.batches):
            batch = task_batches[step % len(task_batches)]
            total = total + torch.func.functional_call(self.objective, merged, (batch, task))
        return total

    def _inner_step(self, mask: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        """The inner level: task arithmetic keeps lambda; AdaMerging takes one gradient step from lambda_0."""
        if self.config.inner == "task_arithmetic":
            return self.initial_weights
        weights = self.initial_weights.clone().requires_grad_(True)
        detached = {k: m.detach() for k, m in mask.items()}
        (grad,) = torch.autograd.grad(self.loss(detached, weights, step), weights)
        return (weights - self.config.inner_lr * grad).detach()

    def learn_mask(self) -> list[float]:
        optimizer = torch.optim.Adam(list(self.logits.values()), lr=self.config.mask_lr)
        losses = []
        for step in range(self.config.steps):
            mask = _sample_mask(self.logits, self.config.temperature, self.generator)
            weights = self._inner_step(mask, step)
            loss = self.loss(mask, weights, step)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        return losses

    def learn_weights(self, mask: dict[str, torch.Tensor], losses: list[float]) -> torch.Tensor:
        """AdaMerging under a fixed mask (Adam on lambda); task arithmetic keeps lambda_0."""
        weights = self.initial_weights.clone().requires_grad_(self.config.inner == "adamerging")
        if self.config.inner != "adamerging":
            return weights.detach()
        optimizer = torch.optim.Adam([weights], lr=self.config.adamerging_lr)
        for step in range(self.config.adamerging_steps):
            loss = self.loss(mask, weights, self.config.steps + step)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        return weights.detach()

    def run(self) -> ConcreteResult:
        was_training = self.model.training
        self.model.eval()  # dropout off: the objective should see the merged weights, not noise
        try:
            losses = self.learn_mask()
            with torch.no_grad():
                mask = _sample_mask(self.logits, self.config.temperature, None, self.config.eval_mask)
            weights = self.learn_weights(mask, losses)
            with torch.no_grad():
                deltas = self.merged_deltas(mask, weights)
        finally:
            self.model.train(was_training)
        return ConcreteResult(mask=mask, weights=weights, deltas=deltas, losses=losses)
