"""LoLDU (Shi et al., 2024): only a diagonal and a scale train, between frozen LDU factors of the weight.

The frozen weight (out, in) is factored with partially pivoted LU, W = P L U, and U's diagonal is pulled out:
W = P L D U' with L unit lower-triangular (out x k), D = diag(U) and U' = D^-1 U unit upper-triangular
(k x in), k = min(out, in). The first r columns of P L, the first r entries of D and the first r rows of U'
make a rank-r piece ``σ · P L_r diag(z) U'_r``; only the vector z (initialised to D_r) and the scalar σ
(initialised to alpha / r) train: r + 1 numbers per layer. ``full_rank`` takes all k components of every
layer, as the paper's experiments do (e.g. rank 768 on ViT-B): still only k + 1 trainables per layer.

The paper keeps the output at the base model by training on a residual base weight,
W_res = W - σ0 · P L_r diag(D_r) U'_r, plus ``σ · P L_r diag(z) U'_r``. We compute the same function
without editing the base weight: the update is ``P L_r diag(σ z - σ0 D_r) U'_r``, which is exactly zero at
init, merges and unmerges like any delta, and leaves nothing to undo when the adapter is deleted. LU with
partial pivoting is deterministic, so the factors are rebuilt from the base weight on load and checkpoints
hold only z and σ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mm.adapters.base import ADAPTERS, Adapter
from mm.adapters.lora_xs import check_rank, float_weight, param_dtype
from mm.config import AdapterConfig, ConfigError


def ldu_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P L_r (out x r), D_r (r), U'_r (r x in)) of a float (out, in) matrix: W ≈ P L_r diag(D_r) U'_r."""
    p, lower, upper = torch.linalg.lu(weight)
    pivots = torch.diagonal(upper)[:r]
    if bool((pivots == 0).any()):
        raise ConfigError(
            f"loldu: the LU decomposition of a {tuple(weight.shape)} (out, in) weight has a zero pivot among "
            f"its first {r}; the weight's leading block is rank-deficient, lower 'r'"
        )
    unit_upper = upper[:r] / pivots[:, None]
    return p @ lower[:, :r], pivots, unit_upper


@ADAPTERS.register("loldu")
@dataclass
class LoLDUConfig(AdapterConfig):
    """LoLDU: only a diagonal and a scale train, between frozen factors of the base weight's LDU decomposition."""

    method: ClassVar[str] = "loldu"

    train_scale: bool = field(
        default=True,
        metadata={"help": "Train the scalar scale sigma beside the diagonal (the paper); False: r trainables."},
    )
    full_rank: bool = field(
        default=False,
        metadata={"help": "Use every LDU component of each layer, r = min(out, in) (the paper's usual setting); "
                  "'r' then only sets the scale alpha / r."},
    )

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def build(self, in_features: int, out_features: int, base_weight: torch.Tensor) -> LoLDU:
        rank = min(in_features, out_features) if self.full_rank else self.r
        check_rank(self.method, rank, out_features, in_features)
        lower, diagonal, upper = ldu_factors(float_weight(self.method, base_weight), rank)
        dtype = param_dtype(base_weight)
        return LoLDU(lower.to(dtype), diagonal.to(dtype), upper.to(dtype), scale=self.scaling,
                     train_scale=self.train_scale, dropout=self.dropout)


class LoLDU(Adapter):
    """``P L_r diag(σ z - σ0 z0) U'_r``: buffers ``lower``, ``upper``, ``diagonal_init``; trains ``diagonal`` (z)
    and ``scale`` (σ)."""

    def __init__(
        self, lower: torch.Tensor, diagonal: torch.Tensor, upper: torch.Tensor, *, scale: float,
        train_scale: bool, dropout: float,
    ) -> None:
        super().__init__()
        self.register_buffer("lower", lower, persistent=False)
        self.register_buffer("upper", upper, persistent=False)
        self.register_buffer("diagonal_init", diagonal.clone(), persistent=False)
        self.scale_init = scale
        self.diagonal = nn.Parameter(diagonal.clone())
        self.scale = nn.Parameter(torch.tensor(scale, dtype=diagonal.dtype, device=diagonal.device),
                                  requires_grad=train_scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def extra_repr(self) -> str:
        return f"r={self.diagonal.shape[0]}, in={self.upper.shape[1]}, out={self.lower.shape[0]}"

    def coefficients(self) -> torch.Tensor:
        """σ z - σ0 z0: the diagonal of the update; exactly 0 before training."""
        return self.scale * self.diagonal - self.scale_init * self.diagonal_init

    def delta(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if x.dtype != self.diagonal.dtype:
            x = x.to(self.diagonal.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        return F.linear(F.linear(x, self.upper) * self.coefficients(), self.lower)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return (self.lower * self.coefficients()) @ self.upper
