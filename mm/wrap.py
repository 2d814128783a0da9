"""``attach``: find target layers in any ``nn.Module``, wrap them in ``AdaptedLinear`` (convolutions in
``AdaptedConv``), freeze the rest."""

from __future__ import annotations

import contextlib
import difflib
import re
import warnings
from collections.abc import Iterator

from torch import nn

from mm.config import AdapterConfig, ConfigError
from mm.conv import is_plain_conv, supports_layer_kind
from mm.embedding import is_embedding
from mm.errors import MMTuneError
from mm.layer import (
    AdaptedConv,
    AdaptedEmbedding,
    AdaptedLinear,
    is_linear_like,
    linear_features,
    weight_out_in,
)
from mm.mha import PROJECTIONS, SplitMultiheadAttention
from mm.modules_to_save import SavedModule, add_module_copies, modules_to_save_for


class AttachError(MMTuneError, ValueError):
    """Targets match nothing, or an adapter name is invalid or taken; the message says which."""


#: Target keywords: every linear layer but the output head; every nn.Conv1d/2d/3d (never implied by the first).
ALL_LINEAR, ALL_CONV = "all-linear", "all-conv"


def adaptable_layers(model: nn.Module) -> list[str]:
    """Names of every layer an adapter can attach to, including q/k/v/out inside MultiheadAttention."""
    return list(adaptable_layer_kinds(model))


def adaptable_layer_kinds(model: nn.Module) -> dict[str, str]:
    """Every adaptable layer's name -> its kind, 'linear', 'conv' or 'embedding' (``mm.conv.supports_layer_kind``)."""
    kinds: dict[str, str] = {}
    saved: tuple[str, ...] = ()  # inside a saved module (its original, its copies) nothing is adaptable
    for name, module in model.named_modules():
        if saved and name.startswith(saved):
            continue
        if isinstance(module, SavedModule):
            saved += (f"{name}.",)
        elif isinstance(module, AdaptedLinear):
            kinds[name] = module.kind
        elif isinstance(module, nn.MultiheadAttention):
            kinds.update((f"{name}.{p}" if name else p, "linear") for p in PROJECTIONS)
        elif name and (is_linear_like(module) or is_plain_conv(module) or is_embedding(module)) and not isinstance(
            _parent(model, name), AdaptedLinear | nn.MultiheadAttention
        ):
            kinds[name] = "conv" if is_plain_conv(module) else "embedding" if is_embedding(module) else "linear"
    return kinds


def attention_projections(model: nn.Module) -> dict[str, list[str]]:
    """Each attention module's name (``nn.MultiheadAttention``, split or not) -> its q/k/v/out layer names.

    A target naming the attention module itself ('attn', as PEFT accepts) adapts these four views.
    """
    return {name: [f"{name}.{p}" for p in PROJECTIONS] for name, module in model.named_modules()
            if name and isinstance(module, nn.MultiheadAttention | SplitMultiheadAttention)}


def _parent(model: nn.Module, name: str) -> nn.Module:
    parent_name = name.rpartition(".")[0]
    return model.get_submodule(parent_name) if parent_name else model


