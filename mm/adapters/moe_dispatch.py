"""Vectorised dispatch for mixtures of LoRA experts: tokens to their experts without a Python loop.

Shapes: T tokens, each routed to k experts (``experts`` (T, k) indices, ``gates`` (T, k)); E experts of rank
r stacked as ``lora_A`` (E, r, in) and ``lora_B`` (E, out, r).

Two families of kernels, chosen by ``MixtureConfig.dispatch``:

- *masked*: every token is projected on all E*r rows of A in one matmul and the routing becomes a mask on
  the r-wide hidden; B then runs as one (E*r)-wide matmul. Cheap while E*r is small (LoRA experts are thin),
  and the last matmul can accumulate straight into the base output.
- *grouped*: the T*k (token, choice) pairs are sorted by expert into a padded (E, capacity, .) batch so the
  experts run as batched matmuls; cost grows with k, not with E.

Per-projection mixing (``masked_mix``, ``grouped_delta``) serves top-1 blocks and per-projection routers.
The ``pair_*`` kernels serve MixLoRA's whole-FFN experts (``mm.adapters.moe``): each of a token's k choices
is its own row through the block, so the expanding projections need each pair's update (``pair_output``)
and the folding projection each pair's hidden (``pair_hidden``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: 'auto' uses the masked form while experts * rank stays this small, else the grouped one.
MASKED_MAX_WIDTH = 256


def expert_slots(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(expert of each pair, its row in that expert's batch, batch capacity) for the flattened (T, k) pairs."""
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(flat)
    slot[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    return flat, slot, int(counts.max()) if flat.numel() else 0


def _grouped_matmul(rows: torch.Tensor, experts: torch.Tensor, weight: torch.Tensor,
                    slots: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> torch.Tensor:
    """``rows[p] @ weight[experts[p]].T`` for every pair p: rows (P, in), weight (E, out, in) -> (P, out)."""
    num_experts, out_features = weight.shape[0], weight.shape[1]
    if rows.shape[0] == 0:
        return rows.new_zeros(0, out_features)
    flat, slot, capacity = slots if slots is not None else expert_slots(experts, num_experts)
    batch = rows.new_zeros(num_experts, capacity, rows.shape[-1]).index_put((flat, slot), rows)
    return torch.bmm(batch, weight.transpose(1, 2))[flat, slot]


def grouped_delta(x: torch.Tensor, experts: torch.Tensor, gates: torch.Tensor, lora_A: torch.Tensor,
                  lora_B: torch.Tensor) -> torch.Tensor:
    """``sum_j gates[t, j] * B_e A_e x_t`` (e = experts[t, j]) for all tokens at once, grouped by expert."""
    tokens, k = experts.shape
    rows = x.repeat_interleave(k, dim=0) if k > 1 else x
    slots = expert_slots(experts, lora_A.shape[0])
    hidden = _grouped_matmul(rows, experts, lora_A, slots) * gates.reshape(-1, 1)
    return _grouped_matmul(hidden, experts, lora_B, slots).view(tokens, k, -1).sum(1)


def masked_mix(x: torch.Tensor, experts: torch.Tensor, gates: torch.Tensor, lora_A: torch.Tensor,
               lora_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, E*r) hidden with every unchosen expert's block zeroed, and B as (out, E*r): their product is the update."""
    tokens = experts.shape[0]
    num_experts, rank, in_features = lora_A.shape
    hidden = F.linear(x, lora_A.reshape(num_experts * rank, in_features)).view(tokens, num_experts, rank)
    mask = gates.new_zeros(tokens, num_experts).scatter(1, experts, gates)
    mixed = (hidden * mask.unsqueeze(-1)).reshape(tokens, num_experts * rank)
    return mixed, stacked_B(lora_B)


def stacked_B(lora_B: torch.Tensor) -> torch.Tensor:
    """The experts' B side by side, (out, E*r), matching an (E*r)-wide hidden laid out expert by expert."""
    return lora_B.permute(1, 0, 2).reshape(lora_B.shape[1], -1)


def masked_delta(x: torch.Tensor, experts: torch.Tensor, gates: torch.Tensor, lora_A: torch.Tensor,
                 lora_B: torch.Tensor) -> torch.Tensor:
    """Same as ``grouped_delta``, through ``masked_mix``."""
    mixed, weight = masked_mix(x, experts, gates, lora_A, lora_B)
    return F.linear(mixed, weight)


DISPATCH = {"masked": masked_delta, "grouped": grouped_delta}


def pair_hidden_shared(x: torch.Tensor, experts: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
    """``A_{e_j} x_t`` for each pair, (T, k, r), when the k pairs of a token share its input x (T, in)."""
    num_experts, rank, in_features = lora_A.shape
    hidden = F.linear(x, lora_A.reshape(num_experts * rank, in_features)).view(-1, num_experts, rank)
    return hidden.gather(1, experts.unsqueeze(-1).expand(-1, -1, rank))


def pair_hidden(h: torch.Tensor, experts: torch.Tensor, lora_A: torch.Tensor, grouped: bool) -> torch.Tensor:
    """``A_{e_j} h_{t,j}`` for pairs with their own inputs h (T, k, in) -> (T, k, r)."""
    tokens, k, in_features = h.shape
    num_experts, rank, _ = lora_A.shape
    if grouped:
        return _grouped_matmul(h.reshape(tokens * k, in_features), experts, lora_A).view(tokens, k, rank)
    hidden = F.linear(h.reshape(tokens * k, in_features), lora_A.reshape(num_experts * rank, in_features))
    return hidden.view(tokens, k, num_experts, rank).gather(2, experts[..., None, None].expand(-1, -1, 1, rank)).squeeze(2)


def pair_output(hidden: torch.Tensor, experts: torch.Tensor, lora_B: torch.Tensor, grouped: bool) -> torch.Tensor:
    """``B_{e_j} hidden_{t,j}`` for each pair: hidden (T, k, r) -> (T, k, out)."""
    tokens, k, rank = hidden.shape
    num_experts, out_features, _ = lora_B.shape
    if grouped:
        return _grouped_matmul(hidden.reshape(tokens * k, rank), experts, lora_B).view(tokens, k, out_features)
    spread = hidden.new_zeros(tokens, k, num_experts, rank)
    spread.scatter_(2, experts[..., None, None].expand(-1, -1, 1, rank), hidden.unsqueeze(2))
    return F.linear(spread.view(tokens * k, num_experts * rank), stacked_B(lora_B)).view(tokens, k, out_features)


def gated_hidden(hidden: torch.Tensor, experts: torch.Tensor, gates: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``sum_j g_j hidden_{t,j}`` placed in expert e_j's r-wide block: (T, E*r), for one matmul with ``stacked_B``."""
    tokens, k, rank = hidden.shape
    spread = hidden.new_zeros(tokens, num_experts, rank)
    spread.scatter_add_(1, experts.unsqueeze(-1).expand(-1, -1, rank), hidden * gates.unsqueeze(-1))
    return spread.view(tokens, num_experts * rank)
