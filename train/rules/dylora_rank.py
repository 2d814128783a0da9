"""The ``dylora_rank`` rule: one DyLoRA training rank per optimizer step, shared by every layer.

DyLoRA (Valipour et al., 2023) samples b ~ U{r_min, ..., r} once per training step and trains the
truncated adapter at rank b in all layers. Without this rule each DyLoRA layer draws its own rank on every
forward pass (``mm/adapters/dylora.py``), so the layers of one step disagree. The rule pins one rank per
adapter name before the step's first micro-batch (all micro-batches of a step share it) and logs it as
``dylora_rank`` (``dylora_rank/<adapter>`` when a recipe has several DyLoRA adapters).

The draw is a pure function of (seed, step): a resumed run draws the ranks the uninterrupted run would
have drawn, and every process draws the same rank without communicating.

    train:
      rules: [dylora_rank]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mm.config import ConfigError
from train.rules.base import RULES, RuleConfig, RuleHooks, step_seed


@dataclass
class DyLoRARankConfig(RuleConfig):
    seed: int | None = field(default=None, metadata={"help": "Seed of the rank draws (null: the recipe seed)."})

    def validate(self, recipe: Any, key: str) -> None:
        methods = {name: type(cfg).method for name, cfg in recipe.adapters.items()}
        if "dylora" not in methods.values():
            listed = ", ".join(f"{n} ({m})" for n, m in methods.items()) or "none"
            raise ConfigError(f"{recipe.source}: key '{key}': dylora_rank needs an adapter with method: dylora; "
                              f"the recipe's adapters: {listed}")


@RULES.register("dylora_rank")
class DyLoRARank(RuleHooks):
    """Pins ``train_rank`` of every DyLoRA adapter to one draw per step (``mm.adapters.dylora.sample_rank``)."""

    config_class = DyLoRARankConfig

    def on_train_start(self, task: Any, optimizer: Any, accelerator: Any, step: int) -> None:
        self.task = task
        self.ranks: dict[str, int] = {}

    def on_step_start(self, step: int) -> None:
        from mm.adapters.dylora import sample_rank

        seed = self.recipe.seed if self.config.seed is None else self.config.seed
        self.ranks = sample_rank(self.task, torch.Generator().manual_seed(step_seed(seed, step, salt=0xD1)))

    def on_step_end(self, step: int, logs: dict[str, float]) -> None:
        if len(self.ranks) == 1:
            logs["dylora_rank"] = float(next(iter(self.ranks.values())))
        else:
            logs.update({f"dylora_rank/{name}": float(rank) for name, rank in self.ranks.items()})
