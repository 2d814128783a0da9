"""Checks before the first training step, so that a run fails in seconds rather than at its first save
after the work it was meant to keep: the run and checkpoint folders are writable, the disk has room for
a checkpoint (estimated from the trainable state), and the files the recipe names exist.

Each failure is a ``PreflightError`` (one line from ``mmtune``: the folder or key, and what is wrong).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from mm.errors import MMTuneError

#: Optimizer states kept per trainable value, in fp32 values (AdamW: exp_avg and exp_avg_sq).
OPTIMIZER_STATES = {"adamw": 2, "adamw8bit": 0.5, "sgd": 1}
#: Room asked beyond one checkpoint: the new one is written in full before the oldest is pruned, and
#: the final adapters and logs go beside it.
DISK_MARGIN = 2.0
#: Fixed overhead of a checkpoint (JSON states, RNG states, the recipe), bytes.
CHECKPOINT_OVERHEAD = 1 << 20


class PreflightError(MMTuneError, OSError):
    """A run cannot start: a folder is not writable, the disk is too full, a file the recipe names is missing."""


def check_writable(folder: str | Path, what: str) -> Path:
    """Create ``folder`` if needed and write (then remove) a small file in it: the real test, where
    permission bits, read-only mounts and ACLs all have their say."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".preflight-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise PreflightError(f"{folder}: the {what} is not writable ({reason}); pick another train.out_dir "
                             "or fix its permissions") from None
    return folder


def checkpoint_bytes(parameters: Iterable, optimizer_name: str) -> int:
    """Estimated size of one checkpoint: the trainable tensors, their optimizer states and a fixed overhead."""
    values, weight_bytes = 0, 0
    for param in parameters:
        values += param.numel()
        weight_bytes += param.numel() * param.element_size()
    states = OPTIMIZER_STATES.get(optimizer_name, 2)
    return int(weight_bytes + values * 4 * states + CHECKPOINT_OVERHEAD)


def check_disk(folder: str | Path, needed: int) -> None:
    """Free space under ``folder`` must hold ``DISK_MARGIN`` checkpoints of ``needed`` bytes."""
    free = shutil.disk_usage(folder).free
    if free < DISK_MARGIN * needed:
        raise PreflightError(f"{folder}: {_mb(free)} free, a checkpoint of this run needs about {_mb(needed)} "
                             f"(and {DISK_MARGIN:g}x that while the next one is written); free some space "
                             "or pick another train.out_dir")


def check_files(required: Iterable[tuple[str, str | Path]], source: str) -> None:
    """Every (recipe key, path) pair names an existing file or folder. The loop passes what the task
    class's optional ``required_files(recipe)`` lists (a task that generates missing data lists nothing)."""
    missing = [(key, path) for key, path in required if path and not Path(path).exists()]
    if missing:
        listed = "; ".join(f"key {key!r}: no such file {str(path)!r}" for key, path in missing)
        raise PreflightError(f"{source}: {listed}")


def _mb(count: float) -> str:
    return f"{count / 2**20:.1f} MB"
