"""LISA (Pan et al., 2024): layerwise importance sampling, a training rule for full fine-tuning.

The model's middle layers are the blocks of its layer list (``model.layers`` in Llama, ``transformer.h``
in GPT-2, ``blocks`` in a ViT, ...). Every ``period`` optimizer steps LISA freezes all of them and
unfreezes ``n_layers`` drawn uniformly without replacement (the paper's gamma); everything outside the
layer list (embeddings, final norm, output head) always trains. Frozen parameters get no gradient and no
optimizer state: on each switch the state (e.g. AdamW moments) of parameters that stopped training is
dropped, so optimizer memory is that of the always-trained part plus gamma layers. Parameters that keep
training across a switch keep their state. The param groups keep every parameter: torch's optimizers (and
bitsandbytes', and ALLoRA) skip a parameter without a gradient, weight decay included, and unchanged
groups let an optimizer checkpoint load whichever layers were active when it was saved.

The k-th draw is a pure function of (seed, k): the layers training at any step follow from the step
number alone, which is all a resumed run needs (``LISA(..., start_step=s)``).

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    lisa = LISA(model, optimizer, n_layers=2, period=50, seed=0)
    for batch in batches:
        loss_fn(model, batch).backward()
        lisa.step()  # optimizer step, zero_grad, and a new draw every `period` steps

In ``mmtune train`` the ``lisa`` rule does this over what the recipe trains (adapters and head):
``train.rules: [{name: lisa, n_layers: 1, period: 5}]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mm.config import ConfigError
from train.rules.base import RULES, RuleConfig, RuleHooks, inner_optimizer, step_seed

#: Where common backbones keep their blocks, tried in order when ``layers`` is not given.
LAYER_LISTS = ("model.layers", "transformer.h", "model.decoder.layers", "encoder.layer", "blocks",
               "transformer.resblocks", "layers", "h")


def _layer_list_at(model: nn.Module, path: str) -> nn.ModuleList | None:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    return module if isinstance(module, nn.ModuleList) and len(module) > 0 else None


def find_layer_list(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of the model's blocks: at ``path``, else the first of ``LAYER_LISTS`` present
    at the top or, failing that, below it (a task keeps its backbone under ``lm``, ``encoder``, ...)."""
    if path is not None:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"LISA: {type(model).__name__} has no module {path!r}") from None
        if not (isinstance(module, nn.ModuleList) and len(module) > 0):
            raise ValueError(f"LISA: {path!r} in {type(model).__name__} is a {type(module).__name__}, not a "
                             "non-empty nn.ModuleList of layers")
        return path, module
    for candidate in LAYER_LISTS:
        if (found := _layer_list_at(model, candidate)) is not None:
            return candidate, found
    for prefix, _ in model.named_modules():
        for candidate in LAYER_LISTS:
            if prefix and (found := _layer_list_at(model, f"{prefix}.{candidate}")) is not None:
                return f"{prefix}.{candidate}", found
    raise ValueError(f"LISA: found none of {', '.join(LAYER_LISTS)} in {type(model).__name__}; pass layers='<path "
                     "to the nn.ModuleList of blocks>'")


def lisa_draw(seed: int, index: int, n_layers: int, total: int) -> list[int]:
    """Draw ``index`` of a LISA schedule: ``n_layers`` of ``total`` layers, uniformly without replacement."""
    generator = torch.Generator().manual_seed(step_seed(seed, index, salt=0x115A))
    return sorted(int(i) for i in torch.randperm(total, generator=generator)[:n_layers])


