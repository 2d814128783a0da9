"""MoS, Mixture of Shards (Wang et al., ICLR 2025): LoRA factors assembled from shards of global pools.

Every rank vector of A (a row, ``in`` long) and of B (a column, ``out`` long) is cut into l shards
(vector sharding; when l does not divide the length, shards are ceil(len / l) long and the concatenated
vector is cut back to its length). Each layer builds its r x l shard slots per factor by retrieving shards by index
(the fixed, randomly drawn index matrix of the paper's MoE-like router) from:

- a global pool shared by every layer of the adapter whose shards have that length (inter-layer sharing,
  subset selection: a layer uses r l - p distinct shards of the pool), and
- p private shards that belong to the layer alone (shard privatization).

A and B draw from separate pools with separate indices (pair dissociation), so the k-th row of A and
the k-th column of B are not tied to one shared pair. The result is plain LoRA algebra: delta W =
(alpha / r) B A, mergeable. A pool shard is one tensor used by several layers, so its gradient is the
sum of what every layer that selected it contributes.

Pools live in one ``ShardPool`` module per (factor, shard length), registered under the first layer
built with it (so a checkpoint stores each pool once) and referenced, unregistered, by the other layers.
The config object remembers the pools of the attach in progress; seeing a layer name a second time
means a new attach (a second adapter from the same config), which starts fresh pools. Routing indices
and private shards are seeded by (seed, layer name), so they do not depend on the attach order.
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


@ADAPTERS.register("mos")
@dataclass
class MoSConfig(AdapterConfig):
    """MoS: LoRA factors retrieved shard by shard from pools shared across layers (plus private shards)."""

    method: ClassVar[str] = "mos"

    shards_per_vector: int = field(
        default=2, metadata={"help": "l: each rank vector of A and B is cut into l shards (vector sharding)."}
    )
    pool_shards: int = field(
        default=32,
        metadata={"help": "Shards in each global pool (one pool per factor and shard length), shared by all "
                  "layers; each layer selects r*l - private_shards distinct ones (subset selection)."},
    )
    private_shards: int = field(
        default=2, metadata={"help": "p: shards per factor owned by each layer alone (shard privatization)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the routing indices and of the initial shards."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self._pools: dict[tuple[str, int], ShardPool] = {}
        self._seen_layers: set[str] = set()
        self._unnamed = itertools.count()

    def validate(self) -> None:
        super().validate()
        slots = self.r * self.shards_per_vector
        if self.shards_per_vector < 1:
            raise ConfigError(f"mos: key 'shards_per_vector' must be >= 1, got {self.shards_per_vector}")
        if not 0 <= self.private_shards <= slots:
            raise ConfigError(f"mos: key 'private_shards' must be in [0, r*shards_per_vector={slots}], "
                              f"got {self.private_shards}")
        if self.pool_shards < slots - self.private_shards:
            raise ConfigError(f"mos: key 'pool_shards'={self.pool_shards} is too small: each layer selects "
                              f"r*shards_per_vector - private_shards = {slots - self.private_shards} distinct shards")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def _pool(self, factor: str, shard_len: int, dtype: torch.dtype, device: torch.device) -> tuple[ShardPool, bool]:
        """The pool for (factor, shard length) of the attach in progress; True if created just now."""
        key = (factor, shard_len)
        if key in self._pools:
            return self._pools[key], False
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + len(self._pools))
        init = _kaiming_like(self.pool_shards, shard_len, gen, self.shards_per_vector) if factor == "A" else None
        pool = ShardPool(self.pool_shards, shard_len, init, dtype=dtype, device=device)
        self._pools[key] = pool
        return pool, True

    def build(self, in_features: int, out_features: int, base_weight: torch.Tensor) -> MoS:
        return self.build_for(f"#{next(self._unnamed)}", in_features, out_features, base_weight)

    def build_for(self, layer_name: str, in_features: int, out_features: int, base_weight: torch.Tensor) -> MoS:
        if layer_name in self._seen_layers:  # this layer was built before: a new adapter, new pools
            self._pools, self._seen_layers = {}, set()
        self._seen_layers.add(layer_name)
        dtype = base_weight.dtype if base_weight.is_floating_point() else torch.float32
        device = base_weight.device
        pool_a, own_a = self._pool("A", shard_length(in_features, self.shards_per_vector), dtype, device)
        pool_b, own_b = self._pool("B", shard_length(out_features, self.shards_per_vector), dtype, device)
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + zlib.crc32(layer_name.encode()))
        return MoS(self, in_features, out_features, (pool_a, pool_b), (own_a, own_b), gen, dtype=dtype,
                   device=device)


def shard_length(size: int, shards_per_vector: int) -> int:
    """ceil(size / l): a vector whose length l does not divide is cut after concatenation (last shard padded)."""
    return -(-size // shards_per_vector)


class ShardPool(nn.Module):
    """A global pool of shards, (n, shard_len). A's shards start like LoRA's kaiming A, B's at zero."""

    def __init__(self, n: int, shard_len: int, init: torch.Tensor | None, *, dtype, device) -> None:
        super().__init__()
        self.shards = nn.Parameter(torch.zeros(n, shard_len, dtype=dtype, device=device))
        if init is not None:
            with torch.no_grad():
                self.shards.copy_(init)

    def extra_repr(self) -> str:
        return f"shards={self.shards.shape[0]}, shard_len={self.shards.shape[1]}"


