"""Block-LoRA (Zhou et al., 2025, "One Head Eight Arms"): LoRA as a block matrix with one shared down-projection.

LoRA's update, read as an n x n block matrix over input chunks x_1..x_n and output chunks, has blocks
B_i A_j with B = [B_1; ...; B_n] (row blocks, out/n x r) and A = [A_1, ..., A_n] (column blocks,
r x in/n). Block-LoRA shares every down-projection sub-matrix, A_j = A_0 for all j, so

    delta W x = B [A_0 A_0 ... A_0] x = B A_0 (x_1 + x_2 + ... + x_n)

which replaces n down-projection matmuls by n - 1 additions of input chunks ("one head", A_0, "eight
arms", the row blocks of B). Trainable parameters drop from r (in + out) to r (in / n + out), the
down-projection flops by a factor n, and the activation kept for A_0's gradient is the summed chunk
(in / n wide) instead of x. The update keeps rank min(r, in / n).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mm.adapters.base import ADAPTERS, Adapter, add_low_rank_
from mm.adapters.lora import LoRAConfig
from mm.config import ConfigError


@ADAPTERS.register("block_lora")
@dataclass
class BlockLoRAConfig(LoRAConfig):
    """Block-LoRA: LoRA whose down-projection is one block shared by all input chunks (fewer params, flops)."""

    method: ClassVar[str] = "block_lora"

    blocks: int = field(
        default=4,
        metadata={"help": "n: the input is split into n chunks that share one r x (in/n) down-projection; "
                  "n must divide in_features of every targeted layer (n=1 is plain LoRA)."},
    )

    def validate(self) -> None:
        super().validate()
        if self.blocks < 1:
            raise ConfigError(f"block_lora: key 'blocks' must be >= 1, got {self.blocks}")
        if self.freeze_a:
            raise ConfigError("block_lora: key 'freeze_a' is not supported (the shared block is the method)")

    def build(self, in_features: int, out_features: int, base_weight: torch.Tensor) -> BlockLoRA:
        if in_features % self.blocks:
            raise ConfigError(
                f"block_lora: key 'blocks'={self.blocks} must divide in_features={in_features} of every "
                f"targeted layer (layer of shape out={out_features}, in={in_features})"
            )
        dtype = base_weight.dtype if base_weight.is_floating_point() else torch.float32
        return BlockLoRA(self, in_features, out_features, dtype=dtype, device=base_weight.device)


class BlockLoRA(Adapter):
    def __init__(
        self, config: BlockLoRAConfig, in_features: int, out_features: int, *, dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.blocks = config.blocks
        self.scaling = config.scaling
        # lora_A is the shared block A_0 (r x in/n); lora_B is the whole up-projection, all row blocks.
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features // config.blocks, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r, dtype=dtype, device=device))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        if config.init == "kaiming":
            # Same bound as LoRA's A over the full input: A_0 x_sum sees n chunks, like A x sees all of x.
            bound = 1.0 / math.sqrt(in_features)
            nn.init.uniform_(self.lora_A, -bound, bound)
        else:
            nn.init.normal_(self.lora_A, std=1.0 / config.r)

    def extra_repr(self) -> str:
        r, chunk = self.lora_A.shape
        return f"r={r}, blocks={self.blocks}, in={chunk * self.blocks}, out={self.lora_B.shape[0]}"

    def _summed_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """x_1 + ... + x_n: the n - 1 additions that replace n down-projection matmuls."""
        if x.dtype != self.lora_A.dtype:
            x = x.to(self.lora_A.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        if self.blocks == 1:
            return x
        return x.unflatten(-1, (self.blocks, -1)).sum(dim=-2)

    def forward(self, x: torch.Tensor, out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        # B (A_0 x_sum) is LoRA's shape on the summed chunks: one fused node (add_low_rank_), as LoRA.
        return add_low_rank_(out, self._summed_chunks(x), self.lora_A, self.lora_B, self.scaling)

    def delta(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return F.linear(F.linear(self._summed_chunks(x), self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        # B [A_0 ... A_0]: the shared block repeated along the input dimension.
        return (self.lora_B @ self.lora_A.repeat(1, self.blocks)) * self.scaling


def block_lora_cost(tokens: int, in_features: int, out_features: int, r: int, blocks: int) -> dict[str, int]:
    """Analytic forward cost of one Block-LoRA update over ``tokens`` rows (scaling and dropout excluded).

    ``matmul_flops`` counts 2 flops per multiply-accumulate, as ``torch.utils.flop_counter`` does;
    ``additions`` are the chunk sums; ``params`` the trainable count.
    """
    chunk = in_features // blocks
    return {
        "matmul_flops": 2 * tokens * r * (chunk + out_features),
        "additions": tokens * (blocks - 1) * chunk,
        "params": r * (chunk + out_features),
    }


def lora_cost(tokens: int, in_features: int, out_features: int, r: int) -> dict[str, int]:
    """The same count for plain LoRA of rank ``r`` (Block-LoRA with one block)."""
    return block_lora_cost(tokens, in_features, out_features, r, blocks=1)
