"""Whole-FFN experts for top-k block mixtures (MixLoRA): ``y = sum_j g_j FFN_j(x)``.

Expert j of a block is the frozen FFN with expert j's LoRA on each of its projections, so with k > 1 the
nonlinearity sees k different pre-activations per token. The block's modules run unchanged; only the
adapted projections change shape:

- each projection that reads the block input (gate_proj/up_proj, c_fc, fc1) *expands*: it computes the
  frozen ``W x`` once per token and returns (..., k, out), row j being ``W x + s B_{e_j} A_{e_j} x``;
- the elementwise ops between them (activation, product, dropout) act on the k rows independently;
- the projection that reads the other width (down_proj, c_proj, fc2) *folds*: the frozen weight is linear,
  so ``sum_j g_j W h_j = W (sum_j g_j h_j)`` runs once per token on the gate-weighted sum, and only the LoRA
  part ``sum_j g_j s B_{e_j} A_{e_j} h_j`` is computed per (token, expert) pair. The bias comes out right
  because MixLoRA's gates sum to 1; other active adapters on that projection see the weighted sum, which is
  exact for every adapter linear in its input (LoRA and its family).

This is the "shared W1/W3" computation of MixLoRA's high-throughput implementation, extended to the down
projection by linearity. Several such mixtures active on one block nest: each adds its own k axis, and the
fold sums every axis but a mixture's own for that mixture's pairs (a product of the mixtures).
"""

from __future__ import annotations

import math

import torch

from mm.adapters.base import add_matmul_
from mm.adapters.moe_dispatch import (
    MASKED_MAX_WIDTH,
    gated_hidden,
    pair_hidden,
    pair_hidden_shared,
    pair_output,
    stacked_B,
)

_AXES = "abcdefghjklmnopqrsuvwxyz"  # einsum letters for the k axes ('t' tokens, 'i' features)


def expand_output(adapter, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """(..., *axes, out) base output -> (..., *axes, k, out): one row per (token, chosen expert)."""
    router = adapter.block_router
    flat = x.reshape(-1, x.shape[-1])
    routing = router(flat, x)
    rows = flat.to(adapter.lora_A.dtype)
    if adapter.dropout is not None:
        rows = adapter.dropout(rows)
    hidden = pair_hidden_shared(rows, routing.experts, adapter.lora_A) * adapter.scaling
    delta = pair_output(hidden, routing.experts, adapter.lora_B, adapter.grouped_pairs)
    earlier = out.dim() - 1 - len(router.lead)  # k axes of mixtures that expanded this output before
    delta = delta.view(*router.lead, *([1] * earlier), *delta.shape[1:])
    return out.unsqueeze(-2) + delta.to(out.dtype)


def fold_input(x: torch.Tensor, adapters: list) -> torch.Tensor:
    """(..., k_1, ..., k_n, in) expanded hidden -> (..., in), gate-weighted; each adapter keeps its pairs."""
    routers = [a.block_router for a in adapters]
    for router in routers:
        if router.routing is None or router.lead is None:
            raise RuntimeError(f"block {router.block!r}: this projection folds the expanded rows of the block's "
                               "experts, but the block's input projections have not run; call the whole block")
    lead, ks = routers[0].lead, tuple(r.top_k for r in routers)
    if tuple(x.shape[:-1]) != (*lead, *ks) or any(r.lead != lead for r in routers):
        raise RuntimeError(
            f"block {routers[0].block!r}: expected the block's expanded hidden states of shape "
            f"{(*lead, *ks, x.shape[-1])} (tokens {lead}, one axis per active mixture's top_k), got "
            f"{tuple(x.shape)}; the block's input projections must run first on the same tokens"
        )
    h = x.reshape(math.prod(lead), *ks, x.shape[-1])
    gates = [r.routing.gates.to(x.dtype) for r in routers]
    axes = _AXES[: len(ks)]
    terms = [f"t{a}" for a in axes] + [f"t{axes}i"]
    for index, (adapter, router) in enumerate(zip(adapters, routers, strict=True)):
        others = [i for i in range(len(ks)) if i != index]
        spec = ",".join([terms[i] for i in others] + [terms[-1]]) + f"->t{axes[index]}i"
        adapter._pairs = torch.einsum(spec, *[gates[i] for i in others], h) if others else h
        router._input = None  # block done: a later call with the same tensor routes afresh
    mixed = torch.einsum(",".join(terms) + "->ti", *gates, h)
    return mixed.view(*lead, x.shape[-1])


def add_folded(adapter, out: torch.Tensor) -> torch.Tensor:
    """``out + sum_j g_j s B_{e_j} A_{e_j} h_j`` for the pairs ``fold_input`` kept, on the folded output."""
    pairs, adapter._pairs = adapter._pairs, None
    if pairs is None:
        raise RuntimeError(f"{adapter.method} in block {adapter.block_router.block!r}: no folded pairs; "
                           "AdaptedLinear folds the input before calling a folding mixture")
    routing = adapter.block_router.routing
    rows = pairs.to(adapter.lora_A.dtype)
    if adapter.dropout is not None:
        rows = adapter.dropout(rows)
    hidden = pair_hidden(rows, routing.experts, adapter.lora_A, adapter.grouped_pairs)
    gates = (routing.gates * adapter.scaling).to(hidden.dtype)
    num_experts, rank = adapter.lora_A.shape[:2]
    if num_experts * rank <= MASKED_MAX_WIDTH:  # one (E*r)-wide matmul accumulated into the base output
        mixed = gated_hidden(hidden, routing.experts, gates, num_experts)
        mixed = mixed.view(*out.shape[:-1], mixed.shape[-1]).to(out.dtype)
        return add_matmul_(out, mixed, stacked_B(adapter.lora_B).to(out.dtype))
    update = pair_output(hidden * gates.unsqueeze(-1), routing.experts, adapter.lora_B, grouped=True).sum(1)
    return out + update.view(out.shape).to(out.dtype)
