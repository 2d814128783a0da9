"""Checkpoints: exact resume, keep-last-N, and no interrupted save that leaves a loadable half checkpoint."""

from __future__ import annotations

import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import csv_losses, digits_recipe

from train.engine import checkpoint
from train.engine.checkpoint import complete_checkpoints, latest_checkpoint
from train.engine.loop import train


def test_resume_from_a_checkpoint_continues_exactly(tmp_path):
    # dropout makes the RNG state matter: a resume that lost it would differ at once.
    extra = ("train.max_steps=10", "train.save_every=4", "train.keep_last=5", "adapters.default.dropout=0.2")
    reference = train(digits_recipe(tmp_path / "ref", *extra))
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "ref" / "checkpoints" / "step-00000004", resumed_dir / "checkpoints" / "step-00000004")
    resumed = train(digits_recipe(resumed_dir, *extra, "train.resume=auto"))
    assert resumed.resumed_from.name == "step-00000004"
    assert sorted(resumed.losses) == list(range(5, 11))
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(reference.losses[step], abs=1e-6), step


def test_keep_last_prunes_older_checkpoints(tmp_path):
    train(digits_recipe(tmp_path / "run", "train.max_steps=5", "train.save_every=1", "train.keep_last=2"))
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in complete_checkpoints(root)] == ["step-00000004", "step-00000005"]
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004", "step-00000005"], "no temp leftovers"


@pytest.mark.parametrize("fail_at", ["adapters", "optimizer", "state", "rename"])
def test_a_save_interrupted_anywhere_leaves_no_checkpoint_that_loads(tmp_path, monkeypatch, fail_at):
    recipe = digits_recipe(tmp_path / "run", "train.max_steps=4", "train.save_every=2", "train.keep_last=5")
    calls = {"saves": 0}
    real_save = checkpoint.save_checkpoint

    def save_then_maybe_die(*args, **kwargs):
        calls["saves"] += 1
        if calls["saves"] == 2:  # the second save (step 4) is cut short
            _arm_failure(monkeypatch, fail_at)
        return real_save(*args, **kwargs)

    monkeypatch.setattr("train.engine.loop.save_checkpoint", save_then_maybe_die)
    with pytest.raises(KeyboardInterrupt):
        train(recipe)
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in complete_checkpoints(root)] == ["step-00000002"]
    assert latest_checkpoint(root).name == "step-00000002"
    monkeypatch.undo()
    result = train(digits_recipe(tmp_path / "run", "train.max_steps=4", "train.save_every=2", "train.resume=auto"))
    assert result.resumed_from.name == "step-00000002" and result.step == 4
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "the next save clears the leftover"
    assert sorted(csv_losses(tmp_path / "run")) == [1, 2, 3, 4]


def _arm_failure(monkeypatch, fail_at: str) -> None:
    """Make the next write of ``fail_at`` raise, as a kill at that moment would stop it."""

    def boom(*_args, **_kwargs):
        raise KeyboardInterrupt(f"killed while writing {fail_at}")

    if fail_at == "adapters":
        monkeypatch.setattr("mm.save_adapters", boom)
    elif fail_at == "optimizer":
        monkeypatch.setattr(torch, "save", boom)
    elif fail_at == "state":
        real = checkpoint._write_json
        monkeypatch.setattr(checkpoint, "_write_json",
                            lambda path, data: boom() if path.name == "state.json" else real(path, data))
    else:  # the folder's final rename (files inside are renamed into place too: leave those alone)
        real_replace = checkpoint.os.replace
        monkeypatch.setattr(checkpoint.os, "replace",
                            lambda src, dst: boom() if Path(dst).name.startswith("step-") else real_replace(src, dst))


def test_a_fresh_run_refuses_a_folder_with_checkpoints(tmp_path):
    from mm.config import ConfigError

    train(digits_recipe(tmp_path / "run", "train.max_steps=2"))
    with pytest.raises(ConfigError, match=r"earlier run .*step-00000002.*train.resume=auto"):
        train(digits_recipe(tmp_path / "run", "train.max_steps=2"))


def test_rng_states_round_trip():
    state = checkpoint._rng_state()
    draws = (random.random(), np.random.rand(), torch.rand(3))
    checkpoint._set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert draws[0] == again[0] and draws[1] == again[1] and torch.equal(draws[2], again[2])


class _Payload:
    """A class a checkpoint file names as a global: weights_only loading must refuse to rebuild it."""

    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_deepspeed_checkpoint_files_are_read_weights_only(tmp_path):
    from types import SimpleNamespace

    from deepspeed.runtime.zero.config import ZeroStageEnum

    from train.engine.checkpoint import _weights_only_loads

    engine = SimpleNamespace(checkpoint_engine=SimpleNamespace(load=None))
    _weights_only_loads(engine)
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save({"stage": ZeroStageEnum.weights, "state": {"exp_avg": torch.ones(3)}}, good)
    torch.save({"payload": _Payload()}, bad)
    loaded = engine.checkpoint_engine.load(str(good), map_location="cpu")
    assert loaded["stage"] is ZeroStageEnum.weights and torch.equal(loaded["state"]["exp_avg"], torch.ones(3))
    with pytest.raises(pickle.UnpicklingError, match="Unsupported global"):
        engine.checkpoint_engine.load(str(bad), map_location="cpu")


