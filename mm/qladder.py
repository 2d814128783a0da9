"""QLadder (Arcana, Sun et al., 2024): learnable queries climbing a ladder beside a frozen encoder.

A set of learnable query tokens X_q (``num_queries`` x width) passes through one ladder layer per tapped
encoder block. Ladder layer i lets the queries cross-attend to the *input* hidden states of encoder block
i (the embeddings for i = 0), so the queries aggregate the encoder's intermediate representations layer by
layer while the encoder itself stays frozen and computes exactly what it did before:

    q_0 = X_q
    q_{i+1} = q_i' + MLP(LN_2(q_i')),   q_i' = q_i + CrossAttn(LN_0(q_i), LN_1(h_i))

This follows the public Arcana code (``LadderCLIPEncoderLayer``: pre-norm cross-attention with its own
q/k/v/out projections at the encoder's width, then a pre-norm MLP, both residual; 64 queries drawn from
a standard normal; one ladder layer per encoder layer). Arcana hands the ladder tokens to an LLM beside
the patch tokens; for a pooled-feature model (CLIP classification) ``fuse`` adds the pooled ladder
feature to the frozen feature through a scalar gate that starts at 0, so training starts from the frozen
model's outputs exactly.

The module is backbone-agnostic: it takes the list of hidden states (batch, tokens, width); the encoder
package decides how to tap them (``encoders.clip`` uses forward pre-hooks on the vision blocks).
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mm.config import ConfigError, _type_ok

FORMAT = "mmtune.qladder"


@dataclass
class QLadderConfig:
    """QLadder: learnable queries that cross-attend, layer by layer, to a frozen encoder's hidden states."""

    num_queries: int = field(default=64, metadata={"help": "Number of learnable query tokens (Arcana: 64)."})
    mlp_ratio: float = field(
        default=4.0, metadata={"help": "Hidden width of each ladder layer's MLP, as a multiple of the width."}
    )
    heads: int | None = field(
        default=None, metadata={"help": "Attention heads of the ladder (None: the encoder's head count)."}
    )
    layers: list[int] | None = field(
        default=None,
        metadata={"help": "Encoder blocks whose input the ladder reads, one ladder layer each (None: all)."},
    )
    select_layer: int = field(
        default=-1, metadata={"help": "Which ladder layer's queries form the output (-1: the last)."}
    )

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _type_ok(value, hints[f.name]):
                raise ConfigError(f"qladder: key {f.name!r} expects {hints[f.name]}, got {value!r}")
        if self.num_queries < 1:
            raise ConfigError(f"qladder: key 'num_queries' must be >= 1, got {self.num_queries}")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"qladder: key 'mlp_ratio' must be > 0, got {self.mlp_ratio}")
        if self.heads is not None and self.heads < 1:
            raise ConfigError(f"qladder: key 'heads' must be >= 1, got {self.heads}")
        if self.layers is not None and not self.layers:
            raise ConfigError("qladder: key 'layers' must list at least one encoder block (or be null: all)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "qladder config") -> QLadderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))} for qladder; "
                              f"known keys: {', '.join(sorted(known))}")
        try:
            return cls(**data)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None


