"""One run per run folder: an OS file lock on ``<out_dir>/.lock``.

Two runs writing one folder lose each other's metrics rows and checkpoints, so the second stops at once,
naming the holder's pid. The lock is ``fcntl.flock``: the kernel drops it when the holding process dies,
however it dies (SIGKILL included), so a crashed run never leaves a stale lock behind; the file itself
stays and is simply locked again by the next run.

In a multi-process job only the main process (rank 0) takes the lock: the other ranks write nothing the
lock guards, and when rank 0 stops on a busy folder the launcher (torchrun, accelerate, deepspeed) ends
the job's other workers, which are still waiting for rank 0 to join the process group.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from mm.errors import MMTuneError

LOCK_NAME = ".lock"


class RunFolderBusyError(MMTuneError, RuntimeError):
    """Another live process holds the run folder's lock; the message names the folder and its pid."""


def is_main_rank() -> bool:
    """Rank 0 of a launched job (``RANK`` as torchrun, accelerate and deepspeed set it), or a lone process."""
    return int(os.environ.get("RANK", "0")) == 0


class RunLock:
    """``with RunLock(out_dir):`` holds the folder's lock for the block (a no-op when ``enabled`` is false)."""

    def __init__(self, out_dir: str | Path, enabled: bool = True) -> None:
        self.path = Path(out_dir) / LOCK_NAME
        self.enabled = enabled
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        if not self.enabled or self.fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "another process"
            raise RunFolderBusyError(
                f"{self.path.parent}: in use by another run ({who} holds {self.path}); wait for it to end, "
                "or pick another train.out_dir") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder_pid(out_dir: str | Path) -> int | None:
    """The pid of the process holding ``out_dir``'s lock now, or None when nobody holds it."""
    path = Path(out_dir) / LOCK_NAME
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None
