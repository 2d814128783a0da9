"""DiffoRA (Jiang et al., 2025): a differential adaptation matrix (DAM) chooses which modules get LoRA.

The DAM holds one entry per candidate module: 1 if the module is fine-tuned, 0 if not. Searching the
2^n subsets directly is hopeless, so DiffoRA relaxes each entry to a continuous gate and learns it by
gradient descent next to the adapters (DARTS-style, first-order): every candidate carries a LoRA whose
update is scaled by sigmoid(g_m),

    h = W x + sigmoid(g_m) (alpha / r) B A x,

the LoRA weights take a step on a training batch, the gates a step on a held-out batch (the bi-level
problem, first-order), and all candidates share one super-network, so one search trains every subset's
weights at once (weight sharing instead of training one model per subset). Discretisation then keeps
the top ``ratio`` of modules by gate value. ``select_modules`` runs that search and returns the chosen
module names, to be adapted by LoRA (or any method) afterwards.

The registered adapter ``diffora`` is the gated LoRA of the search phase; its update is a weight delta
(the gate is a scalar), so it merges.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from mm.adapters.base import ADAPTERS, add_matmul_
from mm.adapters.lora import LoRA, LoRAConfig
from mm.config import ConfigError


@ADAPTERS.register("diffora")
@dataclass
class DiffoRAConfig(LoRAConfig):
    """DiffoRA search adapter: LoRA scaled by a learned gate, one entry of the differential adaptation matrix."""

    method: ClassVar[str] = "diffora"

    gate_init: float = field(
        default=0.0, metadata={"help": "Initial gate logit g (sigmoid(0) = 0.5: every module half on)."}
    )

    def validate(self) -> None:
        super().validate()
        if not math.isfinite(self.gate_init):
            raise ConfigError(f"diffora: key 'gate_init' must be finite, got {self.gate_init}")

    def build(self, in_features: int, out_features: int, base_weight: torch.Tensor) -> GatedLoRA:
        dtype = base_weight.dtype if base_weight.is_floating_point() else torch.float32
        return GatedLoRA(self, in_features, out_features, dtype=dtype, device=base_weight.device)


class GatedLoRA(LoRA):
    """LoRA times sigmoid(gate): the relaxed DAM entry of one module."""

    def __init__(self, config: DiffoRAConfig, in_features: int, out_features: int, *, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(config, in_features, out_features, dtype=dtype, device=device)
        self.dam_gate = nn.Parameter(torch.tensor(float(config.gate_init), dtype=dtype, device=device))

    def gate(self) -> torch.Tensor:
        return torch.sigmoid(self.dam_gate)

    def forward(self, x: torch.Tensor, out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if x.dtype != self.lora_A.dtype:
            x = x.to(self.lora_A.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        h = nn.functional.linear(x, self.lora_A) * (self.gate() * self.scaling)
        return add_matmul_(out, h.to(out.dtype), self.lora_B.to(out.dtype))

    def delta(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return super().delta(x, base) * self.gate()

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return super().delta_weight(base) * self.gate()


def _cycle(batches: Iterable[Any]):
    cached = []
    for batch in batches:
        cached.append(batch)
        yield batch
    if not cached:
        raise ValueError("diffora.select_modules: 'batches' is empty; the search needs at least one batch")
    while True:
        yield from cached


def select_modules(
    model: nn.Module,
    candidate_targets: list[str],
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    *,
    val_batches: Iterable[Any] | None = None,
    ratio: float = 0.5,
    steps: int = 100,
    r: int = 8,
    alpha: float = 16.0,
    lr: float = 1e-3,
    gate_lr: float = 5e-2,
    seed: int = 0,
    return_gates: bool = False,
) -> list[str] | tuple[list[str], dict[str, float]]:
    """Search the DAM over the modules ``candidate_targets`` selects; return the chosen module names.

    ``loss_fn(model, batch)`` returns a scalar loss. The LoRA weights step on ``batches`` and the gates on
    ``val_batches`` (default: the same stream, one batch later), alternately, for ``steps`` rounds; then
    the ``ceil(ratio * n)`` modules with the largest gates are kept. The model leaves unchanged: the
    search adapter is removed and every parameter gets its ``requires_grad`` back. With
    ``return_gates`` the final sigmoid gate of every candidate comes back too.
    """
    from mm.wrap import adapted_layers, adapter_names, attach, delete_adapter

    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"diffora.select_modules: 'ratio' must be in (0, 1], got {ratio}")
    name = "diffora_search"
    while name in adapter_names(model):
        name += "_"
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    with torch.random.fork_rng(devices=[]):  # seed the search adapters' init without touching the caller's RNG
        torch.manual_seed(seed)
        attach(model, DiffoRAConfig(targets=list(candidate_targets), r=r, alpha=alpha), name)
    try:
        gated = {layer_name: layer.adapters[name] for layer_name, layer in adapted_layers(model)
                 if name in layer.adapters}
        gates = [a.dam_gate for a in gated.values()]
        weights = [p for a in gated.values() for p in (a.lora_A, a.lora_B)]
        weight_opt = torch.optim.AdamW(weights, lr=lr, weight_decay=0.0)
        gate_opt = torch.optim.Adam(gates, lr=gate_lr)
        train_stream = _cycle(batches)
        val_stream = _cycle(val_batches) if val_batches is not None else train_stream
        model.train()
        for _ in range(steps):
            _step(model, loss_fn, next(train_stream), weight_opt, gate_opt)  # LoRA weights, gates fixed
            _step(model, loss_fn, next(val_stream), gate_opt, weight_opt)  # gates, LoRA weights fixed
        final = {layer_name: float(a.gate().detach()) for layer_name, a in gated.items()}
    finally:
        delete_adapter(model, name)
        for param in model.parameters():
            param.requires_grad_(requires_grad.get(id(param), param.requires_grad))
        model.train(was_training)
    chosen = discretise(final, ratio)
    return (chosen, final) if return_gates else chosen


def _step(model, loss_fn, batch, stepped: torch.optim.Optimizer, held: torch.optim.Optimizer) -> None:
    stepped.zero_grad(set_to_none=True)
    held.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"diffora.select_modules: the loss became {float(loss)} during the search")
    loss.backward()
    stepped.step()
    held.zero_grad(set_to_none=True)


def discretise(gates: dict[str, float], ratio: float) -> list[str]:
    """Keep the ceil(ratio * n) modules with the largest gates, returned in the model's order."""
    keep = max(1, math.ceil(ratio * len(gates)))
    ranked = sorted(gates, key=lambda n: gates[n], reverse=True)[:keep]
    return [n for n in gates if n in ranked]