def _suffix_match(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def _matches_any(name: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        if _suffix_match(name, pattern):
            return True
        with contextlib.suppress(re.error):
            if re.fullmatch(pattern, name):
                return True
    return False


def _layer_index(name: str, layers_pattern: str | None) -> int | None:
    if layers_pattern:
        found = re.search(rf"(?:^|\.){re.escape(layers_pattern)}\.(\d+)(?:\.|$)", name)
    else:
        found = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(found.group(1)) if found else None


def _output_head_names(model: nn.Module) -> set[str]:
    """The output projection that 'all-linear' leaves alone (as PEFT does): lm_head or the model's own."""
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if module is out or name.rpartition(".")[2] == "lm_head":
            heads.add(name)
    return heads


def select_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """The layer names ``config`` selects in ``model`` (suffix or regex targets, exclusions, layer ids).

    A suffix or regex target reaches convolutions only when it reaches no linear layer: 'proj' keeps meaning
    a ViT's linear ``attn.proj`` (not its conv ``patch_embed.proj``), while 'conv1' or 'patch_embed.proj'
    name convolutions. ``all-conv`` takes every convolution; ``all-linear`` never does, nor any embedding.
    An ``nn.Embedding`` is adapted whenever a target names it (as PEFT does).
    """
    kinds = adaptable_layer_kinds(model)
    heads = _output_head_names(model) if ALL_LINEAR in config.targets else set()
    patterns = [lambda n, t=t: _suffix_match(n, t) for t in config.targets if t not in (ALL_LINEAR, ALL_CONV)]
    if config.target_regex is not None:
        patterns.append(lambda n: re.fullmatch(config.target_regex, n) is not None)
    targeted = {n for n, kind in kinds.items() if (ALL_LINEAR in config.targets and kind == "linear"
                                                   and n not in heads) or (ALL_CONV in config.targets and kind == "conv")}
    attention = attention_projections(model)
    for matches in patterns:
        linear = {n for n, kind in kinds.items() if kind == "linear" and matches(n)}
        linear |= {p for owner, projections in attention.items() if matches(owner) for p in projections}
        targeted |= linear or {n for n, kind in kinds.items() if kind == "conv" and matches(n)}
        # Embeddings whenever named (as PEFT matches them), never by 'all-linear'.
        targeted |= {n for n, kind in kinds.items() if kind == "embedding" and matches(n)}
    chosen = []
    for name in kinds:
        owner = name.rpartition(".")[0]
        if name not in targeted or _matches_any(name, config.exclude) or (
                owner in attention and _matches_any(owner, config.exclude)):
            continue
        if config.layers is not None and _layer_index(name, config.layers_pattern) not in config.layers:
            continue
        chosen.append(name)
    if not chosen:
        raise AttachError(_no_match_message(model, config, list(kinds)))
    return chosen


def _no_match_message(model: nn.Module, config: AdapterConfig, candidates: list[str]) -> str:
    wanted = [*config.targets, *([config.target_regex] if config.target_regex else [])]
    suffixes = {n.rpartition(".")[2]: n for n in candidates}
    close = [suffixes[s] for w in wanted for s in difflib.get_close_matches(w.rpartition(".")[2], suffixes, n=3)]
    close = close or candidates[:5]
    extra = f", layers={config.layers}" if config.layers is not None else ""
    extra += f", exclude={config.exclude}" if config.exclude else ""
    return (
        f"{config.method}: targets {wanted}{extra} match no adaptable layer of {type(model).__name__}; "
        f"closest module names: {', '.join(dict.fromkeys(close))}"
    )


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    setattr(_parent(model, name), name.rpartition(".")[2], new)


def attach(model: nn.Module, config: AdapterConfig, name: str = "default", *, active: bool = True) -> nn.Module:
    """Attach one adapter called ``name`` to the layers ``config`` selects; freeze everything else.

    Returns ``model`` itself (changed in place). Several adapters may be attached under different names.
    """
    if not name or not name.isidentifier():
        raise AttachError(f"adapter name {name!r} must be a non-empty identifier (letters, digits, _)")
    if name in adapter_names(model):
        raise AttachError(f"model already has an adapter named {name!r}; delete it first or pick another name")
    targets = select_targets(model, config)
    _check_patterns_match(config, targets)
    saved_modules = modules_to_save_for(model, config, targets)
    layer_adapters = _build_layer_adapters(model, config, targets)  # refuses before the model changes
    for mha_name in dict.fromkeys(t.rpartition(".")[0] for t in targets):
        owner = model.get_submodule(mha_name)
        if isinstance(owner, nn.MultiheadAttention):
            if not mha_name:
                raise AttachError("cannot adapt a bare nn.MultiheadAttention in place; wrap it in a module")
            # New modules start in training mode; follow the module they replace (model.eval() before attach).
            _replace(model, mha_name, SplitMultiheadAttention(owner, mha_name).train(owner.training))
    for target in targets:
        layer = model.get_submodule(target)
        if not isinstance(layer, AdaptedLinear):
            wrapper = AdaptedEmbedding if is_embedding(layer) else AdaptedConv if target in layer_adapters else AdaptedLinear
            layer = wrapper(layer).train(layer.training)
            _replace(model, target, layer)
        if target in layer_adapters:
            module = layer_adapters[target]
        else:
            in_features, out_features = linear_features(layer.base)
            module = _layer_config(config, target).build_for(target, in_features, out_features,
                                                             weight_out_in(layer.base))
        layer.add(name, module.train(layer.training), active=active)
        layer.adapters[name].config = config
    tie_outputs = getattr(config, "tie_outputs", None)
    if tie_outputs is not None:  # layers that share a target's weight follow it (trainable tokens' tied head)
        tie_outputs(model, name, targets, active=active)
    add_module_copies(model, saved_modules, name, config, active=active)
    freeze_base(model)
    return model


def _build_layer_adapters(model: nn.Module, config: AdapterConfig, targets: list[str]) -> dict[str, nn.Module]:
    """The adapters for the convolutions and embeddings among ``targets``; a method that does not adapt that
    kind of layer, or a rank a layer cannot take, is a ConfigError naming the layer."""
    adapters = {}
    for target in targets:
        if isinstance(_parent(model, target), nn.MultiheadAttention):
            continue  # its q/k/v/out projections exist only once attach splits it
        layer = model.get_submodule(target)
        unwrapped = layer.base if isinstance(layer, AdaptedLinear) else layer
        if is_embedding(unwrapped):
            if not supports_layer_kind(config, "embedding"):
                raise ConfigError(
                    f"{config.method}: layer {target!r} is an {type(unwrapped).__name__}, and method "
                    f"{config.method!r} does not adapt embeddings ('lora' does); exclude it or narrow 'targets'")
            adapters[target] = config.build_embedding(target, unwrapped)
            continue
        conv = unwrapped
        if not is_plain_conv(conv):
            continue
        if not supports_layer_kind(config, "conv"):
            raise ConfigError(
                f"{config.method}: layer {target!r} is a {type(conv).__name__}, and method {config.method!r} "
                f"adapts linear layers only ('lora' adapts convolutions); exclude it or narrow 'targets'")
        adapters[target] = _layer_config(config, target).build_conv(target, conv)
    return adapters


def _layer_config(config: AdapterConfig, layer_name: str) -> AdapterConfig:
    """The config for one layer: LoRA's ``rank_pattern`` / ``alpha_pattern`` may change its r and alpha."""
    for_layer = getattr(config, "for_layer", None)
    return for_layer(layer_name) if for_layer is not None else config


def _check_patterns_match(config: AdapterConfig, targets: list[str]) -> None:
    """Warn about a rank/alpha pattern that decides no adapted layer: a typo, or a config reused on fewer
    layers (PEFT ignores such patterns with a warning too, so an error would refuse PEFT's own configs)."""
    from mm.adapters.lora import pattern_key  # late: the adapters import mm.layer, as this module does

    layer_patterns = getattr(config, "layer_patterns", None)
    for key, patterns in (layer_patterns() if layer_patterns is not None else {}).items():
        used = {pattern_key(patterns, t) for t in targets}
        unused = [p for p in patterns if p not in used]
        if unused:
            warnings.warn(f"{config.method}: key {key!r}: pattern(s) {unused} decide no adapted layer (they match "
                          f"none, or an earlier pattern wins everywhere they match) of "
                          f"{', '.join(targets[:6])}{' ...' if len(targets) > 6 else ''}", UserWarning, stacklevel=3)


def freeze_base(model: nn.Module) -> None:
    """Everything but adapter parameters stops training; adapters keep their own choice (e.g. frozen A)."""
    adapter_params = {id(p) for _, layer in adapted_layers(model) for p in layer.adapters.parameters()}
    for param in model.parameters():
        if id(param) not in adapter_params:
            param.requires_grad_(False)


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            yield name, module


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters attached to ``model``, in attach order."""
    return list(dict.fromkeys(n for _, layer in adapted_layers(model) for n in layer.adapters))


def active_adapters(model: nn.Module) -> list[str]:
    return list(dict.fromkeys(n for _, layer in adapted_layers(model) for n in layer.active))


def adapter_config(model: nn.Module, name: str) -> AdapterConfig:
    for _, layer in adapted_layers(model):
        if name in layer.adapters:
            return layer.adapters[name].config
    raise KeyError(f"model has no adapter {name!r}; it has {adapter_names(model)}")


def set_active(model: nn.Module, names: str | list[str]) -> None:
    """Make exactly these adapters active (their updates add up); the others stay attached, unused."""
    names = [names] if isinstance(names, str) else list(names)
    missing = sorted(set(names) - set(adapter_names(model)))
    if missing:
        raise KeyError(f"model has no adapter(s) {missing}; it has {adapter_names(model)}")
    for _, layer in adapted_layers(model):
        layer.set_active(names)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block."""
    layers = [layer for _, layer in adapted_layers(model)]
    merged = sorted({n for layer in layers for n in layer.merged})
    if merged:
        raise RuntimeError(f"cannot disable adapters while {merged} are merged; call mm.unmerge first")
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove an adapter everywhere; layers left with none go back to their original modules."""
    if name not in adapter_names(model):
        raise KeyError(f"model has no adapter {name!r}; it has {adapter_names(model)}")
    for layer_name, layer in list(adapted_layers(model)):
        if name in layer.adapters:
            layer.remove(name)
            if not layer.adapters:
                _replace(model, layer_name, layer.base)
    restore_unadapted_attention(model)


def restore_unadapted_attention(model: nn.Module) -> None:
    """Split attention modules with no adapter left become plain ``nn.MultiheadAttention`` again."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SplitMultiheadAttention) and not any(
            isinstance(getattr(module, p), AdaptedLinear) for p in PROJECTIONS
        ):
            _replace(model, name, module.to_mha())
