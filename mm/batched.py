"""The gathered heterogeneous-batch kernel: every row of a batch adds its own adapter's ``s B A x`` in one
batched computation (the BGMV idea of Punica and S-LoRA), with no Python loop over adapters at compute time
and no host sync.

Adapters whose update is ``s B A x`` (LoRA, rsLoRA, EVA, PiSSA / LoRA-GA once synced, LoRA-XS / LoRA-SB as
``B (R A)``, NOLA and MoS once their factors are assembled) are stacked into ``A: (n + 1, r_max, in)`` with the
scaling folded in and ``B: (n + 1, out, r_max)``; ranks are zero-padded to ``r_max`` and slot ``n`` is all
zeros (rows with no adapter). Each row gathers its slot and two ``bmm`` compute the update. Gradients flow
through the gather and the stacking, so each adapter receives gradients from its own rows only.

On CPU the per-row gather + ``bmm`` beat sorting rows by adapter: a segmented matmul without a Python loop
needs the segment lengths on the host (a sync), and torch has no CPU grouped matmul.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

Factors = tuple[torch.Tensor, torch.Tensor, float]


def low_rank_factors(adapter: nn.Module) -> Factors | None:
    """``(A (r, in), B (out, r), scaling)`` with update ``scaling * B A x``, or None where the adapter's update
    is not of that form right now (other methods, convolutions, a PiSSA whose base is not yet synced)."""
    from mm.adapters.base import FactoredLoRA
    from mm.adapters.eva import EVALoRA
    from mm.adapters.lora import LoRA
    from mm.adapters.lora_sb import LoRASB
    from mm.adapters.lora_xs import LoRAXS
    from mm.adapters.pissa import ResidualLoRA

    kind = type(adapter)
    if kind is LoRA:
        return adapter.lora_A, adapter.lora_B, adapter.scaling
    if kind is EVALoRA:
        usable = adapter.ready and not adapter.calibrating and adapter.lora_A.shape[0] > 0
        return (adapter.lora_A, adapter.lora_B, adapter.scaling) if usable else None
    if kind is ResidualLoRA:
        # Only once the base holds its residual for the current buffers (else forward must correct the base).
        if adapter.calibrating or adapter._seen != adapter._versions():
            return None
        if adapter.residual == "base":
            return adapter.lora_A, adapter.lora_B, adapter.scaling
        return (torch.cat([adapter.lora_A, adapter.init_A]), torch.cat([adapter.lora_B, -adapter.init_B], dim=1),
                adapter.scaling)
    if kind is LoRAXS or (kind is LoRASB and bool(adapter.ready)):
        return adapter.lora_R @ adapter.lora_A, adapter.lora_B, adapter.scaling
    if isinstance(adapter, FactoredLoRA):
        lora_a, lora_b = adapter.factors()
        return lora_a, lora_b, adapter.scaling
    return None


def has_dropout(adapter: nn.Module) -> bool:
    dropout = getattr(adapter, "dropout", None)
    return dropout is not None and dropout.training


def stack_factors(factors: Sequence[Factors], r_max: int | None = None, *,
                  zero_slot: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A (n + 1, r_max, in), B (n + 1, out, r_max))``: scaling folded into A, ranks zero-padded, slot n
    zero (left out with ``zero_slot=False``). Differentiable: gradients reach each source tensor."""
    r_max = max(a.shape[0] for a, _, _ in factors) if r_max is None else r_max
    dtype = factors[0][0].dtype

    def padded(t: torch.Tensor, pad: tuple[int, ...], rank: int) -> torch.Tensor:
        return t if rank == r_max else F.pad(t, pad)  # equal ranks (the usual case): no copy

    a_rows = [padded(a.to(dtype) * scaling, (0, 0, 0, r_max - a.shape[0]), a.shape[0]) for a, _, scaling in factors]
    b_rows = [padded(b.to(dtype), (0, r_max - b.shape[1]), b.shape[1]) for _, b, _ in factors]
    if zero_slot:
        a_rows.append(torch.zeros_like(a_rows[0]))
        b_rows.append(torch.zeros_like(b_rows[0]))
    return torch.stack(a_rows), torch.stack(b_rows)


