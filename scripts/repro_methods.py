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


def _lora_sb_init(model: nn.Module, name: str, calibration: Calibration) -> None:
    from mm.adapters import lora_sb

    lora_sb.initialize(model, calibration.batches, calibration.loss_fn, name=name)


def _dylora_modes(model: nn.Module, name: str, calibration: Calibration) -> None:
    """The repro loop never calls model.eval(), so tell DyLoRA training from evaluation by autograd mode.

    Forwards with gradients (training steps) draw one rank for every layer, as the paper's per-step rule;
    no-grad forwards (the loop's evaluations) run at the adapter's eval_rank.
    """
    import mm
    from mm.adapters import dylora

    adapters = [layer.adapters[name] for _, layer in mm.adapted_layers(model) if name in layer.adapters]

    def choose_mode(module: nn.Module, args: tuple) -> None:
        training = torch.is_grad_enabled()
        for adapter in adapters:
            adapter.train(training)
        if training:
            dylora.sample_rank(module)

    model.register_forward_pre_hook(choose_mode)


def _dylora_row(eval_rank: int, *, plain: bool = False) -> ReproMethod:
    if plain:  # r_min = r and update 'all': exactly LoRA(r, alpha) training, then cut to eval_rank components
        config = {"method": "dylora", "r": RANK, "alpha": 2.0 * RANK, "r_min": RANK, "update": "all",
                  "eval_rank": eval_rank}
        claim = f"baseline for DyLoRA: a plain LoRA trained at rank {RANK}, evaluated on its first {eval_rank}"
    else:
        config = {"method": "dylora", "r": RANK, "alpha": 2.0 * RANK, "eval_rank": eval_rank}
        claim = f"one DyLoRA adapter (ranks 1..{RANK} trained at once) is good at rank {eval_rank} too"
    return ReproMethod(config, init=_dylora_modes, claim=claim)


def _full_fine_tuning(model: nn.Module, name: str, calibration: Calibration) -> None:
    """Reference row: the adapted layers' own weights and biases train; the (rank-1) adapter stays frozen at 0."""
    import mm

    for _, layer in mm.adapted_layers(model):
        layer.adapters[name].requires_grad_(False)
        layer.base.requires_grad_(True)


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
    "lora_xs": ReproMethod(
        {"method": "lora_xs", "r": RANK, "alpha": float(RANK)},
        claim="near-LoRA accuracy training only an r x r core between frozen SVD factors of W",
    ),
    "lora_sb": ReproMethod(
        {"method": "lora_sb", "r": RANK, "alpha": float(RANK), "init_lr": 2e-3}, init=_lora_sb_init,
        claim="near-LoRA accuracy with far fewer parameters (r x r core, init = approximated first full step)",
    ),
    "loldu": ReproMethod(
        {"method": "loldu", "r": RANK, "alpha": float(RANK), "full_rank": True},
        claim="near-LoRA accuracy with far fewer parameters (only the LDU diagonal and a scale train)",
    ),
    **{f"dylora@{b}": _dylora_row(b) for b in range(1, RANK)},
    "dylora": _dylora_row(RANK),
    **{f"lora-cut@{b}": _dylora_row(b, plain=True) for b in range(1, RANK)},
    "full_ft": ReproMethod(
        {"method": "lora", "r": 1}, init=_full_fine_tuning,
        claim="reference: full fine-tuning of the adapted layers (the gap RandLoRA should close)",
    ),
    "block_lora": ReproMethod(
        {"method": "block_lora", "r": RANK, "alpha": 2.0 * RANK, "blocks": 2},
        claim="matches LoRA with fewer parameters (one down-projection block shared by the input chunks)",
    ),
    "nola": ReproMethod(
        {"method": "nola", "r": RANK, "alpha": 2.0 * RANK, "num_basis_a": 128, "num_basis_b": 128},
        claim="matches LoRA with fewer parameters (only mixing coefficients of random bases train)",
    ),
    "randlora": ReproMethod(  # rank 16: RandLoRA's parameter count at LoRA rank 4's budget, alpha 20 r as PEFT
        {"method": "randlora", "r": 4 * RANK, "alpha": 80.0 * RANK},
        claim="closes more of the gap to full fine-tuning than LoRA at a similar parameter count (full rank)",
    ),
    "bone": ReproMethod({"method": "bone", "r": RANK}, claim="block affine update guided by W (Bat)"),
    "mos": ReproMethod(
        {"method": "mos", "r": RANK, "alpha": 2.0 * RANK, "pool_shards": 2 * RANK, "private_shards": 2},
        claim="LoRA-like accuracy from shards shared across layers (fewer parameters at the same rank)",
    ),
}
