"""Merge adapters into the base weights, undo it, or drop the wrappers for plain inference."""

from __future__ import annotations

from torch import nn

from mm.adapters.base import NotMergeableError
from mm.wrap import _replace, active_adapters, adapted_layers, adapter_names, restore_unadapted_attention


def _resolve(model: nn.Module, names: str | list[str] | None) -> list[str]:
    if names is None:
        return active_adapters(model)
    names = [names] if isinstance(names, str) else list(names)
    missing = sorted(set(names) - set(adapter_names(model)))
    if missing:
        raise KeyError(f"model has no adapter(s) {missing}; it has {adapter_names(model)}")
    return names


def merge(model: nn.Module, names: str | list[str] | None = None, *, unload: bool = False) -> nn.Module:
    """Add the adapters' weight updates into the base weights (default: the active adapters).

    The forward pass is unchanged (merged adapters are skipped in ``AdaptedLinear``). With ``unload=True``
    the wrappers are removed and the plain base modules, now carrying the updates, are put back.
    """
    names = _resolve(model, names)
    layers = list(adapted_layers(model))
    for layer_name, layer in layers:  # refuse before changing anything
        for name in names:
            adapter = layer.adapters[name] if name in layer.adapters else None
            if adapter is not None and not adapter.mergeable:
                raise NotMergeableError(
                    f"adapter {name!r} at {layer_name} ({type(adapter).__name__}) has no weight delta to merge"
                )
    for _, layer in layers:
        layer.merge(names)
    if unload:
        for layer_name, layer in layers:
            _replace(model, layer_name, layer.base)
        restore_unadapted_attention(model)
    return model


def unmerge(model: nn.Module, names: str | list[str] | None = None) -> nn.Module:
    """Subtract merged updates again, restoring the base weights (up to float rounding)."""
    for _, layer in adapted_layers(model):
        layer.unmerge(None if names is None else _resolve(model, names))
    return model
