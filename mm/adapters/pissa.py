"""PiSSA (Meng et al., 2024): LoRA whose A, B start at the principal singular triplets of W.

With W = U S V^T and scale s = alpha / r, PiSSA sets A = sqrt(S_r / s) V_r^T and B = U_r sqrt(S_r / s), so
s B A is the best rank-r approximation of W, and freezes the residual W_res = W - s B A: the forward
W_res x + s B A x equals the base at init, and training moves the principal part while the "noisy" tail
stays frozen. Exact SVD, or the fast randomized SVD (Halko et al.) with ``niter`` power iterations,
seeded so that attaching to a fresh copy of the base reproduces the same A, B and residual (which is what
lets ``mm.load_adapters`` restore a trained PiSSA adapter on a fresh base).

``ResidualLoRA`` here is shared by every method whose A, B start non-zero and whose initial product is
taken out of the base (PiSSA, LoRA-GA). Where that product lives is the ``residual`` option:

- ``"base"`` (the papers' layout, and PEFT's): the base weight is overwritten with W - s B0 A0 and the
  adapter is a plain LoRA. Deleting the adapter adds s B0 A0 back (``release``). Because the base itself
  changed, ``mm.disable_adapters`` and an inactive adapter run the *residual* model, not W; and a second
  such adapter on the same layer decomposes the first one's residual.
- ``"adapter"``: the base is left alone and the adapter adds s (B A - B0 A0) x, with B0, A0 frozen
  buffers. Same outputs and training dynamics, one more rank-r product per forward; disabling,
  switching and stacking adapters then behave as for LoRA.

B0, A0 are saved with the adapter (buffers ``init_A``, ``init_B``), so the file alone restores the exact
residual, also for LoRA-GA, whose initial factors come from data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mm.adapters.base import ADAPTERS, add_matmul_
from mm.adapters.lora import LoRA, LoRAConfig, _param_dtype
from mm.config import ConfigError
from mm.layer import weight_out_in

Residual = Literal["base", "adapter"]


class ResidualLoRA(LoRA):
    """A LoRA whose initial product s B0 A0 is taken out of the layer (in the base, or inside the adapter).

    ``ready`` is False until the initial factors are set (data-driven methods set them later); running an
    adapter that is not ready raises an error that says what it needs (``needs``).
    """

    def __init__(
        self, config: LoRAConfig, in_features: int, out_features: int, *, residual: Residual, needs: str,
        dtype: torch.dtype, device: torch.device,
    ) -> None:
        super().__init__(config, in_features, out_features, dtype=dtype, device=device)
        self.residual, self.needs = residual, needs
        self.calibrating = False  # set by data-driven initialisers: the adapter adds nothing meanwhile
        r = config.r
        self.register_buffer("init_A", torch.zeros(r, in_features, dtype=dtype, device=device))
        self.register_buffer("init_B", torch.zeros(out_features, r, dtype=dtype, device=device))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool, device=device))
        # What the base currently has subtracted ("base" mode): the factors and the buffer versions they
        # were read at, so a load that overwrites the buffers is noticed and the base re-synced.
        self._applied: tuple[torch.Tensor, torch.Tensor] | None = None
        self._seen: tuple[int, ...] | None = None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, residual={self.residual}"

    @torch.no_grad()
    def initialise(self, init_A: torch.Tensor, init_B: torch.Tensor, base_weight: torch.Tensor) -> None:
        """Start at A = init_A, B = init_B and take s * init_B @ init_A out of the layer."""
        self.lora_A.copy_(init_A)
        self.lora_B.copy_(init_B)
        self.init_A.copy_(init_A)
        self.init_B.copy_(init_B)
        self.ready.fill_(True)
        self._sync(base_weight)

    def _product(self, init_A: torch.Tensor, init_B: torch.Tensor) -> torch.Tensor:
        return (init_B.float() @ init_A.float()) * self.scaling

    def _versions(self) -> tuple[int, ...]:
        return (id(self.ready), self.ready._version, id(self.init_A), self.init_A._version,
                id(self.init_B), self.init_B._version)

    @torch.no_grad()
    def _sync(self, base_weight: torch.Tensor) -> torch.Tensor | None:
        """Check readiness and, in "base" mode, make the base hold W - s B0 A0 for the current buffers.

        Returns the change made to the base weight, if any (after a load: the first forward corrects its
        already computed base output with it). Cheap when nothing changed (a tuple compare); values are
        read only after a load, an init or a device move.
        """
        change = None
        if self.calibrating:
            return change
        versions = self._versions()
        if versions == self._seen:
            return change
        if not bool(self.ready):
            method = getattr(getattr(self, "config", None), "method", type(self).__name__)
            raise RuntimeError(f"{method} adapter is not initialised: it needs {self.needs}")
        if self.residual == "base":
            applied = self._applied
            same = applied is not None and all(
                torch.equal(a.to(b.device), b) for a, b in zip(applied, (self.init_A, self.init_B), strict=True)
            )
            if not same:
                change = -self._product(self.init_A, self.init_B)
                if applied is not None:
                    change += self._product(*applied)
                base_weight.add_(change.to(base_weight))
                self._applied = (self.init_A.detach().clone(), self.init_B.detach().clone())
        self._seen = versions
        return change

    def forward(self, x: torch.Tensor, out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.calibrating:
            return out
        change = self._sync(weight_out_in(base))
        if change is not None:  # the base ran before the residual was (re)applied: correct its output
            out = out + F.linear(x.to(change.dtype), change).to(out.dtype)
        if self.residual == "base":
            return super().forward(x, out, base)
        if x.dtype != self.lora_A.dtype:
            x = x.to(self.lora_A.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        # One pair of thin matmuls for s (B A - B0 A0) x: stack [A; A0] and [B, -B0].
        h = F.linear(x, torch.cat([self.lora_A, self.init_A])) * self.scaling
        return add_matmul_(out, h.to(out.dtype), torch.cat([self.lora_B, -self.init_B], dim=1).to(out.dtype))

    def delta(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.calibrating:
            return torch.zeros(*x.shape[:-1], self.lora_B.shape[0], dtype=x.dtype, device=x.device)
        self._sync(weight_out_in(base))
        update = super().delta(x, base)
        if self.residual == "adapter":
            update = update - F.linear(F.linear(x, self.init_A), self.init_B) * self.scaling
        return update

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        self._sync(weight_out_in(base))
        weight = super().delta_weight(base)
        if self.residual == "adapter":
            weight = weight - (self.init_B @ self.init_A) * self.scaling
        return weight

    @torch.no_grad()
    def release(self, base: nn.Module) -> None:
        if self._applied is not None:
            weight = weight_out_in(base)
            weight.add_(self._product(*self._applied).to(weight))
            self._applied, self._seen = None, None


def randomized_svd(
    matrix: torch.Tensor, rank: int, niter: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` (U, S, Vh) of ``matrix`` by a seeded randomized range finder (Halko et al., 2011).

    A Gaussian test matrix from ``seed`` spans the range, ``niter`` power iterations (re-orthonormalised
    each half step) sharpen it, and the SVD of the small projected matrix gives the triplets. The range is
    oversampled to 2 * rank columns (PEFT's ``svd_lowrank(q=r)`` has none), which makes the r-th triplet
    accurate when the spectrum decays slowly, for little extra work.
    """
    gen = torch.Generator(device=matrix.device).manual_seed(seed)
    width = min(2 * rank, *matrix.shape)
    test = torch.randn(matrix.shape[1], width, generator=gen, device=matrix.device, dtype=matrix.dtype)
    basis = torch.linalg.qr(matrix @ test).Q
    for _ in range(niter):
        basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.T @ basis).Q).Q
    u_small, s, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return (basis @ u_small)[:, :rank], s[:rank], vh[:rank]


