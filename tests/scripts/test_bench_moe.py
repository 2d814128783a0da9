"""Smoke test of scripts/bench_moe.py on a tiny model: the variants agree and every row is printed.

Timing figures are the script's job (ratios against a baseline in the same run), never asserted here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_moe.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_moe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_moe"] = module
    spec.loader.exec_module(module)
    return module


def test_reference_loops_compute_the_library_dispatch():
    import torch

    from mm.adapters.moe import grouped_delta, masked_delta

    bench = load_bench()
    generator = torch.Generator().manual_seed(0)
    x, lora_A, lora_B = (torch.randn(shape, generator=generator) for shape in [(40, 12), (5, 3, 12), (5, 7, 3)])
    gates, experts = torch.rand(40, 5, generator=generator).softmax(-1).topk(2, dim=-1)
    expected = masked_delta(x, experts, gates, lora_A, lora_B)
    for fn in (grouped_delta, bench.naive_delta, bench.sorted_loop_delta):
        torch.testing.assert_close(fn(x, experts, gates, lora_A, lora_B), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_quick_run_prints_every_row():
    bench = load_bench()
    text = bench.main(["--quick", "--rounds", "1", "--steps", "1", "--no-memory"])
    labels = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert labels[1:] == list(bench.ROWS.values())
    assert "naive per-expert loop / default, training step:" in text
