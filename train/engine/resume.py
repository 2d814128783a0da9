"""Resuming a run: which checkpoint, whether the new recipe may continue it, and what it changes.

``train.resume=auto`` takes the newest complete checkpoint; when it cannot be read (a truncated
``optimizer.pt``, a bad adapter file) the previous complete one is used instead, with a warning naming
the file, and the unreadable folder is moved aside to ``.broken-step-N`` (kept, never deleted) so that
the run's next save at that step is not mistaken for done. An explicit checkpoint folder has no
fall-back: its failure is the error.

After the load, the learning rates and weight decay of the NEW recipe replace those the optimizer and
scheduler states carried, so a lowered ``optim.lr`` takes effect from the resume step (the schedule's
position is kept).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mm.config import ConfigError
from train.engine.checkpoint import (
    CheckpointError,
    TrainState,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
)
from train.engine.config import Recipe

#: Optimizer group settings that come from the recipe, not from the saved optimizer state.
RECIPE_GROUP_KEYS = ("initial_lr", "weight_decay")


@dataclass
class Resumed:
    state: TrainState
    checkpoint: Path
    skipped: list[str] = field(default_factory=list)  # unreadable newer checkpoints, with their reason


def resume_candidates(recipe: Recipe, ckpt_root: Path) -> list[Path]:
    """The checkpoints ``train.resume`` allows, preferred first: 'none' (none), 'auto' (newest complete
    first, older ones as fall-backs) or one folder."""
    resume = recipe.train.resume
    if resume == "none":
        earlier = latest_checkpoint(ckpt_root)
        if earlier is not None:  # a fresh run would interleave its checkpoints with the old ones
            raise ConfigError(f"{recipe.source}: {recipe.out_dir} holds checkpoints of an earlier run (newest "
                              f"{earlier.name}); continue it with train.resume=auto, or pick another train.out_dir")
        return []
    if resume == "auto":
        return complete_checkpoints(ckpt_root)[::-1]
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise ConfigError(f"{recipe.source}: key 'train.resume': {path} is not a complete checkpoint folder")
    return [path]


def resume_run(accelerator, model, task, optimizer, scheduler, recipe: Recipe, candidates: list[Path],
               say=print) -> Resumed | None:
    """Load the first readable candidate (see module doc); None when there is none to resume. The caller
    has checked the recipe against the first candidate's (``run_folder.check_resume_recipe``)."""
    if not candidates:
        return None
    fresh_groups = [{k: g[k] for k in RECIPE_GROUP_KEYS if k in g} for g in optimizer.param_groups]
    skipped: list[str] = []
    for position, folder in enumerate(candidates):
        try:
            state = load_checkpoint(accelerator, model, task, optimizer, scheduler, folder)
            reason = None
        except Exception as err:  # noqa: BLE001  (any unreadable file: the previous checkpoint may do)
            reason = " ".join(str(err).split()) or type(err).__name__
            if str(folder) not in reason:
                reason = f"{folder}: {reason}"
        if _all_ranks(accelerator, reason is None):
            for broken in candidates[:position]:  # only now: a failed resume moves nothing
                set_aside(accelerator, broken)
            apply_recipe_rates(optimizer, scheduler, fresh_groups)
            return Resumed(state, folder, skipped)
        reason = reason or f"{folder}: unreadable on another process"
        if recipe.train.resume != "auto" or position == len(candidates) - 1:
            raise CheckpointError(reason + ("" if position == 0 else f" (the oldest of {len(candidates)} complete "
                                            "checkpoints; the newer ones are unreadable too: see the warnings)"))
        say(f"WARNING: checkpoint {reason}; falling back to {candidates[position + 1]}")
        skipped.append(reason)
    return None


def _all_ranks(accelerator, ok: bool) -> bool:
    """Whether every process loaded its part (all ranks must fall back together, or none)."""
    if accelerator.num_processes == 1:
        return ok
    import torch

    flags = accelerator.gather(torch.tensor([float(ok)], device=accelerator.device))
    return bool(flags.min() > 0)


def set_aside(accelerator, folder: Path) -> None:
    """Move an unreadable checkpoint out of the ``step-`` namespace, keeping its files for inspection."""
    if accelerator.is_main_process and folder.is_dir():
        os.replace(folder, folder.with_name(f".broken-{folder.name}"))
    accelerator.wait_for_everyone()


def apply_recipe_rates(optimizer, scheduler, fresh_groups: list[dict[str, Any]]) -> None:
    """Put the new recipe's base learning rates and weight decay (``fresh_groups``, read from the optimizer
    before the load) back into the loaded optimizer and scheduler, at the scheduler's current position."""
    groups = optimizer.param_groups
    if len(groups) != len(fresh_groups):
        raise CheckpointError(f"the checkpoint's optimizer has {len(groups)} parameter groups, this run "
                              f"{len(fresh_groups)}")
    for group, fresh in zip(groups, fresh_groups, strict=True):
        group.update(fresh)
    scheduler.base_lrs = [group["initial_lr"] for group in groups]
    rates = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas,
                                                                         strict=True)]
    for group, rate in zip(groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = rates  # what get_last_lr() reports (the loop logs it)