def top_singular(
    matrix: torch.Tensor, rank: int, *, svd: str = "exact", niter: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, S_r, Vh_r) of a float matrix, exactly or by the seeded randomized SVD."""
    matrix = matrix.float()
    if svd == "fast":
        return randomized_svd(matrix, rank, niter, seed)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def check_float_weight(method: str, weight: torch.Tensor) -> None:
    if not weight.is_floating_point():
        raise TypeError(
            f"{method}: base weight has dtype {weight.dtype}; the initialisation needs a float weight "
            "(initialise before quantising, then quantise the residual base)"
        )


@ADAPTERS.register("pissa")
@dataclass
class PiSSAConfig(LoRAConfig):
    """PiSSA: A, B from the top-r singular triplets of W; the frozen base keeps the residual."""

    method: ClassVar[str] = "pissa"

    svd: Literal["exact", "fast"] = field(
        default="exact", metadata={"help": "'exact' (torch.linalg.svd) or 'fast' (seeded randomized SVD)."}
    )
    niter: int = field(default=4, metadata={"help": "Power iterations of the fast SVD."})
    seed: int = field(default=0, metadata={"help": "Seed of the fast SVD's random test matrix."})
    residual: Residual = field(
        default="base",
        metadata={"help": "Where W - s B0 A0 lives: 'base' (overwrites the base weight, as the paper) or "
                  "'adapter' (base untouched, the adapter subtracts s B0 A0 x; disable/switch stay exact)."},
    )

    def validate(self) -> None:
        super().validate()
        if self.svd not in ("exact", "fast"):
            raise ConfigError(f"{self.method}: key 'svd' must be 'exact' or 'fast', got {self.svd!r}")
        if self.niter < 0:
            raise ConfigError(f"{self.method}: key 'niter' must be >= 0, got {self.niter}")
        if self.residual not in ("base", "adapter"):
            raise ConfigError(f"{self.method}: key 'residual' must be 'base' or 'adapter', got {self.residual!r}")
        if self.init != "kaiming":
            raise ConfigError(f"{self.method}: key 'init' does not apply (A and B come from the SVD of W)")

    def build_for(self, layer_name: str, in_features: int, out_features: int, base_weight: torch.Tensor):
        check_float_weight(f"{self.method} at {layer_name}", base_weight)
        if self.r > min(in_features, out_features):
            raise ConfigError(
                f"{self.method}: key 'r'={self.r} exceeds the rank of {layer_name} ({out_features}x{in_features})"
            )
        module = ResidualLoRA(
            self, in_features, out_features, residual=self.residual, needs="nothing (PiSSA is data-free)",
            dtype=_param_dtype(base_weight), device=base_weight.device,
        )
        u, s, vh = top_singular(base_weight, self.r, svd=self.svd, niter=self.niter, seed=self.seed)
        root = (s / self.scaling).sqrt()
        module.initialise(root[:, None] * vh, u * root[None, :], base_weight)
        return module

    def build(self, in_features: int, out_features: int, base_weight: torch.Tensor) -> ResidualLoRA:
        return self.build_for("layer", in_features, out_features, base_weight)
