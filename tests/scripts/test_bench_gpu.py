"""The GPU side of the benchmarks, checked on a machine without one: benchlib's device protocol, and
scripts/gpu_check.sh's plan (every benchmark, a time budget, arguments each script accepts)."""

from __future__ import annotations

import subprocess

import pytest
from script_loader import SCRIPTS, load_script

BUDGET_S = 8 * 60


def gpu_plan() -> list[tuple[str, int, list[str]]]:
    """(benchmark, time limit s, argv) per line of ``gpu_check.sh --list``."""
    done = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "--list"], capture_output=True, text=True,
                          check=True, timeout=30)
    plan = []
    for line in done.stdout.splitlines():
        name, limit, script, *argv = line.split()
        assert script == f"scripts/{name}.py"
        plan.append((name, int(limit), argv))
    return plan


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def test_gpu_check_runs_every_benchmark_within_the_budget():
    plan = gpu_plan()
    benchmarks = sorted(p.stem for p in SCRIPTS.glob("bench_*.py"))
    assert sorted(name for name, _, _ in plan) == benchmarks
    assert sum(limit for _, limit, _ in plan) < BUDGET_S - 20, "leave room for start-up between benchmarks"
    assert all(argv[:2] == ["--device", "cuda"] for _, _, argv in plan)


@pytest.mark.parametrize("name", [name for name, _, _ in gpu_plan()])
def test_each_planned_command_is_valid_and_refuses_to_run_without_a_gpu(name, capsys):
    """Without a GPU every planned command must get past its argument and size checks and stop at the
    device check (exit 2, one clear line): on a GPU machine the same command line will then run."""
    if has_gpu():
        pytest.skip("this machine has a GPU: scripts/gpu_check.sh itself is the check")
    argv = next(argv for n, _, argv in gpu_plan() if n == name)
    with pytest.raises(SystemExit) as exit_info:
        load_script(name).main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "--device cuda: torch sees no CUDA device on this machine" in err.splitlines()[-1]


def test_gpu_check_without_a_gpu_says_so_and_exits_2(tmp_path):
    if has_gpu():
        pytest.skip("this machine has a GPU")
    done = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), str(tmp_path / "reports")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == ("gpu_check.sh: no CUDA device (torch.cuda.is_available() is False); run it on "
                                   "a GPU machine")
    assert not (tmp_path / "reports").exists()


def test_timing_on_cuda_waits_for_the_device_before_and_after_every_call(monkeypatch):
    benchlib = load_script("benchlib")
    events = []
    monkeypatch.setattr(benchlib, "synchronize", lambda device: events.append(("sync", device)))
    timings = benchlib.time_interleaved({"a": lambda: events.append("a"), "b": lambda: events.append("b")},
                                        rounds=2, steps=1, warmup=1, device="cuda:1")
    timed = events[2:]  # after the two warm-up calls
    assert timed == [("sync", "cuda:1"), "a", ("sync", "cuda:1"), ("sync", "cuda:1"), "b", ("sync", "cuda:1")] * 2
    assert len(timings["a"].times_ms) == len(timings["b"].times_ms) == 2
    with pytest.raises(ValueError, match="does not measure GPU work"):
        benchlib.time_interleaved({"a": lambda: None}, rounds=1, steps=1, clock="cpu", device="cuda")


def test_device_and_size_options_are_usage_errors_when_wrong(capsys):
    benchlib = load_script("benchlib")
    parser = benchlib.bench_parser("test", rounds=1)
    for device in ("gpu", "cuda:x"):
        with pytest.raises(SystemExit) as exit_info:
            benchlib.check_device(parser, device)
        assert exit_info.value.code == 2
        assert f"--device {device}: expected cpu, cuda or cuda:N" in capsys.readouterr().err
    sizes = {"hidden": 64, "seq": 16}
    assert benchlib.resolve_sizes(parser, sizes, ["hidden=2048"]) == {"hidden": 2048, "seq": 16}
    assert sizes == {"hidden": 64, "seq": 16}
    assert benchlib.resolve_sizes(parser, sizes, ["width=8"], known=["hidden", "seq", "width"]) == sizes
    for bad, message in (("hiden=8", "unknown size 'hiden'"), ("seq=0", "expected a positive integer")):
        with pytest.raises(SystemExit):
            benchlib.resolve_sizes(parser, sizes, [bad])
        assert message in capsys.readouterr().err

