"""Two CPU processes over gloo: DDP, DeepSpeed ZeRO-2 and ZeRO-3, each through its launcher script.

Each run must keep identical trainable parameters on both ranks, save a non-empty adapter that loads
into a fresh model (under ZeRO-3 each rank alone holds shape-[0] shards: the save must gather them),
and follow the single-process run on the same global batch. The ZeRO-3 run also resumes from a
checkpoint and repeats its own losses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import FAST, ROOT, csv_losses, digits_recipe

from train.engine.checkpoint import load_trainable
from train.engine.config import load_recipe
from train.engine.loop import train
from train.tasks.digits import DigitsClassification

STEPS = 8
RUN = [f"train.max_steps={STEPS}", "train.save_every=4", "adapters.default.dropout=0.0"]
CASES = {  # name -> (launcher, mode, summary "setup")
    "ddp": ("launch_accelerate.sh", "ddp", "ddp"),
    "zero2": ("launch_accelerate.sh", "zero2", "deepspeed-zero2"),
    "zero3": ("launch_deepspeed.sh", "zero3", "deepspeed-zero3"),
}


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The same global batch (2 x 16) on one process."""
    return train(digits_recipe(tmp_path_factory.mktemp("single"), *RUN, "train.batch_size=32"))


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_agree_and_save_a_loadable_adapter(case, single_process, tmp_path):
    launcher, mode, setup = CASES[case]
    out_dir = tmp_path / case
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    command = ["bash", str(ROOT / "scripts" / launcher), "configs/tiny/digits_lora.yaml", "2", mode,
               *FAST, *RUN, "train.batch_size=16", f"train.out_dir={out_dir}"]
    _run(command, env)

    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["setup"] == setup and summary["step"] == STEPS
    assert summary["rank_disagreement"] == 0.0, "the ranks' trainable parameters differ"
    for folder in (out_dir, out_dir / "checkpoints" / f"step-{STEPS:08d}"):
        tensors = load_file(folder / "adapters.safetensors")
        assert tensors and all(t.numel() > 0 and 0 not in t.shape for t in tensors.values()), (
            {k: tuple(t.shape) for k, t in tensors.items()})
        assert any(t.abs().sum() > 0 for k, t in tensors.items() if k.endswith("lora_B")), "B trained"
    assert (out_dir / "checkpoints" / f"step-{STEPS:08d}" / "rng-rank1.json").is_file()

    fresh = DigitsClassification(load_recipe(out_dir / "config.yaml"))
    load_trainable(fresh, out_dir)
    data = fresh.eval_dataset()
    metrics = fresh.evaluate([fresh.collate([data[i] for i in range(len(data))])])
    assert metrics["accuracy"] == pytest.approx(summary["eval"]["accuracy"])

    losses = csv_losses(out_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in losses.items():  # the data split across ranks is the single process's batch
        assert loss == pytest.approx(single_process.losses[step], abs=1e-4), step
    reference = load_file(single_process.out_dir / "adapters.safetensors")
    assert all(torch.allclose(tensors[k], reference[k], atol=1e-4) for k in reference)

    if case == "zero3":  # resume from the step-4 checkpoint: DeepSpeed's sharded optimizer state reloads
        shutil.rmtree(out_dir / "checkpoints" / f"step-{STEPS:08d}")
        _run([*command, "train.resume=auto"], env)
        resumed = json.loads((out_dir / "summary.json").read_text())
        assert resumed["resumed_from"].endswith("step-00000004")
        again = csv_losses(out_dir)
        assert sorted(again) == list(range(1, STEPS + 1))
        assert all(abs(again[s] - losses[s]) <= 1e-6 for s in losses), (again, losses)


def _run(command: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
