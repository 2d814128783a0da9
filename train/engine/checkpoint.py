"""Checkpoints that survive a kill: everything is written into a hidden temp folder, which is renamed to
``step-NNNNNNNN`` only when complete. A kill at any moment leaves either the old set of checkpoints or
the old set plus one complete new one; a leftover temp folder is never taken for a checkpoint.

A checkpoint holds the adapters (``mm.save_adapters``, gathered under ZeRO-3), the other trainable
parameters (a task's head), the optimizer (DeepSpeed: its own sharded files), the scheduler, each rank's
RNG states, the data position and the resolved recipe.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import mm
from mm.errors import MMTuneError
from mm.state import atomic_write
from train.engine.config import Recipe, save_resolved
from train.engine.distributed import gathered, is_deepspeed, is_fsdp, loading

STEP_DIR = re.compile(r"step-(\d{8})")


@dataclass
class TrainState:
    """Where training stands: optimizer steps done and micro-batches consumed (the data position)."""

    step: int = 0
    micro_batches: int = 0
    skipped_steps: int = 0
    world_size: int = 1


class CheckpointError(MMTuneError, RuntimeError):
    """A checkpoint is missing, incomplete or does not fit this run; the message names the folder."""


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (a complete one has its ``state.json``)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.fullmatch(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)))


def latest_checkpoint(root: str | Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def extra_trainable(task: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters that are not adapter tensors (a task's head, say): saved beside the adapters."""
    in_adapters = {id(p) for _, layer in mm.adapted_layers(task) for p in layer.adapters.parameters()}
    return {n: p for n, p in task.named_parameters() if p.requires_grad and id(p) not in in_adapters}


def save_trainable(accelerator, task: nn.Module, folder: Path) -> None:
    """adapters.safetensors (+ trainable.safetensors for the rest); every rank calls, rank 0 writes."""
    params = [p for p in task.parameters() if p.requires_grad]
    with gathered(accelerator, params, owner=task):
        if accelerator.is_main_process:
            if mm.adapter_names(task):
                mm.save_adapters(task, folder / "adapters.safetensors")
            extras = {n: p.detach().cpu().contiguous().clone() for n, p in extra_trainable(task).items()}
            if extras:
                atomic_write(folder / "trainable.safetensors", lambda tmp: save_file(extras, tmp))


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data)))


def save_checkpoint(accelerator, model, task: nn.Module, optimizer, scheduler, state: TrainState,
                    recipe: Recipe, root: str | Path, keep_last: int) -> Path:
    """Write a checkpoint of ``state`` under ``root``; collective: every rank must call it."""
    root = Path(root)
    final = root / f"step-{state.step:08d}"
    if (final / "state.json").is_file():
        return final  # this step is saved already (a stop right after a save)
    tmp = root / f".tmp-step-{state.step:08d}"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover from a killed run
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        save_trainable(accelerator, task, tmp)
        if is_deepspeed(accelerator):
            # ZeRO shards the optimizer state; DeepSpeed writes each rank's part.
            model.save_checkpoint(str(tmp / "deepspeed"), tag="state", exclude_frozen_parameters=True,
                                  save_latest=False)
        elif is_fsdp(accelerator):
            _save_fsdp_optimizer(accelerator, model, optimizer, tmp / "optimizer.pt")
        elif accelerator.is_main_process:
            atomic_write(tmp / "optimizer.pt", lambda t: _torch_save(optimizer.state_dict(), t))
        _write_json(tmp / f"rng-rank{accelerator.process_index}.json", _rng_state())
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _write_json(tmp / "scheduler.json", scheduler.state_dict())
            save_resolved(recipe, tmp / "config.yaml")
            _write_json(tmp / "state.json", asdict(state))  # last: its presence marks the folder complete
            _fsync_dir(tmp)
            os.replace(tmp, final)
            _fsync_dir(root)
            prune(root, keep_last)
    except Exception as err:
        reason = storage_failure(err)
        if reason is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the earlier checkpoints stay
        path = getattr(err, "filename", None) or tmp
        raise CheckpointError(f"{path}: {reason} while writing checkpoint {final.name}; the earlier "
                              f"checkpoints in {root} are kept") from None
    accelerator.wait_for_everyone()
    return final


#: errno values that mean the storage refused a write (full, over quota, read-only, no permission).
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def storage_failure(err: BaseException) -> str | None:
    """A one-phrase reason when ``err`` is the storage refusing a write, else None (a bug: re-raised).
    Writers that are not Python's own (safetensors' Rust, torch's zip writer) only say it in words."""
    if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
        return err.strerror or os.strerror(err.errno)
    text = str(err)
    if "No space left" in text or "StorageFull" in text or "os error 28" in text:
        return os.strerror(errno.ENOSPC)
    return None


def _torch_save(data: Any, path: str) -> None:
    """torch.save through an in-memory buffer: a full disk is then Python's OSError(ENOSPC) naming the
    file, not the zip writer's opaque "file write failed"."""
    buffer = io.BytesIO()
    torch.save(data, buffer)
    with open(path, "wb") as handle:
        handle.write(buffer.getbuffer())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(root: Path, keep_last: int) -> None:
    """Drop all but the newest ``keep_last`` complete checkpoints and any leftover temp folders. A folder
    is renamed out of the ``step-`` namespace before it is deleted, so a kill mid-delete leaves no
    half-deleted folder that looks complete."""
    doomed = complete_checkpoints(root)[:-keep_last]
    for path in doomed:
        trash = root / f".trash-{path.name}"
        os.replace(path, trash)
    for path in root.iterdir():
        if path.name.startswith(".trash-") or (path.name.startswith(".tmp-") and path.is_dir()):
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(accelerator, model, task: nn.Module, optimizer, scheduler, folder: str | Path) -> TrainState:
    """Restore a checkpoint written by ``save_checkpoint`` into the prepared run; returns its state."""
    folder = Path(folder)
    if not (folder / "state.json").is_file():
        raise CheckpointError(f"{folder}: not a complete checkpoint (no state.json)")
    state = TrainState(**read_part(folder / "state.json", _read_json))
    if state.world_size != accelerator.num_processes:
        raise CheckpointError(f"{folder}: saved with {state.world_size} processes, this run has "
                              f"{accelerator.num_processes}; the data position and RNG states would not carry over")
    if is_deepspeed(accelerator):
        _weights_only_loads(model)
        path, _ = model.load_checkpoint(str(folder / "deepspeed"), tag="state", load_module_strict=False,
                                        load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"{folder}/deepspeed: DeepSpeed found no checkpoint to load")
    elif is_fsdp(accelerator):
        with loading(accelerator):  # each rank copies its own slice of the saved full tensors
            load_trainable(task, folder)
        _load_fsdp_optimizer(model, optimizer, folder / "optimizer.pt")
    else:
        # Read every file before changing anything, so an unreadable one leaves the run as it was.
        optimizer_state = read_part(folder / "optimizer.pt",
                                    lambda p: torch.load(p, map_location="cpu", weights_only=True))
        scheduler_state = read_part(folder / "scheduler.json", _read_json)
        load_trainable(task, folder)
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
    if is_deepspeed(accelerator) or is_fsdp(accelerator):
        scheduler.load_state_dict(read_part(folder / "scheduler.json", _read_json))
    _set_rng_state(read_part(folder / f"rng-rank{accelerator.process_index}.json", _read_json))
    return state


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def read_part(path: Path, read: Any) -> Any:
    """``read(path)``; any failure (missing, truncated, corrupt) becomes a ``CheckpointError`` naming the file."""
    try:
        return read(path)
    except MMTuneError:
        raise
    except Exception as err:  # noqa: BLE001  (zip, pickle, JSON, safetensors and OS errors alike)
        detail = " ".join(str(err).split()) or type(err).__name__
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {detail[:200]})") from None


def _save_fsdp_optimizer(accelerator, model, optimizer, path: Path) -> None:
    """FSDP2: the optimizer state of every rank's slices, gathered into full tensors keyed by parameter
    name (collective; rank 0 writes), so the file reads like a single-process optimizer's."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), options=options)
    if accelerator.is_main_process:
        atomic_write(path, lambda t: torch.save(state, t))


def _load_fsdp_optimizer(model, optimizer, path: Path) -> None:
    """FSDP2: every rank reads the full optimizer state and keeps its own slices (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = torch.load(path, map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), state,
                             options=StateDictOptions(full_state_dict=True))


def _weights_only_loads(engine) -> None:
    """Make the DeepSpeed engine read its checkpoint files with ``torch.load(weights_only=True)``: its own
    engine unpickles arbitrary objects, and nothing loaded from disk may run code."""
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    if checkpoint_engine is None:
        raise CheckpointError("this DeepSpeed engine has no checkpoint_engine to load through safely")

    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    # DeepSpeed's files hold tensors, containers, an enum and the loss scaler's plain attributes: allow
    # exactly those two classes (rebuilt from their attribute dicts, no code of the file's choosing runs).
    allowed = [ZeroStageEnum, LossScaler]

    def load(path: str, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    checkpoint_engine.load = load


def load_trainable(task: nn.Module, folder: str | Path) -> None:
    """Load adapters.safetensors and trainable.safetensors from ``folder`` into ``task`` (not ZeRO-3)."""
    folder = Path(folder)
    if (folder / "adapters.safetensors").is_file():
        mm.load_adapters(task, folder / "adapters.safetensors")
    extras = extra_trainable(task)
    if extras:
        saved = read_part(folder / "trainable.safetensors", lambda p: load_file(str(p)))
        missing = sorted(set(extras) - set(saved))
        if missing:
            raise CheckpointError(f"{folder}/trainable.safetensors: missing {missing}")
        with torch.no_grad():
            for name, param in extras.items():
                if saved[name].shape != param.shape:
                    raise CheckpointError(f"{folder}/trainable.safetensors: {name} has shape "
                                          f"{tuple(saved[name].shape)}, the model {tuple(param.shape)}")
                param.copy_(saved[name])
