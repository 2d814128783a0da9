"""``merge_adapters``: combine adapters of one model into a new plain LoRA adapter, as PEFT's
``add_weighted_adapter`` does, so that ``save_adapters`` and ``export_peft`` take the result like any adapter.

Methods (PEFT's ``combination_type`` names):

- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the rule runs on the A matrices
  and on the B matrices separately, each adapter weighted by ``sqrt(|w * scaling|)`` (the sign on A). Cheap,
  and the rank stays r, but sum(B) sum(A) carries cross terms B_i A_j: it is not the sum of the updates.
- ``cat``: A's and B's stacked; rank = the sum of ranks; the update is exactly sum_i w_i * delta_i.
- ``svd`` (and ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``): the rule runs
  on the full updates delta_i = scaling_i B_i A_i, and the result is re-factorised to rank ``svd_rank``.

The merged adapter's scaling is 1 (alpha = r) and it is attached inactive (``mm.set_active`` to use it).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import torch
from torch import nn

from mm.adapters.lora import ConvLoRA, LoRA, LoRAConfig
from mm.compose.rules import SignMethod, combine
from mm.config import ConfigError
from mm.layer import AdaptedConv, AdaptedLinear, is_conv1d
from mm.wrap import adapted_layers, adapter_config, adapter_names, attach

FACTOR_RULES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_RULES = {"svd": "linear", "ties_svd": "ties", "dare_linear_svd": "dare_linear",
             "dare_ties_svd": "dare_ties", "magnitude_prune_svd": "magnitude_prune"}
METHODS = (*FACTOR_RULES, "cat", *SVD_RULES)
_NEEDS_DENSITY = {"ties", "dare_linear", "dare_ties", "magnitude_prune"}


class MergeError(ConfigError):
    """Adapters that cannot be merged as asked (unknown, not LoRA, ranks or weights that do not fit)."""


def check_merge_inputs(model: nn.Module, names: Sequence[str], weights: Sequence[float] | None) -> list[float]:
    """The weights (default: 1 per adapter) after checking the names exist, are distinct and are mergeable."""
    names = list(names)
    if not names:
        raise MergeError("merge: no adapters given; name at least one adapter to merge")
    known = adapter_names(model)
    for name in names:
        if name not in known:
            raise MergeError(f"merge: adapter {name!r} is not attached to the model; it has {known}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise MergeError(f"merge: adapter(s) {repeated} given more than once")
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    if len(weights) != len(names):
        raise MergeError(f"merge: {len(weights)} weight(s) for {len(names)} adapter(s) {names}; give one each")
    for name, weight in zip(names, weights, strict=True):
        if not math.isfinite(weight):
            raise MergeError(f"merge: weight of adapter {name!r} is {weight}; expected a finite number")
    if all(w == 0 for w in weights):
        raise MergeError(f"merge: every weight is 0 for adapters {names}; the merge would be a no-op")
    for layer_name, layer in adapted_layers(model):
        for name in names:
            if name in layer.adapters and not layer.adapters[name].mergeable:
                raise MergeError(f"merge: adapter {name!r} at {layer_name} ({type(layer.adapters[name]).__name__}) "
                                 "has no weight update to merge")
    return weights


def _check_density(method: str, density: float | None) -> float:
    if method.removesuffix("_svd") not in _NEEDS_DENSITY:
        return 1.0
    if density is None or not 0.0 < float(density) <= 1.0:
        raise MergeError(f"merge: method {method!r} needs 'density' in (0, 1] (the share of entries kept), "
                         f"got {density!r}")
    return float(density)


def _lora_modules(model: nn.Module, names: list[str], method: str) -> list[tuple[str, AdaptedLinear, dict]]:
    """Per adapted layer: its name, the layer, and the given adapters present there (name -> module)."""
    rows = []
    for layer_name, layer in adapted_layers(model):
        present = {n: layer.adapters[n] for n in names if n in layer.adapters}
        if not present:
            continue
        if method not in SVD_RULES:
            for name, module in present.items():
                if not isinstance(module, LoRA | ConvLoRA):
                    raise MergeError(f"merge: adapter {name!r} at {layer_name} is {type(module).__name__}; method "
                                     f"{method!r} combines LoRA A/B factors (use 'svd' for other adapters)")
        if isinstance(layer, AdaptedConv) and layer.base.groups > 1:
            # A grouped conv LoRA orders its ranks by group: stacking or re-factorising would mix the groups.
            raise MergeError(f"merge: layer {layer_name!r} is a grouped convolution (groups={layer.base.groups}); "
                             "merging its LoRAs is not supported")
        rows.append((layer_name, layer, present))
    return rows


def _ranks(model: nn.Module, names: list[str]) -> dict[str, int]:
    return {name: adapter_config(model, name).r for name in names}


def merged_rank(model: nn.Module, names: list[str], method: str, svd_rank: int | None) -> int:
    ranks = _ranks(model, names)
    if method in FACTOR_RULES:
        if len(set(ranks.values())) != 1:
            raise MergeError(f"merge: method {method!r} needs adapters of one rank; ranks are {ranks} "
                             "(use 'cat' or 'svd')")
        return next(iter(ranks.values()))
    if method == "cat":
        return sum(ranks.values())
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise MergeError(f"merge: 'svd_rank' must be a positive integer, got {svd_rank!r}")
    return svd_rank or max(ranks.values())


def attach_result(model: nn.Module, template: str, new_name: str, rank: int, layer_names: list[str]) -> dict:
    """Attach an inactive plain LoRA ``new_name`` of rank ``rank`` (scaling 1) on ``layer_names``, built from
    adapter ``template``'s config (dropout, init); returns layer name -> its LoRA module, zeroed."""
    if new_name in adapter_names(model):
        raise MergeError(f"merge: the model already has an adapter named {new_name!r}; pick another name")
    base_config = adapter_config(model, template)
    dropout = base_config.dropout if isinstance(base_config, LoRAConfig) else 0.0
    config = LoRAConfig(target_regex="|".join(re.escape(n) for n in layer_names), r=rank, alpha=float(rank),
                        dropout=dropout)
    if type(base_config) is LoRAConfig:
        config = dataclasses.replace(base_config, targets=[], target_regex=config.target_regex, exclude=[],
                                     layers=None, layers_pattern=None, r=rank, alpha=float(rank), rslora=False)
    attach(model, config, new_name, active=False)
    modules = {n: layer.adapters[new_name] for n, layer in adapted_layers(model) if new_name in layer.adapters}
    with torch.no_grad():
        for module in modules.values():
            module.lora_A.zero_()
            module.lora_B.zero_()
    return modules


