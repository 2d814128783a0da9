"""Token compression and projection into an LLM's embedding space (the AVSR track's modality adapters).

Encoders emit many frames (Whisper: 50 per second, lip front end: 25); Llama-AVSR / Llama-MTSK shorten
them by a compression *rate* before the LLM, either by averaging every ``rate`` consecutive frames
(``avg``) or by concatenating them into one wider token (``stack``), then map each token to the LLM
width with a two-layer MLP. Llama-MTSK compresses at several rates and gives each rate its own projector
(its Fig. 1: only the projector of the chosen rate runs at inference); ``shared=True`` uses one projector
for every rate instead (average pooling only: stacking changes the token width with the rate).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

CompressionMode = Literal["avg", "stack"]


def compress_tokens(tokens: torch.Tensor, lengths: torch.Tensor, rate: int,
                    mode: CompressionMode = "avg") -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, D) frames with valid ``lengths`` -> (B, ceil(T / rate), D or D * rate) tokens and their lengths.

    ``avg`` averages the valid frames of each group (a clip's last, partial group averages what it has);
    ``stack`` concatenates each group's frames, zeros past the clip's end. A clip of n frames gives
    ceil(n / rate) tokens either way.
    """
    if rate < 1:
        raise ValueError(f"compression rate must be >= 1, got {rate}")
    if mode not in ("avg", "stack"):
        raise ValueError(f"compression mode must be 'avg' or 'stack', got {mode!r}")
    batch, time, dim = tokens.shape
    groups = -(-time // rate)
    valid = (torch.arange(groups * rate, device=tokens.device)[None] < lengths[:, None]).to(tokens.dtype)
    padded = nn.functional.pad(tokens, (0, 0, 0, groups * rate - time)) * valid[..., None]
    new_lengths = (lengths + rate - 1) // rate
    if mode == "stack":
        return padded.reshape(batch, groups, rate * dim), new_lengths
    counts = valid.view(batch, groups, rate).sum(-1, keepdim=True).clamp_min(1.0)
    return padded.view(batch, groups, rate, dim).sum(2) / counts, new_lengths


class Projector(nn.Sequential):
    """Linear -> ReLU -> Linear, as Llama-AVSR's modality projectors."""

    def __init__(self, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))


class MultiRateProjector(nn.Module):
    """Compress one modality's frames at any of ``rates`` and project to ``out_features``.

    ``forward(frames, lengths, rate) -> (tokens (B, T', out_features), lengths)``; projectors are kept in
    ``projectors[str(rate)]`` (or one shared ``projectors["shared"]``).
    """

    def __init__(self, in_features: int, out_features: int, rates: list[int], *, hidden: int,
                 mode: CompressionMode = "avg", shared: bool = False) -> None:
        super().__init__()
        if not rates or len(set(rates)) != len(rates) or min(rates) < 1:
            raise ValueError(f"rates must be distinct positive integers, got {rates}")
        if shared and mode == "stack":
            raise ValueError("a shared projector needs mode 'avg': stacking makes the token width depend on the rate")
        self.rates, self.mode, self.shared = list(rates), mode, shared
        width = {rate: in_features * (rate if mode == "stack" else 1) for rate in rates}
        keys = ["shared"] if shared else [str(r) for r in rates]
        self.projectors = nn.ModuleDict({
            key: Projector(width[rates[0]] if shared else width[int(key)], hidden, out_features) for key in keys})

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor, rate: int) -> tuple[torch.Tensor, torch.Tensor]:
        if rate not in self.rates:
            raise KeyError(f"compression rate {rate} is not one of this projector's rates {self.rates}")
        tokens, lengths = compress_tokens(frames, lengths, rate, self.mode)
        projector = self.projectors["shared" if self.shared else str(rate)]
        return projector(tokens), lengths
