"""SIGKILL a training run at a random step, resume it: the losses equal an uninterrupted run's (CPU, fixed
seeds, to 1e-6), and no kill leaves a checkpoint that loads half-written."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from train_helpers import DIGITS, FAST, ROOT, csv_losses, digits_recipe

from train.engine.checkpoint import complete_checkpoints, load_trainable
from train.engine.config import load_recipe
from train.engine.loop import train
from train.tasks.digits import DigitsClassification

STEPS = 150
# Checkpoint every step so that the kill often lands inside a save; dropout makes the RNG state matter.
RUN = [f"train.max_steps={STEPS}", "train.save_every=1", "train.keep_last=3", "adapters.default.dropout=0.1",
       "train.batch_size=16"]


def _kill_at_step(out_dir, step: int) -> int:
    """Start the run as its own process, SIGKILL it once metrics.csv shows ``step``; returns the last step seen."""
    command = [sys.executable, "-m", "train.cli", "train", "--config", str(DIGITS), *FAST, *RUN,
               f"train.out_dir={out_dir}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            seen = max(csv_losses(out_dir), default=0)
            if seen >= step:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return seen
            if proc.poll() is not None:
                pytest.fail(f"the run ended (rc {proc.returncode}) before step {step}: {proc.stderr.read()[-2000:]}")
            time.sleep(0.02)
        pytest.fail("the run did not reach the kill step in time")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return -1


@pytest.mark.slow
def test_sigkill_then_resume_matches_the_uninterrupted_run(tmp_path):
    reference = train(digits_recipe(tmp_path / "reference", *RUN))
    kill_step = random.randint(5, STEPS - 40)
    print(f"killing at step {kill_step}")  # shown on failure, to reproduce
    killed_dir = tmp_path / "killed"
    seen = _kill_at_step(killed_dir, kill_step)

    # Whatever the kill interrupted, every checkpoint that looks complete loads completely.
    checkpoints = complete_checkpoints(killed_dir / "checkpoints")
    assert checkpoints, "save_every=1: some checkpoint must be complete before the kill"
    recipe = load_recipe(killed_dir / "config.yaml")
    for folder in checkpoints:
        state = json.loads((folder / "state.json").read_text())
        assert state["step"] <= seen and state["micro_batches"] == state["step"]
        load_trainable(DigitsClassification(recipe), folder)
        assert torch.load(folder / "optimizer.pt", weights_only=True)["state"]

    resumed = train(digits_recipe(killed_dir, *RUN, "train.resume=auto"))
    assert resumed.resumed_from == checkpoints[-1] and resumed.step == STEPS
    losses = csv_losses(killed_dir)
    assert sorted(losses) == list(range(1, STEPS + 1)), "the resumed run's log reads as one run"
    worst = max(abs(losses[s] - reference.losses[s]) for s in losses)
    assert worst <= 1e-6, f"killed at step {kill_step}: losses differ by up to {worst}"
    assert resumed.eval_metrics["loss"] == pytest.approx(reference.eval_metrics["loss"], abs=1e-6)
    leftovers = [p.name for p in (killed_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers
