"""Shared bits of the training-system tests: the tiny digits recipe in a temp run folder, metric reading."""

from __future__ import annotations

from pathlib import Path

from train.engine.config import Recipe, load_recipe
from train.engine.run_log import read_metrics

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "configs" / "tiny" / "digits_lora.yaml"
LLAMA = ROOT / "configs" / "tiny" / "llama_lora.yaml"

#: Short, quiet, deterministic: one thread, no progress bar, eval only at the end.
FAST = ["train.progress=false", "train.threads=1", "train.eval_every=0", "train.save_every=0",
        "optim.warmup_steps=2"]


def digits_recipe(out_dir: Path, *overrides: str) -> Recipe:
    return load_recipe(DIGITS, [*FAST, f"train.out_dir={out_dir}", *overrides])


def csv_losses(out_dir: Path) -> dict[int, float]:
    """step -> train loss as metrics.csv recorded it."""
    return {r["step"]: r["value"] for r in read_metrics(Path(out_dir) / "metrics.csv")
            if r["split"] == "train" and r["metric"] == "loss"}
