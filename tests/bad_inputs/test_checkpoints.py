"""Damaged checkpoints, a full disk and diverging runs under ``mmtune train``: one line naming the file,
exit 2 (a diverged run: exit 1), a counted fall-back where an older checkpoint can stand in, and nothing
written before is lost."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from corpus import assert_clear_error, assert_kept, run_mmtune, snapshot

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "configs" / "tiny" / "digits_lora.yaml")
FAST = ["train.progress=false", "train.threads=1", "train.eval_every=0", "optim.warmup_steps=0",
        "train.save_every=2", "train.keep_last=3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from train.engine.config import load_recipe
    from train.engine.loop import train

    run = tmp_path_factory.mktemp("trained") / "run"
    train(load_recipe(RECIPE, [*FAST, "train.max_steps=4", f"train.out_dir={run}"]), say=lambda *_: None)
    return run


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy, ignore=shutil.ignore_patterns(".lock"))
    return copy


def train_argv(run: Path, *overrides: str) -> list[str]:
    return ["train", "--config", RECIPE, *FAST, f"train.out_dir={run}", *overrides]


def newest(run: Path) -> Path:
    return run / "checkpoints" / "step-00000004"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


DAMAGE = {
    "optimizer.pt truncated": ("optimizer.pt", truncate),
    "optimizer.pt not a zip": ("optimizer.pt", lambda p: p.write_bytes(b"not a torch file")),
    "state.json not JSON": ("state.json", lambda p: p.write_text("{step: 4")),
    "scheduler.json missing": ("scheduler.json", Path.unlink),
    "rng state missing": ("rng-rank0.json", Path.unlink),
    "trainable.safetensors truncated": ("trainable.safetensors", truncate),
    "adapters.safetensors garbage": ("adapters.safetensors", lambda p: p.write_bytes(b"\x00" * 64)),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_an_explicit_damaged_checkpoint_names_the_file(run, capsys, damage) -> None:
    name, spoil = DAMAGE[damage]
    spoil(newest(run) / name)
    before = snapshot(run)
    result = run_mmtune(train_argv(run, "train.max_steps=6", f"train.resume={newest(run)}"), capsys)
    assert_clear_error(result, "train", name)
    assert_kept(before, run)


def test_a_checkpoint_of_another_world_size(run, capsys) -> None:
    state = json.loads((newest(run) / "state.json").read_text())
    (newest(run) / "state.json").write_text(json.dumps({**state, "world_size": 2}))
    before = snapshot(run)
    result = run_mmtune(train_argv(run, "train.max_steps=6", "train.resume=auto"), capsys)
    # The newest is refused for this run, the older one is taken: a counted fall-back, said on stdout.
    assert result.code == 0 and "saved with 2 processes" in result.out and "falling back to" in result.out
    set_aside = {k.replace("checkpoints/step-00000004", "checkpoints/.broken-step-00000004"): v
                 for k, v in before.items() if k.startswith("checkpoints/step-00000004")}
    assert_kept(set_aside, run)


def test_every_checkpoint_unreadable_is_an_error_and_moves_nothing(run, capsys) -> None:
    for folder in (run / "checkpoints").iterdir():
        truncate(folder / "optimizer.pt")
    before = snapshot(run)
    result = run_mmtune(train_argv(run, "train.max_steps=6", "train.resume=auto"), capsys)
    assert_clear_error(result, "train", "step-00000002/optimizer.pt", "unreadable", "the newer ones are unreadable")
    assert_kept(before, run)


def test_a_full_disk_during_a_save(run, capsys, monkeypatch) -> None:
    from train.engine import checkpoint

    def full(data, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(checkpoint, "_torch_save", full)
    before, rows = snapshot(run / "checkpoints"), (run / "metrics.csv").read_text()
    result = run_mmtune(train_argv(run, "train.max_steps=6", "train.resume=auto"), capsys)
    assert_clear_error(result, "train", "optimizer.pt", "No space left on device", "step-00000006")
    assert_kept(before, run / "checkpoints")
    assert (run / "metrics.csv").read_text().startswith(rows), "the resumed run only appends to the log"
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")], "space given back"


def test_a_diverging_run_stops_naming_the_checkpoint_it_kept(run, capsys) -> None:
    before, rows = snapshot(run / "checkpoints"), (run / "metrics.csv").read_text()
    result = run_mmtune(train_argv(run, "train.max_steps=12", "train.resume=auto",
                                   "optim.lr=1e30"), capsys)
    assert_clear_error(result, "train", "loss is nan at step", "kept the checkpoint from before it",
                       "step-00000004 (step 4)", code=1)
    assert_kept(before, run / "checkpoints")
    assert (run / "metrics.csv").read_text().startswith(rows)


def test_a_diverging_run_with_skip_stops_after_the_limit(run, capsys) -> None:
    before, rows = snapshot(run / "checkpoints"), (run / "metrics.csv").read_text()
    result = run_mmtune(train_argv(run, "train.max_steps=30", "train.resume=auto",
                                   "optim.lr=1e30", "train.nonfinite=skip",
                                   "train.max_nonfinite_skips=2"), capsys)
    assert_clear_error(result, "train", "non-finite in 2 consecutive steps", "train.max_nonfinite_skips=2",
                       "step-00000004", code=1)
    assert_kept(before, run / "checkpoints")
    assert (run / "metrics.csv").read_text().startswith(rows)


# ------------------------------------------------------------------------------------ counted fall-backs


@pytest.mark.parametrize("damage", ["optimizer.pt truncated", "trainable.safetensors truncated",
                                    "scheduler.json missing"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(run, capsys, damage) -> None:
    name, spoil = DAMAGE[damage]
    spoil(newest(run) / name)
    before = snapshot(run)
    result = run_mmtune(train_argv(run, "train.max_steps=6", "train.resume=auto"), capsys)
    assert result.code == 0, result.err
    assert f"WARNING: checkpoint {newest(run) / name}" in result.out and "falling back to" in result.out
    event = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()][-1]
    assert event["checkpoint"].endswith("step-00000002") and len(event["unreadable"]) == 1
    moved = {k.replace("checkpoints/step-00000004", "checkpoints/.broken-step-00000004"): v
             for k, v in before.items() if not k.startswith(("metrics.csv", "summary.json", "adapters.",
                                                              "trainable.", "config.yaml", "curves.png",
                                                              "checkpoints/step-00000002"))}
    assert_kept(moved, run)
