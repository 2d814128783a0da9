"""The methods ``scripts/repro.py`` can run: one row per method in ``METHODS``.

Add a method by adding a row: ``ReproMethod(config, init=None, ...)``. ``config`` holds the keys of
``mm.AdapterConfig.from_dict`` except ``targets`` (the script adapts every linear layer of its MLP); use the
same rank as the ``lora`` row unless the method's point is a different size. ``init`` is for data-driven
initialisers: it is called right after ``mm.attach`` as ``init(model, adapter_name, calibration)`` and must
leave the adapter ready to train. ``make_optimizer`` replaces the default AdamW for methods that are a
training rule. Imports of method modules stay inside the functions so that listing the table is cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Calibration:
    """What a data-driven initialiser may use: labelled training batches and the task's loss."""

    batches: list[tuple[torch.Tensor, torch.Tensor]]  # (inputs, labels) from the adaptation training split
    loss_fn: Callable[[nn.Module, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]  # (model, batch) -> loss

    @property
    def inputs(self) -> list[torch.Tensor]:
        return [x for x, _ in self.batches]


@dataclass
class ReproMethod:
    config: dict[str, Any]
    init: Callable[[nn.Module, str, Calibration], None] | None = None
    # (trainable parameters, learning rate) -> optimizer; None: AdamW at the run's learning rate.
    make_optimizer: Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer] | None = None
    claim: str = field(default="", metadata={"help": "The paper's claim this row is there to check."})


def _lora_ga_init(model: nn.Module, name: str, calibration: Calibration) -> None:
    from mm.adapters import lora_ga

    lora_ga.initialize(model, calibration.batches, calibration.loss_fn, name=name)


def _eva_init(model: nn.Module, name: str, calibration: Calibration) -> None:
    from mm.adapters import eva

    eva.initialize(model, calibration.inputs, name=name)


RANK = 4

METHODS: dict[str, ReproMethod] = {
    "lora": ReproMethod({"method": "lora", "r": RANK, "alpha": 2.0 * RANK}, claim="baseline"),
    "pissa": ReproMethod(
        {"method": "pissa", "r": RANK, "alpha": float(RANK)},
        claim="converges faster than LoRA (principal singular directions train, residual frozen)",
    ),
    "lora_ga": ReproMethod(
        {"method": "lora_ga", "r": RANK, "alpha": 2.0 * RANK}, init=_lora_ga_init,
        claim="converges faster than LoRA (first step aligned with the full gradient)",
    ),
    "eva": ReproMethod(
        {"method": "eva", "r": RANK, "alpha": 2.0 * RANK}, init=_eva_init,
        claim="converges faster than LoRA (A from activation principal directions, ranks redistributed)",
    ),
}