def svd_factors(delta: torch.Tensor, rank: int, clamp: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of rank ``rank`` with B A the best rank-``rank`` approximation of ``delta`` (out, ...).

    A convolution's kernel delta is flattened to (out, in*k) first. Ranks beyond the matrix's are zero.
    ``clamp`` (a quantile, as PEFT's ``svd_clamp``) clips the factors' extreme entries.
    """
    matrix = delta.reshape(delta.shape[0], -1).float()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    b, a = u[:, :rank] * s[:rank], vh[:rank]
    if clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    pad = rank - a.shape[0]
    if pad > 0:
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
    ones = (1,) * (delta.dim() - 2)
    return a.reshape(rank, *delta.shape[1:]), b.reshape(delta.shape[0], rank, *ones)


def _fill_factor_rule(rule: str, present: dict, weights: dict, density: float, sign: SignMethod,
                      generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's A/B-wise merge: weight sqrt(|w s|) on both factors, the sign of w s on A only."""
    scaled = [weights[n] * present[n].scaling for n in present]
    sqrt_a = torch.tensor([math.copysign(math.sqrt(abs(v)), v) if v != 0 else 0.0 for v in scaled])
    sqrt_b = torch.tensor([math.sqrt(abs(v)) for v in scaled])
    a = combine(rule, [m.lora_A.detach() for m in present.values()], sqrt_a, density, sign, generator)
    b = combine(rule, [m.lora_B.detach() for m in present.values()], sqrt_b, density, sign, generator)
    return a, b


def merge_adapters(
    model: nn.Module, names: Sequence[str], method: str = "linear", weights: Sequence[float] | None = None, *,
    density: float | None = None, majority_sign_method: SignMethod = "total", svd_rank: int | None = None,
    svd_clamp: float | None = None, new_name: str | None = None, generator: torch.Generator | None = None,
) -> str:
    """Merge adapters ``names`` of ``model`` into a new LoRA adapter; returns its name (default
    ``merged_<method>``). ``weights`` default to 1 each; ``density`` is the share kept by TIES/DARE/pruning;
    ``generator`` drives DARE's random masks (default: torch's global RNG, as PEFT)."""
    if method not in METHODS:
        raise MergeError(f"merge: unknown method {method!r}; known: {', '.join(METHODS)}")
    names = list(names)
    weights = check_merge_inputs(model, names, weights)
    density = _check_density(method, density)
    if len(names) == 1:  # as PEFT: one adapter is only ever re-weighted
        method = "linear"
    rank = merged_rank(model, names, method, svd_rank)
    rows = _lora_modules(model, names, method)
    new_name = new_name or f"merged_{method}"
    targets = attach_result(model, names[0], new_name, rank, [row[0] for row in rows])
    by_name = dict(zip(names, weights, strict=True))
    with torch.no_grad():
        for layer_name, layer, present in rows:
            target = targets[layer_name]
            if method == "cat":
                a = torch.cat([m.lora_A * by_name[n] * m.scaling for n, m in present.items()])
                b = torch.cat([m.lora_B for m in present.values()], dim=1)
            elif method in FACTOR_RULES:
                a, b = _fill_factor_rule(method, present, by_name, density, majority_sign_method, generator)
            else:
                # The rule runs on the layer's stored layout ((in, out) for a GPT-2 Conv1D), as PEFT's does:
                # DARE's random mask is then drawn over the same entries in the same order.
                stored = (lambda t: t.T) if is_conv1d(layer.base) else (lambda t: t)
                deltas = [stored(m.delta_weight(layer.base)) for m in present.values()]
                delta = stored(combine(SVD_RULES[method], deltas, torch.tensor([by_name[n] for n in present]),
                                       density, majority_sign_method, generator))
                a, b = svd_factors(delta, rank, svd_clamp)
            target.lora_A[: a.shape[0]].copy_(a)
            target.lora_B[:, : b.shape[1]].copy_(b)
    return new_name
