"""LISA (Pan et al., 2024): layerwise importance sampling, a training rule for full fine-tuning.

The model's middle layers are the blocks of its layer list (``model.layers`` in Llama, ``transformer.h``
in GPT-2, ``blocks`` in a ViT, ...). Every ``period`` optimizer steps LISA freezes all of them and
unfreezes ``n_layers`` drawn uniformly without replacement (the paper's gamma); everything outside the
layer list (embeddings, final norm, output head) always trains. Frozen parameters get no gradient, and the
optimizer holds only what trains: on each switch every param group is narrowed to its trainable
parameters and the state (e.g. AdamW moments) of parameters that stopped training is dropped, so optimizer
memory is that of the always-trained part plus gamma layers. Parameters that keep training across a switch
keep their state.

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    lisa = LISA(model, optimizer, n_layers=2, period=50, seed=0)
    for batch in batches:
        loss_fn(model, batch).backward()
        lisa.step()  # optimizer step, zero_grad, and a new draw every `period` steps

The optimizer must be built over the parameters LISA manages (all of the model's by default, or those
named by ``candidates``); learning-rate schedulers keep working, as the optimizer object and its param
groups are kept and only their parameter lists change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

#: Where common backbones keep their blocks, tried in order when ``layers`` is not given.
LAYER_LISTS = ("model.layers", "transformer.h", "model.decoder.layers", "encoder.layer", "blocks",
               "transformer.resblocks", "layers", "h")


def find_layer_list(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of the model's blocks: at ``path``, or the first of ``LAYER_LISTS`` present."""
    for candidate in [path] if path is not None else LAYER_LISTS:
        try:
            module = model.get_submodule(candidate)
        except AttributeError:
            continue
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return candidate, module
        if path is not None:
            raise ValueError(f"LISA: {path!r} in {type(model).__name__} is a {type(module).__name__}, not a "
                             "non-empty nn.ModuleList of layers")
    if path is not None:
        raise ValueError(f"LISA: {type(model).__name__} has no module {path!r}")
    raise ValueError(f"LISA: found none of {', '.join(LAYER_LISTS)} in {type(model).__name__}; pass layers='<path "
                     "to the nn.ModuleList of blocks>'")


class LISA:
    """Owns which layers train: call ``step()`` instead of ``optimizer.step()`` + ``zero_grad()``."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, *, n_layers: int = 2, period: int = 20,
        layers: str | None = None, seed: int = 0, candidates: Callable[[str, nn.Parameter], bool] | None = None,
    ) -> None:
        self.layers_path, layer_list = find_layer_list(model, layers)
        if not 0 <= n_layers <= len(layer_list):
            raise ValueError(f"LISA: n_layers must be in [0, {len(layer_list)}] ({self.layers_path} has "
                             f"{len(layer_list)} layers), got {n_layers}")
        if period < 1:
            raise ValueError(f"LISA: period must be >= 1, got {period}")
        chosen = {id(p) for name, p in model.named_parameters() if candidates is None or candidates(name, p)}
        self.layer_params = [[p for p in layer.parameters() if id(p) in chosen] for layer in layer_list]
        in_layers = {id(p) for params in self.layer_params for p in params}
        self.always = [p for p in model.parameters() if id(p) in chosen and id(p) not in in_layers]
        self.optimizer, self.n_layers, self.period = optimizer, n_layers, period
        self.group_params = [list(group["params"]) for group in optimizer.param_groups]
        managed = {id(p) for params in self.group_params for p in params}
        missing = [name for name, p in model.named_parameters() if id(p) in chosen and id(p) not in managed]
        if missing:
            raise ValueError(f"LISA: the optimizer does not hold {len(missing)} parameter(s) LISA manages, e.g. "
                             f"{missing[:3]}; build it over the same parameters")
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0
        self.active: list[int] = []
        self.history: list[tuple[int, list[int]]] = []  # (step at which the draw starts, layers drawn)
        self.switch()

    def switch(self) -> list[int]:
        """Draw the layers that train for the next ``period`` steps, freeze the rest, trim the optimizer."""
        draw = torch.randperm(len(self.layer_params), generator=self.generator)[: self.n_layers]
        self.active = sorted(int(i) for i in draw)
        for p in self.always:
            p.requires_grad_(True)
        for index, params in enumerate(self.layer_params):
            for p in params:
                p.requires_grad_(index in self.active)
                if index not in self.active:
                    p.grad = None
        for group, params in zip(self.optimizer.param_groups, self.group_params, strict=True):
            group["params"] = [p for p in params if p.requires_grad]
            for p in params:
                if not p.requires_grad:
                    self.optimizer.state.pop(p, None)
        self.history.append((self.steps, list(self.active)))
        return self.active

    def step(self) -> None:
        """Optimizer step and zero_grad; every ``period`` steps, a new draw."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        if self.steps % self.period == 0:
            self.switch()

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "active": list(self.active), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the same layers train and later draws continue the same sequence.

        Call it before ``optimizer.load_state_dict``, so the param groups have the saved parameter lists.
        """
        self.generator.set_state(state["generator"])
        self.steps = int(state["steps"])
        active = set(state["active"])
        for index, params in enumerate(self.layer_params):
            for p in params:
                p.requires_grad_(index in active)
        self.active = sorted(active)
        for group, params in zip(self.optimizer.param_groups, self.group_params, strict=True):
            group["params"] = [p for p in params if p.requires_grad]
