"""LoRA-GA (Wang et al., 2024): initialise A, B so LoRA's first step approximates full fine-tuning's.

For a layer with full-weight gradient G (averaged over calibration batches) one SGD step of LoRA with
scale s changes the product by  -lr s^2 (B0 B0^T G + G A0^T A0)  (to first order). With G = U S V^T and
A0 = c V_[:r]^T, B0 = c U_[r:2r] (the paper's choice, ``direction="ArB2r"``), that is -lr s^2 c^2 times
the best rank-2r approximation of G, the closest a rank-r adapter's first step can get to -lr G.

Scaling (``scale``): "stable" multiplies both factors by c = d_out^(1/4) / sqrt(gamma) (the paper's
Theorem 3.4, keeping the output's scale independent of the width; the authors' code does the same);
"unit" keeps the orthonormal factors; "gd" divides both by s. The base is corrected by W -= s B0 A0 so
the model's output is unchanged at init (see ``ResidualLoRA`` in pissa.py for where that residual lives).

Use:  ``mm.attach(model, LoRAGAConfig(targets=...))`` then
``mm.adapters.lora_ga.initialize(model, batches, loss_fn, name="default")`` with ``loss_fn(model, batch)``
returning the training loss of one batch. Running the model before that raises an error saying so.

HF PEFT's LoRA-GA differs in the "stable" scale: it multiplies B0 by the gradient's singular values and
scales B0 alone, so its B0 A0 has another magnitude; the subspaces are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from mm.adapters.base import ADAPTERS
from mm.adapters.lora import LoRAConfig, _param_dtype
from mm.adapters.pissa import Residual, ResidualLoRA, check_float_weight, top_singular
from mm.config import ConfigError
from mm.layer import AdaptedLinear, is_conv1d, weight_out_in
from mm.wrap import adapted_layers, adapter_names

NEEDS = ("calibration data: call mm.adapters.lora_ga.initialize(model, batches, loss_fn, name=<adapter>) "
         "with an iterable of training batches and loss_fn(model, batch) -> loss before running the model")


@ADAPTERS.register("lora_ga")
@dataclass
class LoRAGAConfig(LoRAConfig):
    """LoRA-GA: A, B from the SVD of the full-weight gradient on calibration batches."""

    method: ClassVar[str] = "lora_ga"

    direction: Literal["ArB2r", "A2rBr", "ArBr"] = field(
        default="ArB2r",
        metadata={"help": "Which gradient singular directions seed A and B: 'ArB2r' (A: 1..r, B: r+1..2r, the "
                  "paper's), 'A2rBr' (swapped) or 'ArBr' (A odd, B even indices)."},
    )
    scale: Literal["stable", "unit", "gd"] = field(
        default="stable", metadata={"help": "'stable' (x d_out^(1/4)/sqrt(gamma)), 'unit' or 'gd' (/ scaling)."}
    )
    stable_gamma: float = field(default=16.0, metadata={"help": "gamma of the stable scale."})
    svd: Literal["exact", "fast"] = field(
        default="exact", metadata={"help": "SVD of the gradient: 'exact' or 'fast' (seeded randomized)."}
    )
    niter: int = field(default=4, metadata={"help": "Power iterations of the fast SVD."})
    seed: int = field(default=0, metadata={"help": "Seed of the fast SVD."})
    residual: Residual = field(
        default="base",
        metadata={"help": "Where W - s B0 A0 lives: 'base' (the paper's base-weight correction) or 'adapter'."},
    )

    def validate(self) -> None:
        super().validate()
        allowed = {"direction": ("ArB2r", "A2rBr", "ArBr"), "scale": ("stable", "unit", "gd"),
                   "svd": ("exact", "fast"), "residual": ("base", "adapter")}
        for key, values in allowed.items():
            if getattr(self, key) not in values:
                raise ConfigError(f"{self.method}: key {key!r} must be one of {values}, got {getattr(self, key)!r}")
        if self.stable_gamma <= 0:
            raise ConfigError(f"{self.method}: key 'stable_gamma' must be > 0, got {self.stable_gamma}")
        if self.init != "kaiming":
            raise ConfigError(f"{self.method}: key 'init' does not apply (A and B come from the gradient)")

    def build_for(self, layer_name: str, in_features: int, out_features: int, base_weight: torch.Tensor):
        check_float_weight(f"{self.method} at {layer_name}", base_weight)
        if 2 * self.r > min(in_features, out_features):
            raise ConfigError(
                f"{self.method}: key 'r'={self.r} needs 2r <= min(in, out), but {layer_name} is "
                f"{out_features}x{in_features}"
            )
        return ResidualLoRA(
            self, in_features, out_features, residual=self.residual, needs=NEEDS,
            dtype=_param_dtype(base_weight), device=base_weight.device,
        )

    def build(self, in_features: int, out_features: int, base_weight: torch.Tensor) -> ResidualLoRA:
        return self.build_for("layer", in_features, out_features, base_weight)


def factors_from_gradient(grad: torch.Tensor, config: LoRAGAConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) of shapes (r, in), (out, r) from a layer's (out, in) gradient, as the paper sets them."""
    r = config.r
    u, _, vh = top_singular(grad, 2 * r, svd=config.svd, niter=config.niter, seed=config.seed)
    if config.direction == "ArB2r":
        a_idx, b_idx = slice(0, r), slice(r, 2 * r)
    elif config.direction == "A2rBr":
        a_idx, b_idx = slice(r, 2 * r), slice(0, r)
    else:  # ArBr: B takes the even singular directions, A the odd ones
        a_idx, b_idx = slice(1, 2 * r, 2), slice(0, 2 * r, 2)
    init_A, init_B = vh[a_idx].clone(), u[:, b_idx].clone()
    if config.scale == "stable":
        factor = grad.shape[0] ** 0.25 / config.stable_gamma**0.5
        init_A, init_B = init_A * factor, init_B * factor
    elif config.scale == "gd":
        init_A, init_B = init_A / config.scaling, init_B / config.scaling
    return init_A, init_B


