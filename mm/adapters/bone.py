"""Bone (Kang, 2024): block affine adaptation with the "weight guide" (the Bat form; PEFT: MiSS ``bat``).

W (out x in) is cut into r x r blocks W_ij (i over out/r row blocks, j over in/r column blocks). Each row
block i owns one trainable r x r matrix b_i, and every block of that row moves by an affine map of itself:

    delta W_ij = W_ij b_i + b_i

The W_ij b_i term is the weight guide: the frozen weights steer what the trainable block does, so the
update depends on W. The trainable count is out * r; b starts at 0, so training starts at the base model.

Because the delta depends on W, unmerging cannot recompute it from the merged weight W' = W (I + b) + b
(blockwise). ``delta_weight`` remembers a fingerprint of the weight its last merge produced; while the
base weight still matches it, W is recovered exactly as PEFT's MiSS does, W_ij = (W'_ij - b_i)(I + b_i)^-1
(in float64), and the delta relative to that W is returned, so unmerge subtracts what merge added.
Unmerging in the reverse order of merging is exact; another adapter merged on top of Bone changes W' and
Bone's delta is then taken against the weight as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mm.adapters.base import ADAPTERS, Adapter
from mm.config import AdapterConfig, ConfigError
from mm.layer import weight_out_in


@ADAPTERS.register("bone")
@dataclass
class BoneConfig(AdapterConfig):
    """Bone: block affine update W_ij b_i + b_i guided by the frozen weights (PEFT MiSS 'bat')."""

    method: ClassVar[str] = "bone"

    def validate(self) -> None:
        super().validate()
        if self.dropout:
            raise ConfigError("bone: key 'dropout' is not supported (the update is applied as a weight)")

    def build(self, in_features: int, out_features: int, base_weight: torch.Tensor) -> Bone:
        if in_features % self.r or out_features % self.r:
            raise ConfigError(
                f"bone: key 'r'={self.r} must divide both in_features={in_features} and "
                f"out_features={out_features} of every targeted layer (W is cut into r x r blocks)"
            )
        if not base_weight.is_floating_point():
            raise ConfigError("bone: the weight guide needs a floating-point base weight, not a quantised one")
        return Bone(self.r, in_features, out_features, dtype=base_weight.dtype, device=base_weight.device)


def bone_delta(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """delta W for W (out, in) and the row-block matrices ``block`` (out/r, r, r): W_ij b_i + b_i."""
    out_features, in_features = weight.shape
    r = block.shape[-1]
    # (out/r, r, in/r, r) -> (out/r, in/r, r, r): blocks[i, j] = W_ij
    blocks = weight.reshape(out_features // r, r, in_features // r, r).transpose(1, 2)
    delta = torch.matmul(blocks, block[:, None]) + block[:, None]
    return delta.transpose(1, 2).reshape(out_features, in_features)


def bone_unmerged(merged: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """Invert the merge: W_ij = (W'_ij - b_i)(I + b_i)^-1 for the merged W' (out, in)."""
    out_features, in_features = merged.shape
    r = block.shape[-1]
    blocks = merged.reshape(out_features // r, r, in_features // r, r).transpose(1, 2)
    eye = torch.eye(r, dtype=block.dtype, device=block.device)
    original = torch.linalg.solve(eye + block[:, None], blocks - block[:, None], left=False)
    return original.transpose(1, 2).reshape(out_features, in_features)


def _fingerprint(weight: torch.Tensor) -> tuple[float, float]:
    # Two float64 reductions recognise "the weight our merge left behind" without keeping a copy of it.
    flat = weight.detach().double().flatten()
    return flat.sum().item(), flat.square().sum().item()


class Bone(Adapter):
    def __init__(self, r: int, in_features: int, out_features: int, *, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.r, self.in_features, self.out_features = r, in_features, out_features
        self.bone_block = nn.Parameter(torch.zeros(out_features // r, r, r, dtype=dtype, device=device))
        self._merged_print: tuple | None = None  # what the base weight looks like right after our merge

    def extra_repr(self) -> str:
        return f"r={self.r}, in={self.in_features}, out={self.out_features}"

    def _delta(self, base: nn.Module) -> torch.Tensor:
        weight = weight_out_in(base)
        return bone_delta(weight.to(self.bone_block.dtype), self.bone_block)

    def forward(self, x: torch.Tensor, out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        delta = self._delta(base)
        if x.dtype != delta.dtype:
            x = x.to(delta.dtype)
        return out + F.linear(x, delta).to(out.dtype)

    def delta(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return F.linear(x, self._delta(base))

    def _state_print(self, weight: torch.Tensor) -> tuple:
        block = self.bone_block
        return (weight.data_ptr(), tuple(weight.shape), block._version, block.data_ptr(), *_fingerprint(weight))

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """The update relative to the unmerged W, also while merged (then W is recovered by inversion)."""
        weight = weight_out_in(base)
        with torch.no_grad():
            merged_now = self._merged_print is not None and self._state_print(weight) == self._merged_print
            if merged_now:
                # W already carries our delta (merge made it so): recover the original W in float64.
                original = bone_unmerged(weight.double(), self.bone_block.double())
                return (weight.double() - original).to(self.bone_block.dtype)
        delta = self._delta(base)
        with torch.no_grad():
            # AdaptedLinear.merge adds this delta next; remember what the weight will then look like.
            merged = weight + delta.to(weight.dtype)
            self._merged_print = (weight.data_ptr(), *self._state_print(merged)[1:])
        return delta
