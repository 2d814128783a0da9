"""DoRA (Liu et al., 2024): weight-decomposed LoRA, PEFT's ``use_dora``.

The adapted weight is split into a trainable magnitude m (one number per output feature) and a direction
W + s B A normalised per output feature:

    W' = m * (W + s B A) / ||W + s B A||_row        (the paper's "column" norm of its (in, out) matrix)

with m initialised to ||W||_row, so W' = W at init (B = 0). As in the paper (section 4.3) and PEFT, the
norm is a constant for the gradient (detached): only m, A and B receive gradients through the scale.

The forward reuses the base output: W' x + b = m/n * (W x + b + s B A x - b) + b, so it costs LoRA's fused
update plus one per-feature scale. The norm needs no (out, in) temporary:
||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s <B_i, (W A^T)_i> + s^2 B_i (A A^T) B_i^T, two thin products.
In eval mode without gradients the norm is cached until A, B or the base weight change (PEFT's weight-norm
cache for inference, here always on and invalidated by tensor versions instead of a global switch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mm.adapters.base import ADAPTERS, add_low_rank_
from mm.adapters.lora import LoRA, LoRAConfig, _param_dtype
from mm.config import ConfigError


@ADAPTERS.register("dora")
@dataclass
class DoRAConfig(LoRAConfig):
    """DoRA: a trainable per-feature magnitude times the LoRA-updated, normalised direction (PEFT use_dora)."""

    method: ClassVar[str] = "dora"
    #: Linear layers only (PEFT's conv DoRA normalises kernels differently; not built here).
    layer_kinds: ClassVar[tuple[str, ...]] = ("linear",)

    def validate(self) -> None:
        super().validate()
        if self.init not in ("kaiming", "gaussian"):
            raise ConfigError(f"{self.method}: key 'init' must be 'kaiming' or 'gaussian', got {self.init!r}")

    def build(self, in_features: int, out_features: int, base_weight: torch.Tensor) -> DoRA:
        return DoRA(self, in_features, out_features, base_weight)

    def build_for(self, layer_name: str, in_features: int, out_features: int, base_weight: torch.Tensor) -> DoRA:
        return self.build(in_features, out_features, base_weight)


def _base_weight(base: nn.Module) -> torch.Tensor:
    from mm.layer import weight_out_in  # late: mm.layer imports the adapter base

    return weight_out_in(base)


class DoRA(LoRA):
    """LoRA's A, B plus ``lora_magnitude_vector`` (out,), PEFT's name for m."""

    #: It scales the output it is handed, so the layer hands it the base output before other updates.
    rescales_output = True

    def __init__(self, config: DoRAConfig, in_features: int, out_features: int, base_weight: torch.Tensor) -> None:
        dtype = _param_dtype(base_weight)
        super().__init__(config, in_features, out_features, dtype=dtype, device=base_weight.device)
        with torch.no_grad():
            norm = base_weight.float().norm(dim=1)
        self.lora_magnitude_vector = nn.Parameter(norm.to(dtype))
        self._norm_cache: tuple[tuple[int, ...], torch.Tensor] | None = None

    def _versions(self, weight: torch.Tensor) -> tuple[int, ...]:
        return (id(weight), weight._version, self.lora_A._version, self.lora_B._version, id(self.lora_A),
                id(self.lora_B))

    @torch.no_grad()
    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """||W + s B A|| per output feature (detached), in float32; cached while nothing changes in eval."""
        cacheable = not self.training
        if cacheable and self._norm_cache is not None and self._norm_cache[0] == self._versions(weight):
            return self._norm_cache[1]
        w, a, b, s = weight.float(), self.lora_A.float(), self.lora_B.float(), self.scaling
        squared = w.pow(2).sum(1) + 2 * s * (b * (w @ a.T)).sum(1) + s * s * ((b @ (a @ a.T)) * b).sum(1)
        norm = squared.clamp_min(0).sqrt()
        self._norm_cache = (self._versions(weight), norm) if cacheable else None
        return norm

    def train(self, mode: bool = True) -> DoRA:
        self._norm_cache = None
        return super().train(mode)

    def _scale(self, base: nn.Module) -> torch.Tensor:
        """m / ||W + s B A||: gradient reaches m only (the norm is a constant, as the paper prescribes)."""
        return self.lora_magnitude_vector / self.weight_norm(_base_weight(base)).to(self.lora_magnitude_vector)

    def forward(self, x: torch.Tensor, out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.dropout is not None and self.training:
            return out + self.delta(x, base).to(out.dtype)
        scale = self._scale(base).to(out.dtype)
        bias = getattr(base, "bias", None)
        if x.dtype != self.lora_A.dtype:
            x = x.to(self.lora_A.dtype)
        # out = W x + b + s B A x (LoRA's fused node), then m/n * (out - b) + b.
        out = add_low_rank_(out, x, self.lora_A, self.lora_B, self.scaling)
        if bias is None:
            return out * scale
        # (out - b) * scale + b as one kernel: three full-size ops (and their backward) cost ~10% of a step.
        bias = bias.to(out.dtype)
        return torch.addcmul(bias - bias * scale, out, scale)

    def delta(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """(m/n - 1) W x + m/n s B A x; with dropout the whole update sees the dropped input (as PEFT)."""
        if self.dropout is not None:
            x = self.dropout(x)
        weight = _base_weight(base)
        scale = self._scale(base)
        x = x.to(self.lora_A.dtype)
        lora = F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling
        return (scale - 1) * F.linear(x, weight.to(x.dtype)) + scale * lora

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """W' - W with W' = m/n (W + s B A), for the base weight as it is now (unmerged)."""
        weight = _base_weight(base).to(self.lora_A.dtype)
        scale = self._scale(base)[:, None]
        return (scale - 1) * weight + scale * (self.lora_B @ self.lora_A) * self.scaling