def _layers_to_initialise(model: nn.Module, name: str) -> list[tuple[str, AdaptedLinear, ResidualLoRA]]:
    if name not in adapter_names(model):
        raise KeyError(f"model has no adapter {name!r}; it has {adapter_names(model)}")
    found = []
    for layer_name, layer in adapted_layers(model):
        module = layer.adapters[name] if name in layer.adapters else None
        if module is not None:
            if not isinstance(getattr(module, "config", None), LoRAGAConfig):
                raise TypeError(f"adapter {name!r} at {layer_name} is not a lora_ga adapter")
            found.append((layer_name, layer, module))
    return found


def full_weight_gradients(
    model: nn.Module, weights: dict[str, torch.Tensor], batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Mean over ``batches`` of d loss / d weight for each named weight parameter; all flags restored."""
    flags = {id(p): p.requires_grad for p in model.parameters()}
    old_grads = {id(w): w.grad for w in weights.values()}
    for param in model.parameters():
        param.requires_grad_(False)
    sums = {key: torch.zeros_like(w, dtype=torch.float32) for key, w in weights.items()}
    count = 0
    try:
        for w in weights.values():
            w.requires_grad_(True)
            w.grad = None
        for batch in batches:
            loss = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise TypeError(f"lora_ga: loss_fn must return a scalar tensor, got {type(loss).__name__}")
            grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
            for key, grad in zip(weights, grads, strict=True):
                if grad is not None:
                    sums[key] += grad.float()
            count += 1
    finally:
        for param in model.parameters():
            param.requires_grad_(flags[id(param)])
        for w in weights.values():
            w.grad = old_grads[id(w)]
    if count == 0:
        raise ValueError(f"lora_ga: no calibration batches; it needs {NEEDS.partition(': ')[2]}")
    return {key: total / count for key, total in sums.items()}


def initialize(
    model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    name: str = "default",
) -> dict[str, torch.Tensor]:
    """Initialise LoRA-GA adapter ``name`` from the gradient of ``loss_fn`` averaged over ``batches``.

    The gradient is taken with respect to each adapted layer's full base weight, with this adapter adding
    nothing (other active adapters take part as they are). Returns the per-layer gradients (out, in).
    """
    layers = _layers_to_initialise(model, name)
    weights = {layer_name: layer.base.weight for layer_name, layer, _ in layers}
    for _, layer, module in layers:
        module.release(layer.base)  # re-initialising: the gradient is taken at the original W
        module.ready.fill_(False)
        module.calibrating = True
    try:
        grads = full_weight_gradients(model, weights, batches, loss_fn)
    finally:
        for _, _, module in layers:
            module.calibrating = False
    out_in = {}
    for layer_name, layer, module in layers:
        grad = grads[layer_name]
        grad = grad.T if is_conv1d(layer.base) else grad  # Conv1D stores its weight (in, out)
        init_A, init_B = factors_from_gradient(grad, module.config)
        module.initialise(init_A, init_B, weight_out_in(layer.base))
        out_in[layer_name] = grad
    return out_in
