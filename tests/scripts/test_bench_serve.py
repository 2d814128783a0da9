"""Smoke test of scripts/bench_serve.py on a tiny model: every part runs (its equality checks pass) and
prints its table. Timing figures are the script's job, never asserted here."""

from __future__ import annotations

import pytest
import torch
from script_loader import load_script

pytest.importorskip("peft")


def tables(text: str) -> list[list[list[str]]]:
    """The markdown tables of the report, each a list of data rows (header and rule dropped)."""
    found, current = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            if current is None:
                current = []
                found.append(current)
            current.append([c.strip() for c in line.strip("|").split("|")])
        else:
            current = None
    return [rows[2:] for rows in found]


def test_pool_memory_stays_at_the_budget_however_many_adapters_are_registered():
    bench = load_script("bench_serve")
    text = bench.main(["--quick", "--only", "pool"])
    (pool,) = tables(text)
    assert [int(r[0]) for r in pool] == list(bench.QUICK_COUNTS["pool"])
    assert len({r[2] for r in pool}) == 1  # pool device MiB: the same for 1 and for 40 registered
    assert all(int(r[3]) <= int(r[1]) for r in pool)  # resident adapters never exceed the slots


@pytest.mark.slow  # builds PEFT and mmtune models for every N: ~10-40 s on a loaded machine
def test_quick_run_checks_outputs_and_prints_every_table():
    bench = load_script("bench_serve")
    forward, pool, train = tables(bench.main(["--quick", "--rounds", "1", "--steps", "1"]))
    assert [int(r[0]) for r in forward] == list(bench.QUICK_COUNTS["forward"])
    for row in forward:
        assert all(float(cell.rstrip("x")) > 0 for cell in row[1:])
    assert len(pool) == len(bench.QUICK_COUNTS["pool"])
    assert train[0][0] == "4" and float(train[0][5].rstrip("x")) > 0


def test_cuda_without_a_gpu_is_a_usage_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    bench = load_script("bench_serve")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--quick", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "--device cuda: torch sees no CUDA device" in capsys.readouterr().err
