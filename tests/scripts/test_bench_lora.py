"""Smoke test of scripts/bench_lora.py on a tiny model: it runs end to end and prints every row.

Timing figures are the script's job (ratios against a baseline in the same run), never asserted here.
"""

from __future__ import annotations

import pytest
from script_loader import load_script

pytest.importorskip("peft")



def load_bench_lora():
    return load_script('bench_lora')


def table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|  |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_quick_run_prints_every_row_and_ratio():
    bench = load_bench_lora()
    text = bench.main(["--quick", "--rounds", "1", "--steps", "1", "--no-memory"])
    rows = table_rows(text)
    assert set(rows) == set(bench.ROWS.values())
    limit = rows[bench.ROWS["limit"]]
    assert limit[1] == "1.00x"
    for cells in rows.values():
        assert float(cells[0]) > 0
    expected_params = sum(
        r * (i + o) for i, o in [(64, 64)] * 4 + [(64, 172), (64, 172), (172, 64)] for r in [16]
    ) * bench.QUICK["layers"]
    assert rows[bench.ROWS["mmtune_train"]][3] == rows[bench.ROWS["peft_train"]][3] == str(expected_params)
    assert "training step, mmtune / PEFT:" in text and "forward, mmtune / PEFT:" in text


@pytest.mark.slow
def test_quick_run_measures_peak_memory_in_child_processes():
    bench = load_bench_lora()
    text = bench.main(["--quick", "--rounds", "1", "--steps", "1"])
    rows = table_rows(text)
    for key in ("limit", "mmtune_train", "peft_train"):
        assert float(rows[bench.ROWS[key]][2]) >= 0
    assert "training-step peak memory, mmtune / PEFT:" in text


def test_identical_weights_give_identical_outputs_and_a_real_update():
    bench = load_bench_lora()
    sizes = bench.QUICK
    mm_model = bench.build_mmtune(sizes)
    peft_model = bench.build_peft_like(mm_model, sizes)
    bench.assert_same_outputs(mm_model, peft_model, bench.build_frozen_base(sizes), bench._batch(sizes))
