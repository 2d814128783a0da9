"""scripts/launch_accelerate.sh and scripts/launch_deepspeed.sh as a user meets them: bad settings are one
line and exit 2 before anything starts; paths are the caller's; killing a launcher stops its whole job.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from script_loader import SCRIPTS

ROOT = SCRIPTS.parent
DIGITS = ROOT / "configs" / "tiny" / "digits_lora.yaml"
QUIET = ["train.progress=false", "train.threads=1", "train.eval_every=0", "train.save_every=0"]
LAUNCHERS = ["launch_accelerate.sh", "launch_deepspeed.sh"]


def launch(launcher: str, *args: str, env: dict | None = None, cwd: Path = ROOT, timeout: float = 60):
    environ = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NODE_RANK", "MASTER_PORT", "HOSTFILE")}
    return subprocess.run(["bash", str(SCRIPTS / launcher), *args], capture_output=True, text=True, cwd=cwd,
                          env={**environ, **(env or {})}, timeout=timeout)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_without_arguments_the_usage_is_printed(launcher):
    done = launch(launcher)
    assert done.returncode == 2
    assert f"scripts/{launcher} RECIPE NPROC" in done.stderr and "NODE_RANK" in done.stderr


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize(("args", "env", "message"), [
    (["no/such.yaml", "2"], {}, f"no/such.yaml: no such recipe file (relative paths start in {ROOT})"),
    ([str(DIGITS), "two"], {}, "NPROC: must be a positive number of processes per node, got 'two'"),
    ([str(DIGITS), "1"], {"NNODES": "0"}, "NNODES: must be a positive number of nodes, got '0'"),
    ([str(DIGITS), "1"], {"NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK: must be 0..1, got '2'"),
    ([str(DIGITS), "1"], {"MASTER_PORT": "http"}, "MASTER_PORT: must be a port number, got 'http'"),
])
def test_bad_settings_are_one_line_and_exit_2(launcher, args, env, message):
    done = launch(launcher, *args, env=env)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"{launcher}: {message}"]


def test_unknown_modes_and_missing_configs_are_named():
    done = launch("launch_accelerate.sh", str(DIGITS), "2", "zero4")
    assert (done.returncode, done.stderr.strip()) == (
        2, "launch_accelerate.sh: mode must be ddp, zero2, zero3 or fsdp2, got 'zero4'")
    done = launch("launch_deepspeed.sh", str(DIGITS), "2", "mine.json")
    assert (done.returncode, done.stderr.strip()) == (2, "launch_deepspeed.sh: mine.json: no such DeepSpeed config")
    done = launch("launch_deepspeed.sh", str(DIGITS), "2", env={"HOSTFILE": "hosts.txt"})
    assert (done.returncode, done.stderr.strip()) == (2, "launch_deepspeed.sh: HOSTFILE: hosts.txt: no such file")


@pytest.mark.slow
def test_recipe_and_run_folder_are_relative_to_the_callers_folder(tmp_path):
    shutil.copy(DIGITS, tmp_path / "mine.yaml")
    done = launch("launch_accelerate.sh", "mine.yaml", "1", *QUIET, "train.max_steps=2", cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "mine"  # the default runs/<recipe name>, in the caller's folder
    assert (run / "adapters.safetensors").is_file() and (run / "summary.json").is_file()
    assert not (ROOT / "runs" / "mine").exists()


def _workers(tag: str) -> list[int]:
    """Worker processes (train.cli, not a launcher) whose command line holds ``tag``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            text = b" ".join(argv).decode(errors="replace")
            if tag in text and "train.cli" in text and "accelerate" not in text and "deepspeed" not in text:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["TERM", "KILL"])
def test_killing_the_launchers_process_group_stops_its_workers(sig, tmp_path):
    """torch elastic gives each worker a session of its own, so a signal to the launcher's process group
    never reaches them: TERM must be forwarded by the launcher, and after KILL (nothing can forward it)
    the workers must stop because their launcher died."""
    out_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    job = subprocess.Popen(["bash", str(SCRIPTS / "launch_accelerate.sh"), str(DIGITS), "2", "ddp", *QUIET,
                            "train.max_steps=100000", f"train.out_dir={out_dir}"], cwd=tmp_path, env=env,
                           start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out_dir / "metrics.csv").is_file():  # both workers are past start-up and training
            assert job.poll() is None, job.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the job never started training"
            time.sleep(0.5)
        workers = _workers(str(out_dir))
        assert len(workers) == 2, workers
        os.killpg(job.pid, sig)
        job.wait(timeout=60)
        if sig == signal.SIGTERM:  # the launcher returns only once its workers are gone
            assert _workers(str(out_dir)) == [], "the launcher exited before its workers"
        deadline = time.monotonic() + 60
        while _workers(str(out_dir)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _workers(str(out_dir)) == [], "workers outlived their launcher"
        if sig == signal.SIGTERM:
            assert job.returncode != 0
    finally:
        for pid in _workers(str(out_dir)):
            os.kill(pid, signal.SIGKILL)
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
