"""RandLoRA (Albert et al., ICLR 2025): a full-rank update from diagonal scalings of frozen random bases.

With d = max(in, out), k = min(in, out) and N = ceil(k / r) bases:

    M = sum_{b=1..N} B_b diag(lambda_b) A diag(gamma_b)        (d x k)
    delta W = (alpha / r) M        (or M transposed when out < in)

B_b (d x r) and A (r x k, shared by all bases) are frozen random matrices regenerated from the config's
``projection_seed``; only lambda (r x N) and gamma (N x k) train. N r >= k, so M reaches full rank k
while a layer trains r N + N k numbers. The bases are shared by every layer of the same shape (as PEFT
shares one pair), are never saved, and are cached once per (shape, device, dtype).
lambda starts at 0 (base model at init) and gamma at 1/d, as PEFT's ``RandLoraConfig``.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mm.adapters.base import ADAPTERS, Adapter, add_matmul_
from mm.config import AdapterConfig, ConfigError


@ADAPTERS.register("randlora")
@dataclass
class RandLoRAConfig(AdapterConfig):
    """RandLoRA: full-rank updates from learned diagonal scalings of frozen random low-rank bases."""

    method: ClassVar[str] = "randlora"

    alpha: float = field(
        default=160.0,
        metadata={"help": "Scale numerator: the update is scaled by alpha/r (PEFT suggests about 20 * r)."},
    )
    projection_seed: int = field(
        default=0, metadata={"help": "Seed of the frozen random bases (shared by layers of one shape)."}
    )

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.projection_seed < 2**63:
            raise ConfigError(f"randlora: key 'projection_seed' must be in [0, 2**63), got {self.projection_seed}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def build(self, in_features: int, out_features: int, base_weight: torch.Tensor) -> RandLoRA:
        dtype = base_weight.dtype if base_weight.is_floating_point() else torch.float32
        return RandLoRA(self, in_features, out_features, dtype=dtype, device=base_weight.device)


def num_bases(in_features: int, out_features: int, r: int) -> int:
    """N = ceil(min(in, out) / r): the fewest rank-r bases whose sum can reach full rank."""
    return math.ceil(min(in_features, out_features) / r)


def random_bases(seed: int, r: int, n: int, max_dim: int, min_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B): A (r, min_dim) and B (max_dim, n, r), unit-variance uniform, generated on the CPU."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    basis_a = torch.empty(r, min_dim).uniform_(-1.0, 1.0, generator=gen) * math.sqrt(3.0)
    basis_b = torch.empty(max_dim, n, r).uniform_(-1.0, 1.0, generator=gen) * math.sqrt(3.0)
    return basis_a, basis_b


# One copy of the bases per (seed, shape, device, dtype), alive while some adapter holds it.
_BASES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _shared_bases(seed: int, r: int, n: int, max_dim: int, min_dim: int, device, dtype):
    key_a, key_b = (seed, "A", r, n, max_dim, min_dim, device, dtype), (seed, "B", r, n, max_dim, min_dim, device, dtype)
    basis_a, basis_b = _BASES.get(key_a), _BASES.get(key_b)
    if basis_a is None or basis_b is None:
        cpu_a, cpu_b = random_bases(seed, r, n, max_dim, min_dim)
        basis_a, basis_b = cpu_a.to(device, dtype), cpu_b.to(device, dtype)
        _BASES[key_a], _BASES[key_b] = basis_a, basis_b
    return basis_a, basis_b


class _ScaleBasis(torch.autograd.Function):
    """lambda[k, b] * A[k, j] * gamma[b, j] -> (r, N, k), saving only the small inputs for backward.

    Autograd through two broadcast multiplies would keep the (r, N, k) intermediate alive per layer.
    """

    @staticmethod
    def forward(ctx, basis_a, lam, gamma):
        ctx.save_for_backward(basis_a, lam, gamma)
        return lam[:, :, None] * basis_a[:, None, :] * gamma[None, :, :]

    @staticmethod
    def backward(ctx, grad):
        basis_a, lam, gamma = ctx.saved_tensors
        grad_lam = torch.einsum("kbj,kj,bj->kb", grad, basis_a, gamma)
        grad_gamma = torch.einsum("kbj,kj,kb->bj", grad, basis_a, lam)
        return None, grad_lam, grad_gamma


class RandLoRA(Adapter):
    def __init__(
        self, config: RandLoRAConfig, in_features: int, out_features: int, *, dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.r, self.in_features, self.out_features = config.r, in_features, out_features
        self.max_dim, self.min_dim = max(in_features, out_features), min(in_features, out_features)
        self.num_bases = num_bases(in_features, out_features, config.r)
        self.seed, self.scaling = config.projection_seed, config.scaling
        self.randlora_lambda = nn.Parameter(torch.zeros(config.r, self.num_bases, dtype=dtype, device=device))
        self.randlora_gamma = nn.Parameter(
            torch.full((self.num_bases, self.min_dim), 1.0 / self.max_dim, dtype=dtype, device=device)
        )
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self._bases: tuple[torch.Tensor, torch.Tensor] | None = None  # plain attribute: shared, never saved
        self._custom_bases = False

    def extra_repr(self) -> str:
        return f"r={self.r}, bases={self.num_bases}, in={self.in_features}, out={self.out_features}"

    def use_bases(self, basis_a: torch.Tensor, basis_b: torch.Tensor) -> None:
        """Replace the seeded bases by given ones, A (r, min_dim) and B (max_dim, N, r) (parity tests).

        Such bases are not reproducible from the config, so a saved adapter reloads with seeded ones.
        """
        want_a, want_b = (self.r, self.min_dim), (self.max_dim, self.num_bases, self.r)
        if tuple(basis_a.shape) != want_a or tuple(basis_b.shape) != want_b:
            raise ValueError(f"randlora: bases must be A {want_a} and B {want_b}, got "
                             f"{tuple(basis_a.shape)} and {tuple(basis_b.shape)}")
        param = self.randlora_lambda
        self._bases = (basis_a.to(param.device, param.dtype), basis_b.to(param.device, param.dtype))
        self._custom_bases = True

    def bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        param = self.randlora_lambda
        if self._bases is None or self._bases[0].device != param.device or self._bases[0].dtype != param.dtype:
            if self._custom_bases and self._bases is not None:
                self._bases = (self._bases[0].to(param.device, param.dtype), self._bases[1].to(param.device, param.dtype))
            else:
                self._bases = _shared_bases(self.seed, self.r, self.num_bases, self.max_dim, self.min_dim,
                                            param.device, param.dtype)
        return self._bases

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(first, second) with delta W = scaling * second @ first, first (N r, in) and second (out, N r)."""
        basis_a, basis_b = self.bases()
        # Row b*r + k of scaled_a pairs with column b*r + k of flat_b: basis b, rank k.
        scaled_a = _ScaleBasis.apply(basis_a, self.randlora_lambda, self.randlora_gamma)  # (r, N, k)
        scaled_a = scaled_a.transpose(0, 1).reshape(self.num_bases * self.r, self.min_dim)
        flat_b = basis_b.reshape(self.max_dim, self.num_bases * self.r)
        if self.in_features == self.min_dim:
            return scaled_a, flat_b
        return flat_b.T, scaled_a.T

    def _materialize_cheaper(self, tokens: int) -> bool:
        # Factorized: tokens * N r (in + out); materialized: N r in out once, then tokens * in * out.
        width = self.num_bases * self.r
        factorized = tokens * width * (self.in_features + self.out_features)
        materialized = width * self.in_features * self.out_features + tokens * self.in_features * self.out_features
        return materialized < factorized

    def forward(self, x: torch.Tensor, out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        first, second = self.factors()
        if x.dtype != first.dtype:
            x = x.to(first.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        if self._materialize_cheaper(x.numel() // x.shape[-1]):
            update = F.linear(x, (second @ first) * self.scaling)
            return out + update.to(out.dtype)
        h = F.linear(x, first) * self.scaling
        return add_matmul_(out, h.to(out.dtype), second.to(out.dtype))

    def delta(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        first, second = self.factors()
        if self.dropout is not None:
            x = self.dropout(x)
        return F.linear(F.linear(x, first), second) * self.scaling

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        first, second = self.factors()
        return (second @ first) * self.scaling
