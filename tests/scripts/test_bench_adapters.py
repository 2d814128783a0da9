"""Smoke test of scripts/bench_adapters.py on tiny sizes: it runs end to end, LoRA is the 1.00x baseline,
every requested method gets a row or a printed skip reason. Timings are never asserted here."""

from __future__ import annotations

import pytest
from script_loader import load_script


def load_bench():
    return load_script('bench_adapters')


def table_rows(text: str, section: str) -> dict[str, list[str]]:
    rows, inside = {}, False
    for line in text.splitlines():
        if line.startswith("## "):
            inside = line.startswith(f"## {section} ")
        elif inside and line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_quick_run_reports_ratios_to_lora_and_skips_data_init():
    bench = load_bench()
    text = bench.main(["--quick", "--rounds", "1", "--steps", "1", "--no-memory", "--workloads", "linear",
                       "--methods", "block_lora", "nola", "eva"])
    rows = table_rows(text, "linear")
    assert set(rows) == {"lora", "block_lora", "nola"}
    assert rows["lora"][2] == "1.00x" and rows["lora"][4] == "1.00x"
    width, depth, r = bench.QUICK["linear"]["width"], bench.QUICK["linear"]["depth"], bench.RANK
    assert int(rows["lora"][0]) == depth * r * 2 * width
    assert int(rows["block_lora"][0]) == depth * r * (width // 4 + width)
    assert int(rows["nola"][0]) == depth * (64 + 64)
    assert "skipped eva: needs data-driven init" in text


@pytest.mark.slow
def test_quick_llama_with_memory():
    bench = load_bench()
    text = bench.main(["--quick", "--rounds", "1", "--steps", "1", "--workloads", "llama",
                       "--methods", "bone", "mos"])
    rows = table_rows(text, "llama")
    assert set(rows) == {"lora", "bone", "mos"}
    assert rows["lora"][6] == "1.00x"
    assert all(float(cells[5]) >= 0 for cells in rows.values())
