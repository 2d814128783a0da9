"""What the loop does about NaN or infinite losses (``train.nonfinite``).

- ``stop``: end the run at the first non-finite loss. No checkpoint is written then: the weights that
  produced the NaN are no "last good" state (a learning rate that blew them up would blow them up again
  on resume), and a save would prune an older, good checkpoint. The checkpoints from before that step
  are kept, and the error names the newest of them.
- ``skip``: drop that step's gradients and go on, but at most ``train.max_nonfinite_skips`` steps in a
  row (a diverged run would otherwise "train" on to the end with every step skipped); while skipping,
  no checkpoint is written, so the newest one stays the one from before the first skipped step.

Each stop is recorded in the run log (``events.jsonl``) before it is raised.
"""

from __future__ import annotations

from pathlib import Path

from mm.errors import MMTuneError
from train.engine.checkpoint import STEP_DIR, complete_checkpoints


class NonFiniteLossError(MMTuneError, RuntimeError):
    """The loss became NaN or infinite; the message names the step and the checkpoint kept from before it."""


class NonFiniteGuard:
    """Counts consecutive skipped steps and builds the stop errors (see module doc)."""

    def __init__(self, recipe, ckpt_root: Path, log) -> None:
        self.source, self.ckpt_root, self.log = recipe.source, Path(ckpt_root), log
        self.limit, self.save_every = recipe.train.max_nonfinite_skips, recipe.train.save_every
        self.streak, self.first_bad = 0, None

    @property
    def saving(self) -> bool:
        """Whether a periodic checkpoint may be written now (not in the middle of skipped steps)."""
        return self.streak == 0

    def stop(self, value: float, step: int, micro_batch: int) -> NonFiniteLossError:
        """The error that ends a ``nonfinite=stop`` run at ``step``."""
        what = f"loss is {value} at step {step} (micro-batch {micro_batch})"
        return self._error(step, what, step, "or set train.nonfinite=skip to drop such steps")

    def after_step(self, step: int, skipped: bool) -> None:
        """Count a finished step; raises once ``max_nonfinite_skips`` steps in a row were skipped."""
        if not skipped:
            self.streak, self.first_bad = 0, None
            return
        self.streak += 1
        self.first_bad = self.first_bad or step
        if self.streak >= self.limit:
            what = (f"loss non-finite in {self.streak} consecutive steps ({self.first_bad}..{step}; "
                    f"train.max_nonfinite_skips={self.limit})")
            raise self._error(self.first_bad, what, step, "or raise train.max_nonfinite_skips")

    def _error(self, first_bad: int, what: str, step: int, alternative: str) -> NonFiniteLossError:
        kept = [c for c in complete_checkpoints(self.ckpt_root) if int(STEP_DIR.fullmatch(c.name).group(1)) < first_bad]
        if kept:
            where = (f"kept the checkpoint from before it, {kept[-1]} (step {int(kept[-1].name[5:])}); resume from "
                     "it with train.resume=auto once fixed (a lowered optim.lr applies from the resume step)")
        else:
            where = (f"no checkpoint was saved before step {first_bad} (train.save_every={self.save_every}); "
                     "set train.save_every to keep progress")
        self.log.event(step, "nonfinite_stop", first_bad_step=first_bad,
                       checkpoint=str(kept[-1]) if kept else None)
        return NonFiniteLossError(f"{self.source}: {what}; {where}, {alternative}")
