"""Accelerate and DeepSpeed set-up for the loop: one process, DDP, or DeepSpeed ZeRO-2/3, on GPUs or on
the CPU (gloo). Kept apart from the loop so that the loop reads as training, not plumbing.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mm.config import ConfigError
from train.engine.config import Recipe


def launched_distributed() -> bool:
    """Whether a launcher (torchrun, accelerate launch, deepspeed) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ


def deepspeed_config(recipe: Recipe, base: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed JSON ``base`` with the values the recipe owns filled in.

    The files in configs/deepspeed/ say "auto" for batch size, accumulation, clipping and precision:
    the recipe decides those, so a launcher config never disagrees with the recipe.
    """
    config = dict(base)
    t = recipe.train
    config["train_micro_batch_size_per_gpu"] = t.batch_size
    config["gradient_accumulation_steps"] = t.grad_accum
    config["gradient_clipping"] = float(t.clip_norm) if t.clip_norm else 0.0
    config["bf16"] = {**config.get("bf16", {}), "enabled": t.precision == "bf16"}
    config.pop("train_batch_size", None)  # DeepSpeed derives it from the two above and the world size
    # The loop builds a torch optimizer (or bitsandbytes' 8-bit AdamW); ZeRO wraps it.
    config.setdefault("zero_allow_untested_optimizer", True)
    if "optimizer" in config or "scheduler" in config:
        raise ConfigError(f"{deepspeed_file(recipe)}: remove 'optimizer'/'scheduler'; the recipe's optim "
                          "section defines them")
    return config


def make_accelerator(recipe: Recipe):
    """An ``Accelerator`` for the recipe: DeepSpeed if ``train.deepspeed`` (or ``accelerate launch``'s
    config) asks for it, DDP when launched with several processes, else one process."""
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import InitProcessGroupKwargs

    t = recipe.train
    kwargs: dict[str, Any] = {}
    if launched_distributed() and not torch.cuda.is_available():
        # Without this accelerate picks no backend for DeepSpeed on the CPU (shared ENVIRONMENT.md).
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    ds_file = deepspeed_file(recipe)
    if ds_file:
        if not launched_distributed():
            raise ConfigError(f"{recipe.source}: DeepSpeed needs a launcher: scripts/launch_deepspeed.sh "
                              "<recipe> <processes> (or scripts/launch_accelerate.sh with a zero config)")
        if not torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"):
            raise ConfigError("ACCELERATE_USE_CPU=1 makes accelerate ignore DeepSpeed; unset it for DeepSpeed runs")
        config = deepspeed_config(recipe, _read_json(ds_file, recipe))
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=config)
    else:
        kwargs["gradient_accumulation_steps"] = t.grad_accum
        kwargs["mixed_precision"] = "bf16" if t.precision == "bf16" else "no"
    if not launched_distributed():
        # accelerate keeps its state in process-wide singletons; a second run in one process (tests,
        # notebooks) with other settings must start from scratch.
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return Accelerator(**kwargs)


def deepspeed_file(recipe: Recipe) -> str | None:
    """The DeepSpeed JSON to use: the recipe's ``train.deepspeed``, else the one ``accelerate launch``
    was given (its config names it in ``deepspeed_config_file``), else None."""
    if recipe.train.deepspeed:
        return recipe.train.deepspeed
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not path or path == "none":
        raise ConfigError("accelerate launch asked for DeepSpeed without a JSON: set deepspeed_config_file "
                          "in the accelerate config (see configs/accelerate/zero2.yaml)")
    return path


def _read_json(path: str, recipe: Recipe) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{recipe.source}: DeepSpeed config {path}: cannot read it ({err})") from None


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator) -> int:
    if not is_deepspeed(accelerator):
        return 0
    return int(accelerator.state.deepspeed_plugin.zero_stage)


@contextlib.contextmanager
def gathered(accelerator, params: list[nn.Parameter]) -> Iterator[None]:
    """Inside the block every rank holds the full ``params``: ZeRO-3 partitions them between ranks (a
    rank alone sees shape [0]), so saving without this gathers nothing. No-op for other set-ups."""
    if zero_stage(accelerator) == 3 and params:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def all_ranks_agree(accelerator, flag: bool) -> bool:
    """True when ``flag`` holds on every process (one tiny all-reduce)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([0.0 if flag else 1.0], device=accelerator.device)
    return float(accelerator.reduce(value, "sum")) == 0.0


def rank_disagreement(accelerator, params: list[nn.Parameter]) -> float:
    """Largest difference between any rank's and rank 0's fingerprint of ``params`` (0.0: they agree).

    A fingerprint is (sum, sum of squares, a position-weighted sum) per tensor in float64: replicas
    that drifted apart (a missed all-reduce, a rank-dependent init) show up as a non-zero value.
    """
    if accelerator.num_processes == 1:
        return 0.0
    with gathered(accelerator, params):
        rows = []
        for p in params:
            flat = p.detach().double().flatten()
            weights = torch.cos(torch.arange(flat.numel(), device=flat.device, dtype=torch.float64))
            rows.append(torch.stack([flat.sum(), flat.square().sum(), (flat * weights).sum()]))
        fingerprint = torch.stack(rows).to(accelerator.device)
    everyone = accelerator.gather(fingerprint.unsqueeze(0))  # (ranks, tensors, 3)
    return float((everyone - everyone[0:1]).abs().max())


def validate_deepspeed_config(path: str | Path) -> dict[str, Any]:
    """A configs/deepspeed JSON: readable, a known ZeRO stage, and no optimizer/scheduler of its own."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not a readable JSON file ({err})") from None
    stage = config.get("zero_optimization", {}).get("stage")
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: key 'zero_optimization.stage' must be 0-3, got {stage!r}")
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise ConfigError(f"{path}: remove key {key!r}; the recipe's optim section defines it")
    return config


def validate_accelerate_config(path: str | Path) -> Any:
    """A configs/accelerate YAML: accelerate itself parses it (unknown keys are its error); a DeepSpeed one
    must name an existing configs/deepspeed JSON (paths are relative to the repository root)."""
    from accelerate.commands.config.config_args import ClusterConfig

    try:
        config = ClusterConfig.from_yaml_file(str(path))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{path}: {err}") from None
    if str(config.distributed_type) in ("DEEPSPEED", "DistributedType.DEEPSPEED"):
        ds_file = (config.deepspeed_config or {}).get("deepspeed_config_file")
        root = Path(path).resolve().parents[2]
        if not ds_file or not (root / ds_file).is_file():
            raise ConfigError(f"{path}: key 'deepspeed_config.deepspeed_config_file' must name an existing "
                              f"JSON relative to {root}, got {ds_file!r}")
        validate_deepspeed_config(root / ds_file)
    return config
