"""LoRA-XS (Bałazy et al., 2024): W x + s · B R A x, where only the r x r matrix R trains.

The outer factors come from the truncated SVD of the frozen weight, W = U Σ V^T (W stored (out, in)):
B = U_r (out x r) and A = Σ_r V_r^T (r x in), so the update s · U_r R Σ_r V_r^T lives in the span of W's top
singular vectors. This is the paper's ``A R B`` with ``A = U_r Σ_r, B = V_r^T`` written for ``h = x W`` (W
stored (in, out)), transposed to our (out, in) convention; R is free, so R and R^T are the same family.
R starts Gaussian with a tiny std (the paper: 1e-5); ``init_std=0`` starts exactly at the base model and
still trains, since dL/dR = s B^T G A^T does not vanish at R = 0.

B and A are recomputed from the base weight when the adapter is built (and when a saved adapter is
loaded), so a checkpoint holds only R: r^2 numbers per layer. The SVD's sign ambiguity is removed (the
largest entry of each left singular vector is made positive) so the factors do not depend on the LAPACK
build. ``LoRAXS`` is also the module of LoRA-SB (``mm/adapters/lora_sb.py``), whose factors come from data
and are therefore stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mm.adapters.base import ADAPTERS, Adapter, add_low_rank_
from mm.config import AdapterConfig, ConfigError


def check_rank(method: str, r: int, out_features: int, in_features: int) -> None:
    if r > min(out_features, in_features):
        raise ConfigError(
            f"{method}: key 'r' is {r} but a layer of shape ({out_features}, {in_features}) (out, in) has rank at "
            f"most {min(out_features, in_features)}; lower 'r' or exclude that layer"
        )


def float_weight(method: str, base_weight: torch.Tensor) -> torch.Tensor:
    """The base weight as float32 for a decomposition; quantised (integer) weights cannot be decomposed."""
    if not base_weight.is_floating_point():
        raise ConfigError(
            f"{method}: needs a floating-point base weight to decompose, got {base_weight.dtype}; "
            "attach before quantising the model"
        )
    return base_weight.detach().to(torch.float32)


def param_dtype(base_weight: torch.Tensor) -> torch.dtype:
    return base_weight.dtype if base_weight.is_floating_point() else torch.float32


def svd_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r (U_r, S_r, V_r^T) of a float matrix with a canonical sign per singular pair."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    u, s, vh = u[:, :r], s[:r], vh[:r]
    # Flip each pair (u_i, v_i) together so that u_i's largest-magnitude entry is positive: the product is
    # unchanged, and the factors no longer depend on the sign convention of the SVD routine.
    pivot = u.abs().argmax(dim=0)
    signs = torch.sign(u[pivot, torch.arange(r)])
    signs[signs == 0] = 1.0
    return u * signs, s, vh * signs[:, None]


@ADAPTERS.register("lora_xs")
@dataclass
class LoRAXSConfig(AdapterConfig):
    """LoRA-XS: only an r x r matrix trains, between frozen factors from the SVD of the base weight."""

    method: ClassVar[str] = "lora_xs"

    init_std: float = field(
        default=1e-5,
        metadata={"help": "Std of R's Gaussian init (the paper uses 1e-5); 0 starts exactly at the base model."},
    )

    def validate(self) -> None:
        super().validate()
        if self.init_std < 0:
            raise ConfigError(f"lora_xs: key 'init_std' must be >= 0, got {self.init_std}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def build(self, in_features: int, out_features: int, base_weight: torch.Tensor) -> LoRAXS:
        check_rank(self.method, self.r, out_features, in_features)
        u, s, vh = svd_factors(float_weight(self.method, base_weight), self.r)
        dtype, device = param_dtype(base_weight), base_weight.device
        core = torch.randn(self.r, self.r, device=device) * self.init_std
        return LoRAXS(
            outer_b=u.to(dtype), outer_a=(s[:, None] * vh).to(dtype), core=core.to(dtype),
            scaling=self.scaling, dropout=self.dropout, store_factors=False,
        )


class LoRAXS(Adapter):
    """``s · B R A``: frozen buffers ``lora_B`` (out x r) and ``lora_A`` (r x in), trainable ``lora_R`` (r x r).

    ``store_factors`` decides whether B and A go into checkpoints (LoRA-SB: they come from data) or are
    rebuilt from the base weight (LoRA-XS).
    """

    def __init__(
        self, *, outer_b: torch.Tensor, outer_a: torch.Tensor, core: torch.Tensor, scaling: float,
        dropout: float, store_factors: bool,
    ) -> None:
        super().__init__()
        self.scaling = scaling
        self.register_buffer("lora_B", outer_b, persistent=store_factors)
        self.register_buffer("lora_A", outer_a, persistent=store_factors)
        self.lora_R = nn.Parameter(core)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def extra_repr(self) -> str:
        r, in_features = self.lora_A.shape
        return f"r={r}, in={in_features}, out={self.lora_B.shape[0]}, scaling={self.scaling:g}"

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.lora_R.dtype:
            x = x.to(self.lora_R.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        # Two r-wide products before the out-wide one: the cost stays that of a rank-r LoRA.
        return F.linear(F.linear(x, self.lora_A), self.lora_R) * self.scaling

    def forward(self, x: torch.Tensor, out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if x.dtype != self.lora_R.dtype:
            x = x.to(self.lora_R.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        # B (R A) x: folding the r x r core into A costs r*r*in once per call instead of r*r per token, and
        # leaves LoRA's shape, so LoRA's fused node (add_low_rank_) serves it.
        return add_low_rank_(out, x, self.lora_R @ self.lora_A, self.lora_B, self.scaling)

    def delta(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return F.linear(self._hidden(x), self.lora_B)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return (self.lora_B @ self.lora_R @ self.lora_A) * self.scaling
