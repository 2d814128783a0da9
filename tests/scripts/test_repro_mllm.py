"""Smoke test of scripts/repro_mllm.py (--quick): every stage runs through the mllm task and the loop, and
the table has one row per method with the trainable counts the script promises to keep comparable.

The figures themselves are the script's output for a person to read, never asserted here.
"""

from __future__ import annotations

import json

import pytest
from script_loader import load_script


@pytest.mark.slow
def test_quick_run_prints_a_row_per_method(tmp_path, capsys):
    module = load_script("repro_mllm")
    assert module.main(["--quick", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] and
            line.split()[0] in module.METHODS}
    assert set(rows) == set(module.METHODS)
    adapter_params = {m: int(rows[m][1]) for m in rows}
    # LoRA r=8, MM-LoRA 4+4 and MoLE (attention r=8, 4 MLP experts of r=2) train the same adapter tensors,
    # MoLE adds its routers; the ladder adds its own on top.
    assert adapter_params["lora"] == adapter_params["mm_lora"] < adapter_params["mole"] < 1.05 * adapter_params["lora"]
    assert adapter_params["mm_lora+qladder"] > adapter_params["mm_lora"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {f"{m}|{mix}" for m in module.METHODS for mix in ("mixed", "brief")}
    assert all("em_count" in r[0] for r in results.values())