class LISA:
    """Owns which layers train: call ``step()`` instead of ``optimizer.step()`` + ``zero_grad()``
    (or ``advance()`` after stepping the optimizer yourself)."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, *, n_layers: int = 2, period: int = 20,
        layers: str | None = None, seed: int = 0, candidates: Callable[[str, nn.Parameter], bool] | None = None,
        start_step: int = 0,
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
        self.optimizer, self.n_layers, self.period, self.seed = optimizer, n_layers, period, seed
        managed = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, p in model.named_parameters() if id(p) in chosen and id(p) not in managed]
        if missing:
            raise ValueError(f"LISA: the optimizer does not hold {len(missing)} parameter(s) LISA manages, e.g. "
                             f"{missing[:3]}; build it over the same parameters")
        self.steps = start_step
        self.draws = start_step // period  # index of the next draw
        self.active: list[int] = []
        self.history: list[tuple[int, list[int]]] = []  # (step at which the draw starts, layers drawn)
        self.switch()

    def draw(self, index: int) -> list[int]:
        """The layers of draw ``index`` (``lisa_draw`` of this schedule)."""
        return lisa_draw(self.seed, index, self.n_layers, len(self.layer_params))

    def switch(self) -> list[int]:
        """Take the next draw: its layers train, the rest freeze and lose their gradients and optimizer state."""
        self.active = self.draw(self.draws)
        self.draws += 1
        for p in self.always:
            p.requires_grad_(True)
        for index, params in enumerate(self.layer_params):
            for p in params:
                p.requires_grad_(index in self.active)
                if index not in self.active:
                    p.grad = None
                    self.optimizer.state.pop(p, None)
        self.history.append((self.steps, list(self.active)))
        return self.active

    def advance(self) -> None:
        """Count one finished optimizer step; every ``period`` steps, a new draw."""
        self.steps += 1
        if self.steps % self.period == 0:
            self.switch()

    def step(self) -> None:
        """Optimizer step and zero_grad, then ``advance``."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.advance()

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the layers of that step train and later draws continue the same sequence."""
        self.steps = int(state["steps"])
        self.draws = self.steps // self.period
        self.switch()


@dataclass
class LISARuleConfig(RuleConfig):
    n_layers: int = field(default=2, metadata={"help": "Layers that train at a time (the paper's gamma)."})
    period: int = field(default=20, metadata={"help": "Optimizer steps between two draws (the paper's K)."})
    layers: str | None = field(
        default=None, metadata={"help": "Path of the nn.ModuleList of blocks in the task (null: found, e.g. "
                                        "lm.model.layers, encoder.blocks)."})
    seed: int | None = field(default=None, metadata={"help": "Seed of the draws (null: the recipe seed)."})

    def validate(self, recipe: Any, key: str) -> None:
        if self.n_layers < 0 or self.period < 1:
            raise ConfigError(f"{recipe.source}: key '{key}': lisa needs n_layers >= 0 and period >= 1, got "
                              f"n_layers={self.n_layers}, period={self.period}")
        if recipe.train.deepspeed is not None:
            raise ConfigError(f"{recipe.source}: key '{key}': lisa freezes layers between steps, which "
                              "DeepSpeed's engine does not allow; drop train.deepspeed")


@RULES.register("lisa")
class LISARule(RuleHooks):
    """LISA over the recipe's trainable parameters: adapters (and a head) outside the drawn layers freeze."""

    config_class = LISARuleConfig

    def on_train_start(self, task: Any, optimizer: Any, accelerator: Any, step: int) -> None:
        cfg = self.config
        from train.engine.distributed import is_deepspeed

        if accelerator.num_processes > 1 or is_deepspeed(accelerator):
            # DDP fixes the set of parameters that receive gradients when it wraps the model.
            raise ConfigError(f"{self.recipe.source}: key 'train.rules': lisa runs in one process without "
                              f"DeepSpeed; this run has {accelerator.num_processes} process(es)")
        trainable = {id(p) for p in task.parameters() if p.requires_grad}
        try:
            self.lisa = LISA(task, inner_optimizer(optimizer), n_layers=cfg.n_layers, period=cfg.period,
                             layers=cfg.layers, seed=self.recipe.seed if cfg.seed is None else cfg.seed,
                             candidates=lambda _, p: id(p) in trainable, start_step=step)
        except ValueError as err:
            raise ConfigError(f"{self.recipe.source}: key 'train.rules': {err}") from None

    def on_step_end(self, step: int, logs: dict[str, float]) -> None:
        self.lisa.advance()
