"""``modules_to_save``: small modules (a classifier head, a norm) trained in full beside an adapter, as PEFT.

Each named module is wrapped in a ``SavedModule``: the frozen original plus, per adapter, a trainable copy
(``ModuleCopy``). While that adapter is active the copy runs instead of the original; disabled adapters,
or an adapter without a copy, run the original. The wrapper is an adapted layer (it subclasses
``AdaptedLinear``), so save/load, activation, disabling, deletion and merging treat the copy like any other
adapter tensor: the copy's parameters go into the adapter file under ``<module path>.module.<name>``, and
merging puts the copy's values into the original (``mm.merge(..., unload=True)`` leaves the trained module).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from mm.adapters.base import Adapter, NotMergeableError
from mm.layer import AdaptedLinear


class ModuleCopy(Adapter):
    """A trainable copy of the wrapped module, owned by one adapter."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(original)
        self.module.requires_grad_(True)

    def forward(self, x: torch.Tensor, out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        raise RuntimeError("a ModuleCopy replaces its module; SavedModule runs it")

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        raise NotMergeableError("a saved module copy is no weight delta; mm.merge copies it into the original")


class SavedModule(AdaptedLinear):
    """The original module (``base``, frozen) and per-adapter trainable copies; the first active copy runs."""

    kind = "module"

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.original_state: dict[str, torch.Tensor] | None = None  # the original's values while merged

    @staticmethod
    def features_of(base: nn.Module) -> tuple[int, int]:
        return int(getattr(base, "in_features", 0)), int(getattr(base, "out_features", 0))

    def forward(self, *args, **kwargs):
        running = self.running_copy()
        return self.base(*args, **kwargs) if running is None else running.module(*args, **kwargs)

    def running_copy(self) -> ModuleCopy | None:
        if self.disabled:
            return None
        return next((self.adapters[n] for n in self.active if n not in self.merged), None)

    @torch.no_grad()
    def merge(self, names: Iterable[str]) -> None:
        """Put the (last named) copy's values into the original; ``unmerge`` restores the original's."""
        names = [n for n in names if n in self.adapters and n not in self.merged]
        if not names:
            return
        if self.original_state is None:
            self.original_state = {k: v.clone() for k, v in self.base.state_dict().items()}
        self.base.load_state_dict(self.adapters[names[-1]].module.state_dict())
        self.merged.extend(names)

    @torch.no_grad()
    def unmerge(self, names: Iterable[str] | None = None) -> None:
        wanted = None if names is None else set(names)
        remaining = [n for n in self.merged if wanted is not None and n not in wanted]
        if self.original_state is not None:
            self.base.load_state_dict(self.original_state)
            self.original_state = None
        self.merged = []
        self.merge(remaining)  # copies that stay merged: the last of them holds the module again


def saved_module_names(model: nn.Module, patterns: list[str]) -> list[str]:
    """Modules whose name is one of ``patterns`` or ends with '.' + one (PEFT's suffix rule)."""
    names = []
    for name, _ in model.named_modules():
        matches = name and any(name == p or name.endswith("." + p) for p in patterns)
        if matches and not any(name.startswith(n + ".") for n in names):  # not inside one already taken
            names.append(name)
    return names


def modules_to_save_for(model: nn.Module, config, adapted: list[str]) -> list[str]:
    """The modules ``config.modules_to_save`` names in ``model``; checked before attach changes anything: a name
    matching nothing, or a module the adapter also adapts, is a ConfigError naming it."""
    from mm.config import ConfigError

    patterns = list(getattr(config, "modules_to_save", None) or [])
    names = saved_module_names(model, patterns)
    missing = [p for p in patterns if not any(n == p or n.endswith("." + p) for n in names)]
    if missing:
        raise ConfigError(f"{config.method}: key 'modules_to_save': {missing} name no module of "
                          f"{type(model).__name__}")
    clash = [n for n in names if n in adapted or any(a.startswith(n + ".") for a in adapted)]
    if clash:
        raise ConfigError(f"{config.method}: key 'modules_to_save': {clash} are (or hold) layers the adapter "
                          "adapts; a module is either adapted or saved in full")
    return names


def add_module_copies(model: nn.Module, names: list[str], adapter: str, config, *, active: bool) -> None:
    """Give ``adapter`` a trainable copy of each module in ``names`` (wrapping it in a SavedModule once)."""
    from mm.wrap import _replace  # late: mm.wrap imports this module

    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, SavedModule):
            layer = SavedModule(layer).train(layer.training)
            _replace(model, name, layer)
        layer.add(adapter, ModuleCopy(layer.base).train(layer.training), active=active)
        layer.adapters[adapter].config = config
