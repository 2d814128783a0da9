"""Bad run folders given to ``mmtune eval``, ``generate`` and ``train``: one line naming the folder or key,
exit 2, and nothing the run wrote before is lost. Also the cases that now work where they used to go
wrong silently (eval of another model than the run's, a resume that ignored a changed lr)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from corpus import assert_clear_error, assert_kept, run_mmtune, snapshot

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "configs" / "tiny" / "digits_lora.yaml")
FAST = ["train.progress=false", "train.threads=1", "train.eval_every=0", "optim.warmup_steps=0"]

#: Another process taking the run folder's lock as RunLock does (flock on .lock, its pid inside), without
#: importing torch, so the test spends no time starting it.
HOLDER = ("import fcntl, os, sys, time; os.makedirs(sys.argv[1], exist_ok=True); "
          "fd = os.open(os.path.join(sys.argv[1], '.lock'), os.O_RDWR | os.O_CREAT); "
          "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); os.write(fd, str(os.getpid()).encode()); "
          "print('held', flush=True); time.sleep(600)")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 4-step digits run (seed 3) with checkpoints at steps 2 and 4."""
    from train.engine.config import load_recipe
    from train.engine.loop import train

    run = tmp_path_factory.mktemp("trained") / "run"
    train(load_recipe(RECIPE, [*FAST, "seed=3", "train.max_steps=4", "train.save_every=2",
                               f"train.out_dir={run}"]), say=lambda *_: None)
    return run


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    """A private copy of the trained run (tests may damage it)."""
    copy = tmp_path / "run"
    shutil.copytree(trained, copy, ignore=shutil.ignore_patterns(".lock"))
    return copy


def train_argv(run: Path, *overrides: str) -> list[str]:
    return ["train", "--config", RECIPE, *FAST, "seed=3", "train.save_every=2", f"train.out_dir={run}", *overrides]


# ------------------------------------------------------------------------------------------ clear errors


def test_eval_of_a_missing_folder(tmp_path, capsys) -> None:
    missing = tmp_path / "nope"
    assert_clear_error(run_mmtune(["eval", "--run", str(missing)], capsys), "eval", str(missing), "not a run folder")


def test_eval_of_a_folder_without_config(run, capsys) -> None:
    (run / "config.yaml").unlink()
    before = snapshot(run)
    assert_clear_error(run_mmtune(["eval", "--run", str(run)], capsys), "eval", str(run), "no config.yaml")
    assert_kept(before, run)


def test_eval_of_an_unfinished_run(run, capsys) -> None:
    (run / "adapters.safetensors").unlink()
    (run / "trainable.safetensors").unlink()
    before = snapshot(run)
    assert_clear_error(run_mmtune(["eval", "--run", str(run)], capsys), "eval", str(run), "not a finished run")
    assert_kept(before, run)


def test_eval_with_a_run_config_that_is_not_yaml(run, capsys) -> None:
    (run / "config.yaml").write_text("task: digits\nmodel: [unclosed\n")
    before = snapshot(run)
    assert_clear_error(run_mmtune(["eval", "--run", str(run)], capsys), "eval", "config.yaml", "not valid YAML")
    assert_kept(before, run)


def test_eval_with_an_unknown_override_key(run, capsys) -> None:
    before = snapshot(run)
    result = run_mmtune(["eval", "--run", str(run), "model.no_such_key=1"], capsys)
    assert_clear_error(result, "eval", "model.no_such_key")
    assert_kept(before, run)


def test_eval_without_run_or_recipe(capsys) -> None:
    assert_clear_error(run_mmtune(["eval"], capsys), "eval", "--run")


def test_eval_snr_on_a_task_without_noise(run, capsys) -> None:
    result = run_mmtune(["eval", "--run", str(run), "--snr", "0"], capsys)
    assert_clear_error(result, "eval", "--snr", "digits")