def _loads_completely(folder: Path) -> None:
    from train.engine.checkpoint import load_trainable
    from train.engine.config import load_recipe
    from train.tasks.digits import DigitsClassification

    load_trainable(DigitsClassification(load_recipe(folder / "config.yaml")), folder)
    assert torch.load(folder / "optimizer.pt", weights_only=True)["state"]


def test_a_kill_while_pruning_leaves_only_loadable_checkpoints(tmp_path, monkeypatch):
    """Pruning renames a folder out of the step- namespace before deleting it: a kill half-way through the
    delete (simulated: optimizer.pt gone, then the kill) leaves no folder that looks complete but is not."""
    real_rmtree = checkpoint.shutil.rmtree

    def killed_mid_delete(path, *args, **kwargs):
        path = Path(path)
        if (path / "optimizer.pt").is_file() and not path.name.startswith(".tmp-"):
            (path / "optimizer.pt").unlink()
            raise KeyboardInterrupt(f"killed while deleting {path}")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_mid_delete)
    with pytest.raises(KeyboardInterrupt):
        train(digits_recipe(tmp_path / "run", "train.max_steps=4", "train.save_every=1", "train.keep_last=1"))
    monkeypatch.undo()
    root = tmp_path / "run" / "checkpoints"
    found = complete_checkpoints(root)
    assert [p.name for p in found] == ["step-00000002"]
    for folder in found:
        _loads_completely(folder)
    result = train(digits_recipe(tmp_path / "run", "train.max_steps=4", "train.save_every=1", "train.keep_last=1",
                                 "train.resume=auto"))
    assert result.resumed_from.name == "step-00000002" and result.step == 4
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004"], "the next prune clears the trash"


def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    extra = ("train.max_steps=6", "train.save_every=2", "train.keep_last=3", "adapters.default.dropout=0.2")
    reference = train(digits_recipe(tmp_path / "ref", *extra))
    run = tmp_path / "run"
    shutil.copytree(tmp_path / "ref" / "checkpoints", run / "checkpoints", ignore=shutil.ignore_patterns("step-00000006"))
    newest = run / "checkpoints" / "step-00000004" / "optimizer.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as a full disk or a torn copy leaves it
    capsys.readouterr()
    resumed = train(digits_recipe(run, *extra, "train.resume=auto"))
    out = capsys.readouterr().out
    assert f"WARNING: checkpoint {newest}: unreadable" in out and "falling back to" in out
    assert resumed.resumed_from.name == "step-00000002"
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(reference.losses[step], abs=1e-6), step
    broken = run / "checkpoints" / ".broken-step-00000004" / "optimizer.pt"
    assert broken.stat().st_size == 100, "the unreadable checkpoint is set aside, not deleted"
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["step-00000002", "step-00000004",
                                                                           "step-00000006"]


def test_an_explicit_unreadable_checkpoint_is_an_error_naming_the_file(tmp_path):
    from train.engine.checkpoint import CheckpointError

    train(digits_recipe(tmp_path / "run", "train.max_steps=2", "train.save_every=2"))
    folder = tmp_path / "run" / "checkpoints" / "step-00000002"
    (folder / "scheduler.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"scheduler.json: unreadable \(JSONDecodeError"):
        train(digits_recipe(tmp_path / "again", "train.max_steps=4", f"train.resume={folder}"))


@pytest.mark.parametrize("failure", ["optimizer", "adapters"])
def test_a_full_disk_during_a_save_is_one_error_naming_the_path(tmp_path, monkeypatch, failure):
    import errno
    import os

    from train.engine.checkpoint import CheckpointError

    run = tmp_path / "run"
    train(digits_recipe(run, "train.max_steps=2", "train.save_every=2"))
    if failure == "optimizer":
        def full(data, path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

        monkeypatch.setattr(checkpoint, "_torch_save", full)
    else:  # safetensors reports it from Rust, in words only
        def full(*_args, **_kwargs):
            raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                               "message: \"No space left on device\" })")

        monkeypatch.setattr("mm.save_adapters", full)
    with pytest.raises(CheckpointError, match=r"\.tmp-step-00000004.*No space left on device while writing "
                                              r"checkpoint step-00000004; the earlier checkpoints .* are kept"):
        train(digits_recipe(run, "train.max_steps=4", "train.save_every=2", "train.resume=auto"))
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"], "the partial save is cleaned up"
