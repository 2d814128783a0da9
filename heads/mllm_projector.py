"""The vision-to-language projector of a LLaVA-style MLLM: vision-tower tokens -> LLM embedding width.

LLaVA (Liu et al., 2023) used one linear layer; LLaVA-1.5 a two-layer MLP with a GELU ("mlp2x_gelu"),
which LLaVA-MoLE and Arcana keep. It is the part trained alone in the first stage (feature alignment,
with the vision tower and the LLM frozen) and trained again beside the LLM's adapters in the second.
"""

from __future__ import annotations

import re

import torch
from torch import nn

KINDS = ("linear", "mlp2x_gelu")


def build_projector(kind: str, vision_width: int, llm_width: int) -> nn.Module:
    """'linear' or 'mlp<N>x_gelu' (N linear layers with GELUs between, LLaVA's naming)."""
    if kind == "linear":
        return nn.Linear(vision_width, llm_width)
    found = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if found is None or int(found.group(1)) < 1:
        raise ValueError(f"projector kind {kind!r}: expected 'linear' or 'mlp<N>x_gelu' (e.g. {KINDS[1]!r})")
    layers: list[nn.Module] = [nn.Linear(vision_width, llm_width)]
    for _ in range(int(found.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(llm_width, llm_width)]
    return nn.Sequential(*layers)


class MLLMProjector(nn.Module):
    """(batch, tokens, vision_width) -> (batch, tokens, llm_width)."""

    def __init__(self, kind: str, vision_width: int, llm_width: int) -> None:
        super().__init__()
        self.kind, self.vision_width, self.llm_width = kind, vision_width, llm_width
        self.net = build_projector(kind, vision_width, llm_width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[-1] != self.vision_width:
            raise ValueError(f"projector expects vision tokens of width {self.vision_width}, got shape "
                             f"{tuple(tokens.shape)}")
        return self.net(tokens)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, {self.vision_width} -> {self.llm_width}"