class LadderLayer(nn.Module):
    """Pre-norm cross-attention of the queries to one encoder layer's tokens, then a pre-norm MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln_query, self.ln_tokens, self.ln_mlp = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        # Named to_* (not q_proj...) so LoRA targets aimed at the encoder's attention never land here.
        self.to_q, self.to_k = nn.Linear(width, width), nn.Linear(width, width)
        self.to_v, self.to_out = nn.Linear(width, width), nn.Linear(width, width)
        hidden = max(1, int(width * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        return x.view(n, length, self.heads, width // self.heads).transpose(1, 2)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        q_in, kv_in = self.ln_query(queries), self.ln_tokens(tokens.to(queries.dtype))
        q, k, v = self._split(self.to_q(q_in)), self._split(self.to_k(kv_in)), self._split(self.to_v(kv_in))
        attended = F.scaled_dot_product_attention(q, k, v)
        attended = attended.transpose(1, 2).reshape(queries.shape)
        queries = queries + self.to_out(attended)
        return queries + self.mlp(self.ln_mlp(queries))


class QLadder(nn.Module):
    """The ladder for an encoder of ``depth`` blocks of width ``width`` (see the module docstring)."""

    def __init__(self, config: QLadderConfig, *, width: int, depth: int, heads: int) -> None:
        super().__init__()
        heads = config.heads or heads
        if width % heads:
            raise ConfigError(f"qladder: width {width} is not divisible by heads={heads}")
        taps = list(range(depth)) if config.layers is None else list(config.layers)
        bad = [i for i in taps if not 0 <= i < depth]
        if bad or len(set(taps)) != len(taps) or taps != sorted(taps):
            raise ConfigError(f"qladder: key 'layers' must be distinct increasing block indices in "
                              f"[0, {depth}), got {config.layers}")
        if not -len(taps) <= config.select_layer < len(taps):
            raise ConfigError(f"qladder: key 'select_layer'={config.select_layer} is outside the "
                              f"{len(taps)} ladder layers")
        self.config, self.width, self.depth, self.heads, self.taps = config, width, depth, heads, taps
        self.queries = nn.Parameter(torch.randn(1, config.num_queries, width))
        self.ladder = nn.ModuleList(LadderLayer(width, heads, config.mlp_ratio) for _ in taps)
        # Output gate: 0 at init, so the fused feature starts as the frozen encoder's feature.
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, hidden_states: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Query states after every ladder layer; ``hidden_states[i]`` is the input of encoder block i."""
        if len(hidden_states) != self.depth:
            raise ValueError(f"QLadder expects the inputs of all {self.depth} encoder blocks, "
                             f"got {len(hidden_states)} hidden states")
        queries = self.queries.expand(hidden_states[0].shape[0], -1, -1)
        states = []
        for layer, tap in zip(self.ladder, self.taps, strict=True):
            queries = layer(queries, hidden_states[tap])
            states.append(queries)
        return states

    def output(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """The selected ladder layer's queries, (batch, num_queries, width)."""
        return self(hidden_states)[self.config.select_layer]

    def fuse(self, frozen_feature: torch.Tensor, ladder_feature: torch.Tensor) -> torch.Tensor:
        """``frozen + gate * ladder``: equal to the frozen feature while the gate is 0."""
        return frozen_feature + self.gate.to(frozen_feature.dtype) * ladder_feature.to(frozen_feature.dtype)

    def extra_repr(self) -> str:
        return f"queries={self.config.num_queries}, width={self.width}, taps={self.taps}"


def save_qladder(ladder: QLadder, path: str | os.PathLike) -> Path:
    """One safetensors file: the ladder's tensors, its config and shape in the metadata; written atomically."""
    from safetensors.torch import save_file

    from mm.state import atomic_write

    metadata = {"format": FORMAT, "config": json.dumps(ladder.config.to_dict()),
                "width": str(ladder.width), "depth": str(ladder.depth), "heads": str(ladder.heads)}
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in ladder.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_qladder(path: str | os.PathLike) -> QLadder:
    """Rebuild a ladder saved by ``save_qladder``; errors name the file and what does not fit."""
    from mm.state import read_tagged_safetensors

    path = Path(path)
    metadata, tensors = read_tagged_safetensors(path, FORMAT, what="QLadder")
    config = QLadderConfig.from_dict(json.loads(metadata["config"]), source=str(path))
    ladder = QLadder(config, width=int(metadata["width"]), depth=int(metadata["depth"]),
                     heads=int(metadata["heads"]))
    missing = sorted(set(ladder.state_dict()) - set(tensors))
    unexpected = sorted(set(tensors) - set(ladder.state_dict()))
    if missing or unexpected:
        raise ValueError(f"{path}: QLadder tensors do not fit its config; missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    ladder.load_state_dict(tensors)
    return ladder
