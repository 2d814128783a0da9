"""The per-forward routing context: facts about the current batch that adapters deep inside a backbone
need, passed without editing the backbone's code (a ``contextvars`` value, so threads and async tasks
each see their own).

- ``row_adapters``: which adapter each row of the batch uses (heterogeneous batching, as S-LoRA serves
  many adapters in one batch). ``None`` for a row means the base model alone. Adapters whose update is
  ``s B A x`` run through the gathered kernel (``mm.batched``): one batched computation for the whole
  batch; others, or ``gathered=False``, loop over the batch's adapters (the reference).
- ``token_masks``: named boolean masks over (batch, tokens), e.g. ``{"vision": ..., "language": ...}``
  for MM-LoRA's modality-specific adapters.
- ``scale``: the active Matryoshka compression setting (Llama-MTSK), by name.
- ``pool`` / ``row_slots``: set by ``mm.AdapterPool.route``: each row's slot in the pool's device stacks.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Route:
    row_adapters: tuple[str | None, ...] | None = None
    token_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    scale: str | None = None
    gathered: bool = True
    pool: Any = None
    row_slots: torch.Tensor | None = None
    #: What every layer of this forward would recompute alike (each layer's slot per row), kept once.
    cache: dict = field(default_factory=dict, compare=False, repr=False)


_CURRENT: contextvars.ContextVar[Route | None] = contextvars.ContextVar("mm_route", default=None)


def current_route() -> Route | None:
    return _CURRENT.get()


@contextlib.contextmanager
def route(
    *, row_adapters: Sequence[str | None] | None = None, token_masks: dict[str, torch.Tensor] | None = None,
    scale: str | None = None, gathered: bool = True, pool: Any = None, row_slots: torch.Tensor | None = None,
) -> Iterator[Route]:
    """Set the routing facts for the forward passes run inside the block (nested blocks override)."""
    value = Route(
        row_adapters=None if row_adapters is None else tuple(row_adapters),
        token_masks=dict(token_masks or {}), scale=scale, gathered=gathered, pool=pool, row_slots=row_slots,
    )
    token = _CURRENT.set(value)
    try:
        yield value
    finally:
        _CURRENT.reset(token)
