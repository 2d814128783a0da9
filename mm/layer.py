"""``AdaptedLinear``: a frozen linear-like layer plus named adapters whose updates add to its output.

``AdaptedConv`` is the same for a ``nn.Conv1d/2d/3d``; it subclasses ``AdaptedLinear`` so every consumer of
adapted layers (save/load, merge, routing, reports) handles both: read ``AdaptedLinear`` as "an adapted layer".
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from mm.adapters.base import Adapter
from mm.batched import forward_rows
from mm.conv import describe_conv
from mm.quant import dequantise_linear, dequantised_weight, is_quantised_linear, quantised_kind
from mm.route import Route, current_route


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 style: weight stored (in, out)), detected without importing it."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like layer."""
    if is_conv1d(module):
        in_features, out_features = module.weight.shape
        return int(in_features), int(out_features)
    return int(module.in_features), int(module.out_features)


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The layer's weight as an (out, in) tensor that shares storage with it (in-place edits reach it).

    A convolution's weight comes as it is, (out, in/groups, *kernel): its adapters' deltas have that shape.

    A bitsandbytes 4/8-bit layer stores packed integers: it gets a dequantised float copy instead, which
    in-place edits do not reach (``AdaptedLinear.merge`` dequantises such a layer before merging).
    """
    if is_quantised_linear(module):
        return dequantised_weight(module)
    return module.weight.T if is_conv1d(module) else module.weight


class AdaptedLinear(nn.Module):
    """``base(x) + sum(adapter(x) for active, unmerged adapters)``.

    Merged adapters live inside ``base``'s weight; ``disabled`` runs the base alone (refused while
    something is merged, since the base weight then already carries the update).
    """

    #: The layer kind adapters must support to attach here (``mm.conv.supports_layer_kind``).
    kind = "linear"

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = self.features_of(base)
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.merged: list[str] = []
        # The exact update merged by adapters whose update depends on the base weight itself (DoRA rescales
        # W): recomputing it from the merged weight would divide by m/n and lose precision where m is small.
        self.merged_deltas: dict[str, torch.Tensor] = {}
        self.disabled = False

    # Code that inspects layers (dtype checks in open_clip, transformers) expects these attributes.
    @staticmethod
    def features_of(base: nn.Module) -> tuple[int, int]:
        return linear_features(base)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            if self.merged:
                raise RuntimeError(f"cannot disable adapters {self.merged}: they are merged; unmerge first")
            return self.base(x, *args, **kwargs)
        route = current_route()
        if route is not None and route.pool is not None:
            return route.pool.add_rows(self, x, self.base(x, *args, **kwargs), route.row_slots)
        if route is not None and route.row_adapters is not None:
            return self._forward_rows(x, self.base(x, *args, **kwargs), route)
        adapters = [self.adapters[name] for name in self.active if name not in self.merged]
        folding = [a for a in adapters if a.folds_input]
        if folding:  # whole-FFN mixtures: (..., k, in) rows -> their gate-weighted sum, before the base
            x = type(folding[0]).fold(x, folding)
        out = self.base(x, *args, **kwargs)
        # Expanding adapters add a k axis, so every same-shape update goes in before them; adapters that
        # rescale what they receive (DoRA) go first, so they rescale the base output, not other updates.
        for adapter in sorted(adapters, key=lambda a: (a.expands_output, not getattr(a, "rescales_output", False))):
            out = adapter(x, out, self.base)
        return out

    def _forward_rows(self, x: torch.Tensor, out: torch.Tensor, route: Route) -> torch.Tensor:
        """Heterogeneous batch: row i gets only adapter ``row_adapters[i]``: through the gathered kernel
        (``mm.batched``) where every adapter used is ``s B A x``, else grouped so each adapter runs once."""
        row_adapters = route.row_adapters
        if len(row_adapters) != x.shape[0]:
            raise ValueError(f"route gives adapters for {len(row_adapters)} rows, the batch has {x.shape[0]}")
        if self.merged:
            raise RuntimeError(f"per-row adapters need unmerged adapters; {self.merged} are merged")
        if any(name in self.adapters and (self.adapters[name].expands_output or self.adapters[name].folds_input)
               for name in set(row_adapters)):
            raise ValueError("per-row adapters cannot route a batch through a whole-FFN mixture (top_k > 1 with "
                             "router_scope='block'); use router_scope='layer' or one adapter for the whole batch")
        if route.gathered:
            gathered = forward_rows(self, x, out, row_adapters, route.cache)
            if gathered is not None:
                return gathered
        for name in dict.fromkeys(n for n in row_adapters if n is not None):
            if name not in self.adapters:
                continue  # this layer is not adapted by that adapter: its rows keep the base output
            rows = torch.tensor([i for i, n in enumerate(row_adapters) if n == name], device=x.device)
            # out[rows] is a copy, so the adapter may add into it in place.
            out = out.index_copy(0, rows, self.adapters[name](x[rows], out[rows], self.base))
        return out

    def add(self, name: str, adapter: Adapter, *, active: bool = True) -> None:
        if name in self.adapters:
            raise KeyError(f"adapter {name!r} already exists on this layer")
        self.adapters[name] = adapter
        if active:
            self.active = (*self.active, name)

    def remove(self, name: str) -> None:
        if name in self.merged:
            self.unmerge([name])
        self.adapters[name].release(self.base)
        del self.adapters[name]
        self.active = tuple(n for n in self.active if n != name)

    def set_active(self, names: Iterable[str]) -> None:
        self.active = tuple(n for n in names if n in self.adapters)

    @torch.no_grad()
    def merge(self, names: Iterable[str]) -> None:
        names = [n for n in names if n in self.adapters and n not in self.merged]
        if names and is_quantised_linear(self.base):
            # Adding a float update to packed integers is meaningless: make the base a float layer first.
            kind = quantised_kind(self.base)
            self.base = dequantise_linear(self.base)
            warnings.warn(f"merging {names} into a {kind} quantised layer: dequantised it to "
                          f"{self.base.weight.dtype} first; the merged layer is no longer quantised", stacklevel=3)
        weight = weight_out_in(self.base)
        for name in names:
            if name in self.adapters and name not in self.merged:
                adapter = self.adapters[name]
                delta = adapter.delta_weight(self.base).to(weight.dtype)
                if getattr(adapter, "rescales_output", False):
                    self.merged_deltas[name] = delta
                weight.add_(delta)
                self.merged.append(name)

    @torch.no_grad()
    def unmerge(self, names: Iterable[str] | None = None) -> None:
        weight = weight_out_in(self.base)
        wanted = None if names is None else set(names)
        for name in reversed([n for n in self.merged if wanted is None or n in wanted]):  # last merged first
            delta = self.merged_deltas.pop(name, None)
            weight.sub_(self.adapters[name].delta_weight(self.base).to(weight.dtype) if delta is None else delta)
            self.merged.remove(name)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, active={list(self.active)}"


class AdaptedConv(AdaptedLinear):
    """A frozen convolution plus named adapters: the same adapter dictionary, routing, merge and disable as
    ``AdaptedLinear`` (merging adds each adapter's grouped kernel ``delta_weight`` into the layer's weight)."""

    kind = "conv"

    @staticmethod
    def features_of(base: nn.Module) -> tuple[int, int]:
        return int(base.in_channels), int(base.out_channels)

    # Code that inspects convolutions (shape checks, weight surgery) reads these from the layer itself.
    @property
    def in_channels(self) -> int:
        return self.base.in_channels

    @property
    def out_channels(self) -> int:
        return self.base.out_channels

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self.base.kernel_size

    @property
    def stride(self) -> tuple[int, ...]:
        return self.base.stride

    @property
    def padding(self) -> tuple[int, ...] | str:
        return self.base.padding

    @property
    def dilation(self) -> tuple[int, ...]:
        return self.base.dilation

    @property
    def groups(self) -> int:
        return self.base.groups

    def extra_repr(self) -> str:
        return f"{describe_conv(self.base)}, active={list(self.active)}"


class AdaptedEmbedding(AdaptedLinear):
    """A frozen ``nn.Embedding`` plus named adapters (``mm.embedding``): the same adapter dictionary, routing,
    merge and disable as ``AdaptedLinear``; adapters receive the token ids and merge into the lookup table."""

    kind = "embedding"

    @staticmethod
    def features_of(base: nn.Module) -> tuple[int, int]:
        return int(base.num_embeddings), int(base.embedding_dim)

    # transformers reads these from whatever get_input_embeddings() returns.
    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def padding_idx(self) -> int | None:
        return self.base.padding_idx

    def extra_repr(self) -> str:
        return f"num_embeddings={self.in_features}, dim={self.out_features}, active={list(self.active)}"