def _kaiming_like(n: int, shard_len: int, gen: torch.Generator, shards_per_vector: int) -> torch.Tensor:
    # LoRA's kaiming-uniform A has bound 1/sqrt(in); a shard is 1/l of a row, in = l * shard_len.
    bound = 1.0 / math.sqrt(shard_len * shards_per_vector)
    return torch.empty(n, shard_len).uniform_(-bound, bound, generator=gen)


def _routing_index(slots: int, pool: int, private: int, gen: torch.Generator) -> torch.Tensor:
    """Index of each of ``slots`` positions into [pool shards; private shards].

    Every private shard appears once; the other slots take distinct pool shards (subset selection);
    positions are shuffled so private shards land anywhere in the matrix.
    """
    public = torch.randperm(pool, generator=gen)[: slots - private]
    index = torch.cat([public, pool + torch.arange(private)])
    return index[torch.randperm(slots, generator=gen)]


class MoS(FactoredLoRA):
    def __init__(
        self, config: MoSConfig, in_features: int, out_features: int, pools: tuple[ShardPool, ShardPool],
        owned: tuple[bool, bool], gen: torch.Generator, *, dtype: torch.dtype, device: torch.device,
    ) -> None:
        super().__init__()
        self.r, self.l_shards, self.scaling = config.r, config.shards_per_vector, config.scaling
        self.in_features, self.out_features = in_features, out_features
        (pool_a, pool_b), (own_a, own_b) = pools, owned
        slots, private = config.r * config.shards_per_vector, config.private_shards
        # The first layer with a pool registers it (saved once, under this layer); the rest only point to it.
        if own_a:
            self.pool_a = pool_a
        if own_b:
            self.pool_b = pool_b
        self._pools = (pool_a, pool_b)  # a tuple is not registered: no duplicate parameters or state
        len_a, len_b = pool_a.shards.shape[1], pool_b.shards.shape[1]
        self.private_a = nn.Parameter(_kaiming_like(private, len_a, gen, config.shards_per_vector).to(device, dtype))
        self.private_b = nn.Parameter(torch.zeros(private, len_b, dtype=dtype, device=device))
        # Fixed routing (the index matrices): saved, so a reload retrieves the very same shards.
        self.register_buffer("index_a", _routing_index(slots, config.pool_shards, private, gen).to(device))
        self.register_buffer("index_b", _routing_index(slots, config.pool_shards, private, gen).to(device))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None

    def extra_repr(self) -> str:
        return f"r={self.r}, shards_per_vector={self.l_shards}, private={self.private_a.shape[0]}"

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B), (r, in) and (out, r): shards gathered by index and concatenated along each vector."""
        pool_a, pool_b = self._pools
        shards_a = torch.cat([pool_a.shards, self.private_a])[self.index_a]  # (r*l, ceil(in/l))
        shards_b = torch.cat([pool_b.shards, self.private_b])[self.index_b]  # (r*l, ceil(out/l))
        lora_a = shards_a.reshape(self.r, -1)[:, : self.in_features]
        lora_b = shards_b.reshape(self.r, -1)[:, : self.out_features].T
        return lora_a, lora_b


def mos_trainable_params(config: MoSConfig, shapes: list[tuple[int, int]]) -> int:
    """Trainable count of MoS on layers of ``shapes`` [(in, out), ...]: pools once, private shards per layer."""
    l_shards = config.shards_per_vector
    pool_lengths = ({("A", shard_length(i, l_shards)) for i, _ in shapes}
                    | {("B", shard_length(o, l_shards)) for _, o in shapes})
    pools = sum(config.pool_shards * length for _, length in pool_lengths)
    private = sum(config.private_shards * (shard_length(i, l_shards) + shard_length(o, l_shards)) for i, o in shapes)
    return pools + private