def test_generate_on_a_run_of_another_task(run, capsys) -> None:
    before = snapshot(run)
    result = run_mmtune(["generate", "--run", str(run), "--prompt", "hi"], capsys)
    assert_clear_error(result, "generate", "config.yaml", "task is 'digits'")
    assert_kept(before, run)


def test_train_on_a_folder_another_run_holds(run, capsys) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(run)
        result = run_mmtune(train_argv(run, "train.max_steps=6", "train.resume=auto"), capsys)
        assert_clear_error(result, "train", str(run), f"pid {holder.pid}")
        assert_kept(before, run)
    finally:
        holder.kill()
        holder.wait()


def test_train_a_fresh_run_into_a_folder_with_checkpoints(run, capsys) -> None:
    before = snapshot(run)
    result = run_mmtune(train_argv(run, "train.max_steps=6"), capsys)
    assert_clear_error(result, "train", "step-00000004", "train.resume=auto")
    assert_kept(before, run)


@pytest.mark.parametrize("override, key", [("seed=0", "seed (3 -> 0)"), ("model.width=32", "model.width"),
                                           ("adapters.default.r=8", "adapters.default.r"),
                                           ("data.domain=inverted", "data.domain"),
                                           ("train.batch_size=16", "train.batch_size")])
def test_resume_with_a_key_a_run_cannot_change(run, capsys, override, key) -> None:
    before = snapshot(run)
    result = run_mmtune(train_argv(run, "train.max_steps=6", "train.resume=auto", override), capsys)
    assert_clear_error(result, "train", "cannot resume", key)
    assert_kept(before, run)


def test_resume_from_a_folder_that_is_no_checkpoint(run, capsys) -> None:
    result = run_mmtune(train_argv(run, "train.max_steps=6", f"train.resume={run / 'nope'}"), capsys)
    assert_clear_error(result, "train", "train.resume", "nope")


def test_train_into_an_unwritable_run_folder(tmp_path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_mmtune(train_argv(blocker / "run", "train.max_steps=2"), capsys)
    assert_clear_error(result, "train", str(blocker / "run"), "not writable")
    assert blocker.read_text() == "not a folder"


# ------------------------------------------------------------------------------- now works (and says so)


def test_eval_uses_the_run_config_and_reports_a_differing_recipe(run, capsys) -> None:
    """Defect 1 (was: the recipe's seed 0, a different base model, accuracy 0.359 for 0.617, exit 0)."""
    trained_accuracy = json.loads((run / "summary.json").read_text())["eval"]["accuracy"]
    result = run_mmtune(["eval", "--config", RECIPE, "--run", str(run)], capsys)
    assert result.code == 0, result.err
    assert f"accuracy={trained_accuracy:.4f}" in result.out
    assert "seed (3 -> 0)" in result.err and "using the run's config" in result.err


def test_eval_applies_and_says_an_override(run, capsys) -> None:
    result = run_mmtune(["eval", "--run", str(run), "data.domain=inverted"], capsys)
    assert result.code == 0, result.err
    assert "data.domain: the run used 'original', the command line sets 'inverted'" in result.err


def test_resume_applies_a_lowered_lr(run, capsys) -> None:
    """Defect 2 (was: the optimizer state's old lr kept, while config.yaml recorded the new one)."""
    before = snapshot(run / "checkpoints" / "step-00000004")
    result = run_mmtune(train_argv(run, "train.max_steps=6", "train.resume=auto", "optim.lr=0.001",
                                   "optim.schedule=constant"), capsys)
    assert result.code == 0, result.err
    rates = [line.split(",") for line in (run / "metrics.csv").read_text().splitlines() if ",lr," in line]
    assert [float(value) for step, _, _, value in rates if int(step) > 4] == [0.001, 0.001]
    event = json.loads((run / "events.jsonl").read_text().splitlines()[-1])
    assert event["changed"]["optim.lr"] == [0.02, 0.001]
    assert_kept(before, run / "checkpoints" / "step-00000004")
