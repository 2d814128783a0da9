"""Task vectors for Concrete subspace merging, from adapters or from full fine-tuned weights, and the two entry
points: ``concrete_merge_adapters`` (adapters in, a new LoRA adapter out) and ``concrete_merge_task_vectors``
(fine-tuned state dicts in, merged weights out)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mm.compose.adapters import MergeError, _lora_modules, attach_result, check_merge_inputs, svd_factors
from mm.compose.concrete import ConcreteConfig, ConcreteMerger, ConcreteResult, LossFn
from mm.layer import is_conv1d
from mm.wrap import adapted_layers, disable_adapters


def adapter_task_vectors(model: nn.Module, names: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Each adapter's weight update as a task vector on its layer's base weight (stored layout), stacked
    (tasks, ...) per weight and zero where an adapter does not reach a layer; and weight key -> layer name."""
    check_merge_inputs(model, names, None)
    vectors, layer_of = {}, {}
    for layer_name, layer, present in _lora_modules(model, list(names), "svd"):
        key = f"{layer_name}.base.weight"
        stored = layer.base.weight
        rows = []
        for name in names:
            if name in present:
                delta = present[name].delta_weight(layer.base).detach()
                rows.append(delta.T if is_conv1d(layer.base) else delta)
            else:
                rows.append(torch.zeros_like(stored))
        vectors[key], layer_of[key] = torch.stack(rows).float(), layer_name
    return vectors, layer_of


def state_dict_task_vectors(model: nn.Module, finetuned: Sequence[Mapping[str, torch.Tensor]],
                            keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """tau_t = finetuned_t - base for the float weights ``keys`` (default: every weight some model changed)."""
    if len(finetuned) < 1:
        raise MergeError("concrete: no fine-tuned state dicts given")
    params = dict(model.named_parameters())
    if keys is None:
        keys = [k for k, p in params.items() if p.is_floating_point()
                and any(k in sd and not torch.equal(sd[k].to(p), p.detach()) for sd in finetuned)]
    vectors = {}
    for key in keys:
        if key not in params:
            raise MergeError(f"concrete: weight {key!r} is not a parameter of {type(model).__name__}")
        base = params[key].detach()
        rows = []
        for t, state in enumerate(finetuned):
            if key not in state:
                raise MergeError(f"concrete: fine-tuned model {t} has no weight {key!r}")
            if state[key].shape != base.shape:
                raise MergeError(f"concrete: fine-tuned model {t}: weight {key!r} has shape {tuple(state[key].shape)},"
                                 f" the base has {tuple(base.shape)} (a different base model?)")
            rows.append(state[key].to(base) - base)
        vectors[key] = torch.stack(rows).float()
    if not vectors:
        raise MergeError("concrete: the fine-tuned models do not differ from the base in any weight")
    return vectors


def concrete_merge_adapters(
    model: nn.Module, names: Sequence[str], batches: Sequence[Sequence[Any]], loss_fn: LossFn,
    config: ConcreteConfig | None = None, *, rank: int | None = None, new_name: str | None = None,
) -> tuple[str, ConcreteResult]:
    """Concrete-merge adapters ``names`` (task t's objective on ``batches[t]``) into a new inactive LoRA.

    The masked merge is dense; ``rank`` (default: exact, the largest layer's full rank) is the rank the new
    LoRA re-factorises it to by SVD. While the mask is learned every adapter is off (the task vectors act on
    the base weights).
    """
    config = config or ConcreteConfig()
    merged = sorted({n for _, layer in adapted_layers(model) for n in layer.merged})
    if merged:
        raise MergeError(f"concrete: adapters {merged} are merged into the base weights; mm.unmerge them first")
    vectors, layer_of = adapter_task_vectors(model, names)

    def adapters_off(inner_model: nn.Module, batch: Any, task: int) -> torch.Tensor:
        with disable_adapters(inner_model):
            return loss_fn(inner_model, batch, task)

    result = ConcreteMerger(model, vectors, adapters_off, batches, config).run()
    new_name = deltas_to_adapter(model, names[0], new_name or "merged_concrete", result.deltas, layer_of, rank)
    return new_name, result


def deltas_to_adapter(model: nn.Module, template: str, new_name: str, deltas: Mapping[str, torch.Tensor],
                      layer_of: Mapping[str, str], rank: int | None = None) -> str:
    """Attach ``new_name``, an inactive LoRA whose update on each layer is ``deltas[key]`` (stored layout) re-
    factorised by SVD to ``rank`` (default: exact, the largest layer's full rank); config from ``template``."""
    full = max(min(d.shape[0], d.numel() // d.shape[0]) for d in deltas.values())
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise MergeError(f"concrete: 'rank' must be a positive integer, got {rank!r}")
    rank = rank or full
    layers = dict(adapted_layers(model))
    targets = attach_result(model, template, new_name, rank, [layer_of[key] for key in deltas])
    with torch.no_grad():
        for key, delta in deltas.items():
            layer_name = layer_of[key]
            a, b = svd_factors(delta.T if is_conv1d(layers[layer_name].base) else delta, rank)
            targets[layer_name].lora_A.copy_(a)
            targets[layer_name].lora_B.copy_(b)
    return new_name


def concrete_merge_task_vectors(
    model: nn.Module, finetuned: Sequence[Mapping[str, torch.Tensor]], batches: Sequence[Sequence[Any]],
    loss_fn: LossFn, config: ConcreteConfig | None = None, keys: Sequence[str] | None = None,
) -> tuple[dict[str, torch.Tensor], ConcreteResult]:
    """Concrete-merge fully fine-tuned models (their state dicts) of the base ``model``; returns the merged
    weights (key -> tensor, for ``model.load_state_dict(..., strict=False)``) and the result."""
    vectors = state_dict_task_vectors(model, finetuned, keys)
    result = ConcreteMerger(model, vectors, loss_fn, batches, config or ConcreteConfig()).run()
    params = dict(model.named_parameters())
    merged = {key: (params[key].detach() + delta.to(params[key])) for key, delta in result.deltas.items()}
    return merged, result
