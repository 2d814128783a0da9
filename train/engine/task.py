"""Tasks: what a recipe trains. A task is an ``nn.Module`` = backbone + adapters + head + loss.

The loop needs only the ``Task`` protocol below. A task declares the recipe sections it reads
(``sections``: name -> config dataclass) and registers itself with ``@TASKS.register(name)``; a
recipe's ``task:`` key picks it. A track adds its task module to ``TASK_MODULES`` (one line).

The tasks themselves live in ``train/tasks/`` (one module per track); a task never imports another.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

import mm
from mm.registry import Registry

#: Task classes by the name a recipe's ``task:`` key uses.
TASKS: Registry[type] = Registry("task")

#: Modules whose import registers tasks; tracks append theirs here.
TASK_MODULES = ["train.tasks.digits", "train.tasks.lm", "train.tasks.eo", "train.tasks.avsr", "train.tasks.mllm",
                "train.tasks.multi_adapter"]


def get_task(name: str) -> type:
    """The task class registered as ``name`` (imports ``TASK_MODULES`` first)."""
    for module in TASK_MODULES:
        importlib.import_module(module)
    return TASKS.get(name)


@runtime_checkable
class Task(Protocol):
    """What ``train.engine.loop`` calls. ``forward(batch)`` must equal ``training_step(batch)`` so that DDP and
    DeepSpeed see the step as the wrapped module's forward."""

    sections: ClassVar[dict[str, type]]

    def training_step(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]: ...

    def evaluate(self, batches: Iterable[Any]) -> dict[str, float]: ...

    def train_dataset(self) -> Sequence[Any]: ...

    def eval_dataset(self) -> Sequence[Any] | None: ...

    def collate(self, samples: list[Any]) -> Any: ...


def add_balance_loss(model: nn.Module, loss: torch.Tensor, logs: dict[str, float]):
    """(task loss + every active mixture's weighted balance loss, logs with it and the routers' health).

    Logged per step: ``moe_aux_loss`` (what was added), ``moe_router_entropy`` (mean over blocks; log E is
    uniform routing) and ``moe_max_expert_share`` (the busiest expert's share of its block's choices;
    1/E is perfect balance). Per-expert detail: ``mm.adapters.moe.router_logs``.
    """
    from mm.adapters.moe import aux_loss, mixtures, router_stats

    found = list(mixtures(model))  # one walk of the model per step
    if not found:
        return loss, logs
    extra = aux_loss(model, found)
    stats = router_stats(model, found)
    logs = {**logs, "moe_aux_loss": float(extra.detach())}
    if stats:
        logs["moe_router_entropy"] = sum(s.entropy for s in stats) / len(stats)
        logs["moe_max_expert_share"] = max(max(s.tokens_per_expert) / max(1, sum(s.tokens_per_expert))
                                           for s in stats)
    return loss + extra.to(loss.dtype), logs


class AdapterTask(nn.Module):
    """Shared plumbing: quantise the backbone if asked, attach the recipe's adapters, default collate."""

    sections: ClassVar[dict[str, type]] = {}

    def __init__(self, recipe: Any) -> None:
        super().__init__()
        self.recipe = recipe

    @classmethod
    def validate(cls, recipe: Any) -> None:
        """Cross-section checks (raise ``mm.ConfigError`` naming the key and ``recipe.source``)."""

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        loss, logs = self.training_step(batch)
        return add_balance_loss(self, loss, logs)

    def training_step(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def collate(self, samples: list[Any]) -> Any:
        return torch.utils.data.default_collate(samples)

    def seeded(self):
        """A block whose random draws (base init, adapter init) depend on the recipe seed alone, so every
        rank, and a later rebuild from the saved config, gets the same modules."""
        return _Seeded(self.recipe.seed)

    def adapt(self, backbone: nn.Module) -> nn.Module:
        """Quantise (``quant.mode``) then attach every adapter of the recipe to ``backbone``."""
        from train.engine.quant import quantize_linears

        if self.recipe.quant.mode != "none":
            quantize_linears(backbone, self.recipe.quant)
        for name, config in self.recipe.adapters.items():
            mm.attach(backbone, config, name)
        return backbone


class _Seeded:
    def __init__(self, seed: int) -> None:
        self.seed, self.fork = seed, None

    def __enter__(self) -> None:
        self.fork = torch.random.fork_rng(devices=[])
        self.fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc) -> None:
        self.fork.__exit__(*exc)
