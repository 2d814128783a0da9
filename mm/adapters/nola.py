"""NOLA (Koohpayegani et al., ICLR 2024): LoRA's A and B as learned mixtures of frozen random bases.

    A = sum_i alpha_i A_i      (k_A bases, each r x in)
    B = sum_j beta_j  B_j      (k_B bases, each out x r)
    delta W = (alpha_scale / r) B A

Only the coefficients alpha (k_A) and beta (k_B) train, so a layer's trainable count is k_A + k_B,
whatever the rank and the layer's shape. The bases are never stored: each layer regenerates them from a
seed derived from the config's ``seed`` and the layer's name (kept as a one-element buffer too, so a
reload uses the very seed the layer trained with even under another module path). The bases are cached as non-persistent buffers, so checkpoints hold only
coefficients and seeds. beta starts at 0 (the base model at init); alpha starts random, so B's
coefficients get a gradient from the first step (as LoRA's random A / zero B).
"""

from __future__ import annotations

import itertools
import math
import zlib
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from mm.adapters.base import ADAPTERS, FactoredLoRA
from mm.config import AdapterConfig, ConfigError


@ADAPTERS.register("nola")
@dataclass
class NOLAConfig(AdapterConfig):
    """NOLA: LoRA factors as mixtures of seeded random bases; only the mixing coefficients train."""

    method: ClassVar[str] = "nola"

    num_basis_a: int = field(default=256, metadata={"help": "k_A: random bases mixed into A (trainable per layer)."})
    num_basis_b: int = field(default=256, metadata={"help": "k_B: random bases mixed into B (trainable per layer)."})
    seed: int = field(
        default=0,
        metadata={"help": "Seed of the random bases; each layer's seed is derived from (seed, layer name)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._ordinals = itertools.count()  # names layers built without one (direct ``build`` calls)

    def validate(self) -> None:
        super().validate()
        for key in ("num_basis_a", "num_basis_b"):
            if getattr(self, key) < 1:
                raise ConfigError(f"nola: key {key!r} must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.seed < 2**31:
            raise ConfigError(f"nola: key 'seed' must be in [0, 2**31), got {self.seed}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def build_for(self, layer_name: str, in_features: int, out_features: int, base_weight: torch.Tensor) -> NOLA:
        layer_seed = layer_basis_seed(self.seed, zlib.crc32(layer_name.encode()))
        dtype = base_weight.dtype if base_weight.is_floating_point() else torch.float32
        return NOLA(self, in_features, out_features, layer_seed, dtype=dtype, device=base_weight.device)

    def build(self, in_features: int, out_features: int, base_weight: torch.Tensor) -> NOLA:
        return self.build_for(f"#{next(self._ordinals)}", in_features, out_features, base_weight)


def layer_basis_seed(seed: int, layer_key: int) -> int:
    """A distinct, reproducible 63-bit seed per (seed, layer key) (a splitmix64 step keeps near inputs apart)."""
    z = (seed * 0x9E3779B97F4A7C15 + layer_key + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def nola_bases(seed: int, r: int, in_features: int, out_features: int, num_a: int, num_b: int):
    """The frozen bases of one layer, generated on the CPU (the same numbers on every machine and device).

    A_i ~ U(-1/sqrt(in), 1/sqrt(in)) as LoRA's kaiming A; B_j ~ U(-1/sqrt(r), 1/sqrt(r)). With
    coefficients of variance 1/k, the mixture has the spread of a single basis whatever k is.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    bases_a = torch.empty(num_a, r, in_features).uniform_(-1.0, 1.0, generator=gen) / math.sqrt(in_features)
    bases_b = torch.empty(num_b, out_features, r).uniform_(-1.0, 1.0, generator=gen) / math.sqrt(r)
    return bases_a, bases_b


class NOLA(FactoredLoRA):
    def __init__(
        self, config: NOLAConfig, in_features: int, out_features: int, layer_seed: int, *,
        dtype: torch.dtype, device: torch.device,
    ) -> None:
        super().__init__()
        self.r, self.in_features, self.out_features = config.r, in_features, out_features
        self.scaling = config.scaling
        self.nola_alpha = nn.Parameter(torch.empty(config.num_basis_a, dtype=dtype, device=device))
        self.nola_beta = nn.Parameter(torch.zeros(config.num_basis_b, dtype=dtype, device=device))
        gen = torch.Generator(device="cpu").manual_seed(layer_seed ^ 0x5DEECE66D)
        with torch.no_grad():
            self.nola_alpha.copy_(torch.randn(config.num_basis_a, generator=gen) / math.sqrt(config.num_basis_a))
        # The seed is state (a reload must regenerate these very bases); the bases are not.
        self.register_buffer("basis_seed", torch.tensor([layer_seed], dtype=torch.int64, device=device))
        self.register_buffer("bases_a", torch.empty(0, dtype=dtype, device=device), persistent=False)
        self.register_buffer("bases_b", torch.empty(0, dtype=dtype, device=device), persistent=False)
        self._bases_key: tuple | None = None
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None

    def extra_repr(self) -> str:
        return (f"r={self.r}, in={self.in_features}, out={self.out_features}, "
                f"k_A={self.nola_alpha.numel()}, k_B={self.nola_beta.numel()}")

    def _bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Regenerate when the seed buffer was written (a load copies into it: its version moves), or when
        # moved to another device/dtype. The version check reads no tensor value, so no device sync.
        key = (self.basis_seed._version, id(self.basis_seed), self.nola_alpha.device, self.nola_alpha.dtype)
        if key != self._bases_key:
            seed = int(self.basis_seed.item())
            bases_a, bases_b = nola_bases(seed, self.r, self.in_features, self.out_features,
                                          self.nola_alpha.numel(), self.nola_beta.numel())
            self.bases_a = bases_a.to(self.nola_alpha.device, self.nola_alpha.dtype)
            self.bases_b = bases_b.to(self.nola_alpha.device, self.nola_alpha.dtype)
            self._bases_key = key
        return self.bases_a, self.bases_b

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B): the coefficient-weighted sums of the bases, (r, in) and (out, r)."""
        bases_a, bases_b = self._bases()
        lora_a = torch.tensordot(self.nola_alpha, bases_a, dims=1)
        lora_b = torch.tensordot(self.nola_beta, bases_b, dims=1)
        return lora_a, lora_b
