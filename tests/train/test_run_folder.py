"""The run folder: one run at a time (an OS lock), checked before the first step, the truth for resume,
eval and generate."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import DIGITS, ROOT, digits_recipe

from mm.config import ConfigError
from train.engine.lock import RunFolderBusyError, RunLock, holder_pid
from train.engine.loop import train
from train.engine.preflight import PreflightError

#: Another process taking the run folder's lock as RunLock does (flock on .lock, its pid inside), without
#: importing torch, so the test spends no time starting it.
HOLDER = ("import fcntl, os, sys, time; os.makedirs(sys.argv[1], exist_ok=True); "
          "fd = os.open(os.path.join(sys.argv[1], '.lock'), os.O_RDWR | os.O_CREAT); "
          "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); os.write(fd, str(os.getpid()).encode()); "
          "print('held', flush=True); time.sleep(600)")


def _hold_lock_in_another_process(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=ROOT, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_a_locked_folder_stops_at_once_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    holder = _hold_lock_in_another_process(run)
    try:
        assert holder_pid(run) == holder.pid
        started = time.monotonic()
        with pytest.raises(RunFolderBusyError, match=rf"{run}: in use by another run \(pid {holder.pid} holds"):
            train(digits_recipe(run, "train.max_steps=2"))
        assert time.monotonic() - started < 5, "the refusal comes before any model or data is built"
        assert not (run / "metrics.csv").exists() and not (run / "config.yaml").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel drops the flock with the process
        holder.wait()
    assert holder_pid(run) is None
    assert train(digits_recipe(run, "train.max_steps=2")).step == 2


def test_the_lock_is_released_when_the_run_ends_or_fails(tmp_path):
    run = tmp_path / "run"
    train(digits_recipe(run, "train.max_steps=1"))
    assert holder_pid(run) is None
    with pytest.raises(ConfigError):  # fails inside the lock (the folder now holds checkpoints)
        train(digits_recipe(run, "train.max_steps=1"))
    with RunLock(run):  # free again
        assert holder_pid(run) == os.getpid()


def test_only_the_main_rank_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    from train.engine.lock import is_main_rank

    assert not is_main_rank()
    with RunLock(tmp_path, enabled=is_main_rank()):
        assert not (tmp_path / ".lock").exists()


def test_an_unwritable_checkpoint_folder_is_found_before_the_first_step(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("a file where the checkpoint folder goes")  # root ignores permission bits
    with pytest.raises(PreflightError, match=r"checkpoints: the checkpoint folder is not writable"):
        train(digits_recipe(run, "train.max_steps=3", "train.save_every=1"))
    assert not (run / "metrics.csv").exists(), "no training ran"


def test_not_enough_disk_for_a_checkpoint_is_found_before_the_first_step(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(10**9, 10**9 - 1000, 1000))
    run = tmp_path / "run"
    with pytest.raises(PreflightError, match=r"checkpoints: 0.0 MB free, a checkpoint of this run needs about "
                                             r"1\.\d MB"):
        train(digits_recipe(run, "train.max_steps=3"))
    assert not (run / "metrics.csv").exists()


def test_the_checkpoint_size_estimate_covers_a_real_checkpoint(tmp_path):
    from train.engine.preflight import checkpoint_bytes
    from train.tasks.digits import DigitsClassification

    recipe = digits_recipe(tmp_path / "run", "train.max_steps=2")
    train(recipe)
    trainable = [p for p in DigitsClassification(recipe).parameters() if p.requires_grad]
    folder = tmp_path / "run" / "checkpoints" / "step-00000002"
    real = sum(p.stat().st_size for p in folder.iterdir())
    assert real <= checkpoint_bytes(trainable, "adamw") <= real + 2 * 2**20


def test_resume_refuses_a_changed_model_seed_or_data_listing_each(tmp_path):
    run = tmp_path / "run"
    train(digits_recipe(run, "train.max_steps=2", "train.save_every=2"))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"cannot resume .*step-00000002: changed key\(s\) a run cannot change "
                                          r"midway: seed \(0 -> 3\), model.width \(64 -> 32\), "
                                          r"adapters.default.r \(4 -> 2\)"):
        train(digits_recipe(run, "train.max_steps=4", "train.resume=auto", "seed=3", "model.width=32",
                            "adapters.default.r=2"))
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before, "nothing was touched"


def test_run_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        train(digits_recipe(tmp_path / "run", "train.max_steps=1"))
    finally:
        os.umask(old)
    for name in ("config.yaml", "metrics.csv", "summary.json", "adapters.safetensors",
                 "checkpoints/step-00000001/optimizer.pt", "checkpoints/step-00000001/state.json"):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o640, name


@pytest.mark.parametrize("override", ["optim.lr=.nan", "adapters.default.alpha=.nan", "train.clip_norm=.inf",
                                      "optim.min_lr_ratio=-.inf", "optim.betas=[0.9,.nan]", "optim.lr=1e999"])
def test_non_finite_numbers_in_a_recipe_are_refused_naming_the_key(override):
    from train.engine.config import load_recipe

    key = override.split("=")[0]
    expected = "optim.betas[1]" if "betas" in override else key
    with pytest.raises(ConfigError, match=rf"key '{re.escape(expected)}' (must be a finite number|expects)"):
        load_recipe(DIGITS, [override])


def test_eval_rebuilds_the_run_from_its_config_not_the_recipe(tmp_path, capsys):
    """Defect 1: `mmtune eval --config <recipe> --run <dir>` evaluated the recipe's seed (another base
    model) and printed a wrong accuracy, exit 0."""
    from train.cli import main

    run = tmp_path / "s3"
    trained = train(digits_recipe(run, "seed=3", "train.max_steps=12"))
    capsys.readouterr()
    assert main(["eval", "--config", str(DIGITS), "--run", str(run)]) == 0
    out, err = capsys.readouterr()
    assert f"clean: loss={trained.eval_metrics['loss']:.4f}, accuracy={trained.eval_metrics['accuracy']:.4f}" in out
    assert f"{DIGITS} differs from {run / 'config.yaml'} in seed (3 -> 0)" in err and "using the run's config" in err
    assert main(["eval", "--run", str(run), "seed=0"]) == 0  # an explicit override: applied, and said
    out, err = capsys.readouterr()
    assert "mmtune eval: seed: the run used 3, the command line sets 0; using 0" in err
    assert f"accuracy={trained.eval_metrics['accuracy']:.4f}" not in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval"]["accuracy"] == pytest.approx(trained.eval_metrics["accuracy"])


@pytest.mark.parametrize("recipe_file, override, key", [
    ("avsr/audio_only.yaml", "synthetic.seed=5", "synthetic.seed"),
    ("eo/s2_only.yaml", "data.fake_chips=7", "data.fake_chips"),
])
def test_eval_never_regenerates_a_runs_data_in_place(tmp_path, recipe_file, override, key):
    from train.engine.config import load_recipe, save_resolved
    from train.engine.run_folder import load_run_recipe

    run = tmp_path / "run"
    save_resolved(load_recipe(ROOT / "configs" / recipe_file), run / "config.yaml")
    said = []
    assert load_run_recipe(run, [], "eval", warn=said.append).train.out_dir == str(run) and not said
    with pytest.raises(ConfigError, match=rf"key '{key}': the run's data was generated with .*does not "
                                          "regenerate a run's data in place"):
        load_run_recipe(run, [override], "eval", warn=said.append)
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"], "nothing generated"


def test_a_resumed_lr_keeps_each_parameter_groups_own_ratio(tmp_path):
    """LoRA+ trains lora_B at lr x ratio: a lowered lr on resume lowers both groups, keeping the ratio."""
    from train.engine.loop import Trainer

    run, extra = tmp_path / "run", ("optim.loraplus_ratio=4", "optim.schedule=constant", "optim.warmup_steps=0",
                                    "train.save_every=2")
    train(digits_recipe(run, "train.max_steps=2", "optim.lr=0.02", *extra))
    trainer = Trainer(digits_recipe(run, "train.max_steps=4", "optim.lr=0.005", *extra, "train.resume=auto"),
                      say=lambda *_: None)
    rates = sorted(group["lr"] for group in trainer.optimizer.param_groups)
    assert rates == pytest.approx([0.005, 0.02]) and trainer.state.step == 2
    assert trainer.scheduler.get_last_lr() == pytest.approx([g["lr"] for g in trainer.optimizer.param_groups])
