"""LoRA-SB (Ponkshe, Singhal et al., 2024): LoRA-XS's architecture, initialised from the first full FT step.

The update is ``s · B R A`` with B (out x r) and A (r x in) frozen and only R (r x r) trained, as in LoRA-XS.
The initialisation approximates the first step of full fine-tuning on calibration data:

    G      = sum of dL/dW over the calibration batches (W: the frozen base weight, (out, in))
    dW_1   = -lr · sign(G)    (update='adam': Adam's first step is lr · m/sqrt(v) = lr · sign(g))
           = -lr · G / n      (update='sgd')
    U S V^T = SVD(dW_1);  B = U_r,  A = V_r^T,  R = S_r / s

so ``s · B R A`` is the best rank-r approximation of dW_1 (Eckart-Young) and the model starts one
approximate full fine-tuning step away from the base (the paper adds the update; it does not subtract it
from W). With B and A orthonormal, a gradient step on R moves W by ``s^2 · B B^T (-lr G) A^T A``: the full
gradient projected onto the subspace the initialisation chose, which is the paper's argument for why this
architecture can simulate full fine-tuning. The paper fixes s = 1 (alpha = r, our default for r = 8).

Because B and A come from data they are stored in checkpoints. An adapter that has not been initialised
refuses to run: call ``initialize(model, batches, loss_fn, name=...)`` after ``mm.attach``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from mm.adapters.base import ADAPTERS
from mm.adapters.lora_xs import LoRAXS, check_rank, param_dtype
from mm.config import AdapterConfig, ConfigError

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@ADAPTERS.register("lora_sb")
@dataclass
class LoRASBConfig(AdapterConfig):
    """LoRA-SB: LoRA-XS's r x r core, initialised from an approximated first full fine-tuning step."""

    method: ClassVar[str] = "lora_sb"

    update: Literal["adam", "sgd"] = field(
        default="adam",
        metadata={"help": "Which optimizer's first full-FT step to approximate: 'adam' (-lr * sign of the "
                  "summed gradient, as the paper) or 'sgd' (-lr * mean gradient)."},
    )
    init_lr: float = field(
        default=1e-3,
        metadata={"help": "Learning rate of the approximated first step (the paper: the first warmup step's "
                  "rate). It sets the size of R at init, not the subspace."},
    )

    def validate(self) -> None:
        super().validate()
        if self.update not in ("adam", "sgd"):
            raise ConfigError(f"lora_sb: key 'update' must be 'adam' or 'sgd', got {self.update!r}")
        if self.init_lr <= 0:
            raise ConfigError(f"lora_sb: key 'init_lr' must be > 0, got {self.init_lr}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def build(self, in_features: int, out_features: int, base_weight: torch.Tensor) -> LoRASB:
        check_rank(self.method, self.r, out_features, in_features)
        dtype, device = param_dtype(base_weight), base_weight.device
        r = self.r
        return LoRASB(
            outer_b=torch.zeros(out_features, r, dtype=dtype, device=device),
            outer_a=torch.zeros(r, in_features, dtype=dtype, device=device),
            core=torch.zeros(r, r, dtype=dtype, device=device),
            scaling=self.scaling, dropout=self.dropout, store_factors=True,
        )


class LoRASB(LoRAXS):
    """LoRA-XS's module plus a stored flag saying whether ``initialize`` has filled B, R and A."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.register_buffer("initialised", torch.zeros((), dtype=torch.uint8))
        self._ready = False  # cached, so the flag tensor is read once rather than on every forward

    def _check_ready(self) -> None:
        if not self._ready:
            self._ready = bool(self.initialised)
            if not self._ready:
                raise RuntimeError(
                    "LoRA-SB adapter is not initialised: its factors come from data. Call "
                    "mm.adapters.lora_sb.initialize(model, batches, loss_fn, name=...) with calibration "
                    "batches and a loss function (model, batch) -> loss after mm.attach, or load a saved one"
                )

    def forward(self, x: torch.Tensor, out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        self._check_ready()
        return super().forward(x, out, base)

    def delta(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        self._check_ready()
        return super().delta(x, base)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        self._check_ready()
        return super().delta_weight(base)

    @torch.no_grad()
    def set_from_update(self, update: torch.Tensor) -> None:
        """Fill B, R, A from an approximated full update dW (out, in): s · B R A = best rank-r dW."""
        r = self.lora_R.shape[0]
        u, s, vh = torch.linalg.svd(update.to(torch.float32), full_matrices=False)
        self.lora_B.copy_(u[:, :r])
        self.lora_A.copy_(vh[:r])
        self.lora_R.copy_(torch.diag(s[:r]) / self.scaling)
        self.initialised.fill_(1)
        self._ready = True


def _lora_sb_layers(model: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    from mm.wrap import adapted_layers  # late: mm.wrap imports the adapter package

    found = [
        (layer_name, layer) for layer_name, layer in adapted_layers(model)
        if name in layer.adapters and isinstance(layer.adapters[name], LoRASB)
    ]
    if not found:
        raise ValueError(f"model has no LoRA-SB adapter named {name!r}; attach mm.AdapterConfig "
                         "method 'lora_sb' first")
    return found


def full_weight_gradients(
    model: nn.Module, layers: list[tuple[str, nn.Module]], batches: Iterable[Any], loss_fn: LossFn,
    *, skip_adapter: str, max_batches: int | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Sum over batches of dL/dW for each layer's frozen base weight, as (out, in) float32; and the count.

    The adapter ``skip_adapter`` is switched off meanwhile (its factors are not set yet), and every
    ``requires_grad`` flag is restored afterwards; no ``.grad`` of the model is touched.
    """
    from mm.layer import is_conv1d, weight_out_in  # late: mm.layer imports the adapter package

    weights = [layer.base.weight for _, layer in layers]
    for (layer_name, _), weight in zip(layers, weights, strict=True):
        if not weight.is_floating_point():
            raise ConfigError(f"{layer_name}: base weight is {weight.dtype}; LoRA-SB needs the gradient of a "
                              "float weight")
    flags = [w.requires_grad for w in weights]
    actives = [layer.active for _, layer in layers]
    sums = [torch.zeros_like(weight_out_in(layer.base), dtype=torch.float32) for _, layer in layers]
    count = 0
    try:
        for weight in weights:
            weight.requires_grad_(True)
        for _, layer in layers:
            layer.active = tuple(n for n in layer.active if n != skip_adapter)
        for batch in batches:
            if max_batches is not None and count >= max_batches:
                break
            grads = torch.autograd.grad(loss_fn(model, batch), weights, allow_unused=True)
            for total, grad, (_, layer) in zip(sums, grads, layers, strict=True):
                if grad is not None:
                    total.add_((grad.T if is_conv1d(layer.base) else grad).to(torch.float32))
            count += 1
    finally:
        for weight, flag in zip(weights, flags, strict=True):
            weight.requires_grad_(flag)
        for (_, layer), active in zip(layers, actives, strict=True):
            layer.active = active
    if count == 0:
        raise ValueError("LoRA-SB initialisation needs at least one calibration batch; got none")
    return {layer_name: total for (layer_name, _), total in zip(layers, sums, strict=True)}, count


def initialize(
    model: nn.Module, batches: Iterable[Any], loss_fn: LossFn, *, name: str = "default",
    max_batches: int | None = None,
) -> dict[str, float]:
    """Initialise every LoRA-SB adapter ``name`` from the approximated first full fine-tuning step.

    ``loss_fn(model, batch)`` returns the scalar training loss. Returns, per layer, the share of the
    approximated update's Frobenius norm that the rank-r initialisation captures.
    """
    if batches is None or loss_fn is None:
        raise ValueError("LoRA-SB initialisation needs calibration batches and a loss function "
                         "(model, batch) -> loss")
    layers = _lora_sb_layers(model, name)
    config = layers[0][1].adapters[name].config
    sums, count = full_weight_gradients(model, layers, batches, loss_fn, skip_adapter=name,
                                        max_batches=max_batches)
    captured = {}
    for layer_name, layer in layers:
        grad = sums[layer_name]
        step = grad.sign() if config.update == "adam" else grad / count
        update = -config.init_lr * step
        adapter = layer.adapters[name]
        adapter.set_from_update(update)
        norm = update.norm()
        with torch.no_grad():
            kept = adapter.delta_weight(layer.base).float().norm()
        captured[layer_name] = float(kept / norm) if norm > 0 else 0.0
    return captured