def grouped_low_rank(x: torch.Tensor, out: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor) -> torch.Tensor:
    """``gathered_low_rank`` for rows already grouped: adapter k's rows are the k-th of ``len(a_stack)`` equal,
    contiguous blocks (a multi-adapter training batch). Two ``bmm`` on views: no gather, no scatter in backward."""
    groups = a_stack.shape[0]
    if x.dtype != a_stack.dtype:
        x = x.to(a_stack.dtype)
    hidden = torch.bmm(x.reshape(groups, -1, x.shape[-1]), a_stack.transpose(1, 2))
    out3 = out.reshape(groups, -1, out.shape[-1])
    if out3.dtype == hidden.dtype:
        return torch.baddbmm(out3, hidden, b_stack.transpose(1, 2)).view(out.shape)
    return (out3 + torch.bmm(hidden, b_stack.transpose(1, 2)).to(out3.dtype)).view(out.shape)


def gathered_low_rank(x: torch.Tensor, out: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor,
                      row_slots: torch.Tensor) -> torch.Tensor:
    """``out[i] + B[slot_i] A[slot_i] x[i]`` for every row i (``x``: (rows, ..., in), ``out``: (rows, ..., out));
    scaling lives in ``a_stack``. Returns a new tensor; ``out`` is left as it was."""
    rows = x.shape[0]
    if x.dtype != a_stack.dtype:
        x = x.to(a_stack.dtype)
    x3 = x.reshape(rows, -1, x.shape[-1])
    hidden = torch.bmm(x3, a_stack.index_select(0, row_slots).transpose(1, 2))  # (rows, tokens, r_max)
    b_rows = b_stack.index_select(0, row_slots).transpose(1, 2)  # (rows, r_max, out)
    out3 = out.reshape(rows, -1, out.shape[-1])
    if out3.dtype == hidden.dtype:
        return torch.baddbmm(out3, hidden, b_rows).view(out.shape)
    return (out3 + torch.bmm(hidden, b_rows).to(out3.dtype)).view(out.shape)


def _versions(adapter: nn.Module) -> tuple:
    return tuple((id(t), t._version, t.device, t.dtype) for t in (*adapter.parameters(), *adapter.buffers()))


def forward_rows(layer: nn.Module, x: torch.Tensor, out: torch.Tensor, row_adapters: tuple[str | None, ...],
                 cache: dict) -> torch.Tensor | None:
    """The gathered per-row update of an ``AdaptedLinear``'s attached adapters, or None when some adapter the
    batch uses has no ``s B A`` form (the caller then loops over adapters).

    ``cache`` (the route's) holds each layer's row slots; without gradients the stacked factors are kept on
    the layer, keyed by the adapters' tensor versions, so a serving loop stacks each adapter set once.
    """
    if layer.kind != "linear" or x.dim() < 2:
        return None
    names = cache.get(("names", id(layer)))
    if names is None:
        names = tuple(dict.fromkeys(n for n in row_adapters if n is not None and n in layer.adapters))
        cache[("names", id(layer))] = names
    if not names:
        return out
    adapters = [layer.adapters[n] for n in names]
    if any(has_dropout(a) for a in adapters):
        return None
    grouped_key = ("grouped", names)
    grouped = cache.get(grouped_key)
    if grouped is None:
        per = len(row_adapters) // len(names)
        grouped = per * len(names) == len(row_adapters) and row_adapters == tuple(n for n in names for _ in range(per))
        cache[grouped_key] = grouped
    stacks = _stacks(layer, names, adapters, zero_slot=not grouped)
    if stacks is None:
        return None
    if grouped:
        return grouped_low_rank(x, out, *stacks)
    slots_key = ("slots", names, x.device)
    row_slots = cache.get(slots_key)
    if row_slots is None:
        position = {n: i for i, n in enumerate(names)}
        row_slots = torch.tensor([position.get(n, len(names)) for n in row_adapters], device=x.device)
        cache[slots_key] = row_slots
    return gathered_low_rank(x, out, *stacks, row_slots)


def _stacks(layer: nn.Module, names: tuple[str, ...], adapters: list[nn.Module], zero_slot: bool):
    tracking = torch.is_grad_enabled() and any(p.requires_grad for a in adapters for p in a.parameters())
    if not tracking:
        key = (names, zero_slot, tuple(_versions(a) for a in adapters))
        held = getattr(layer, "_gathered_stacks", None)
        if held is not None and held[0] == key:
            return held[1]
    factors = [low_rank_factors(a) for a in adapters]
    if any(f is None for f in factors):
        return None
    stacks = stack_factors(factors, zero_slot=zero_slot)
    if not tracking:
        layer._gathered_stacks = (key, stacks)
    return stacks
