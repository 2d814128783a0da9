"""MoLE (LLaVA-MoLE, Chen et al., 2024): a sparse mixture of LoRA experts on the MLP, top-1 routing per token.

Every projection of an MLP block (gate/up/down, or c_fc/c_proj) gets E LoRA experts; one router per block
sends each token to a single expert, whose LoRAs it then uses in all of the block's projections, so the
compute per token stays that of one LoRA. The router, dispatch, balance loss and MoLA per-layer expert
counts live in ``mm.adapters.moe``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from mm.adapters.base import ADAPTERS
from mm.adapters.moe import MixtureConfig


@ADAPTERS.register("mole")
@dataclass
class MoLEConfig(MixtureConfig):
    """MoLE: LoRA experts on the MLP, each token routed to its top-1 expert (LLaVA-MoLE)."""

    method: ClassVar[str] = "mole"
    top_k: ClassVar[int] = 1

    scale_by_gate: bool = field(
        default=True,
        metadata={"help": "Scale the chosen expert's update by its router probability (Switch-style, so the "
                  "task loss trains the router); False applies it at full strength and the router learns "
                  "from the balance loss alone."},
    )

    @property
    def renormalize(self) -> bool:
        # With one choice, renormalised gates are all 1: the expert applies at full strength.
        return not self.scale_by_gate
