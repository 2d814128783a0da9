"""scripts/bench_generate.py: the table's ratios come from the rows, bad options are usage errors, and
(slow) a tiny end-to-end run in which mmtune's and PEFT's answers are checked equal before timing.
Timing figures are the script's job, never asserted here."""

import json

import pytest
from script_loader import load_script


def test_report_gives_each_variant_its_ratio_to_peft_at_the_same_count():
    bench = load_script("bench_generate")
    rows = [{"adapters": 8, "variant": "mmtune, attached", "seconds": 1.0, "tokens_per_s": 300.0,
             "pool_device_mib": None},
            {"adapters": 8, "variant": "mmtune, pool", "seconds": 1.0, "tokens_per_s": 150.0, "pool_device_mib": 1.5},
            {"adapters": 8, "variant": "PEFT", "seconds": 2.0, "tokens_per_s": 100.0, "pool_device_mib": None},
            {"adapters": 1000, "variant": "mmtune, pool", "seconds": 1.0, "tokens_per_s": 90.0,
             "pool_device_mib": 1.5}]
    text = bench.report(rows, bench.QUICK, "cpu")
    assert "| 8 | mmtune, attached | 300.0 | 3.00x | - |" in text
    assert "| 8 | mmtune, pool | 150.0 | 1.50x | 1.50 |" in text
    assert "| 1000 | mmtune, pool | 90.0 | - | 1.50 |" in text


@pytest.mark.parametrize("value", ["0", "x", "3,-1"])
def test_bad_adapter_counts_are_usage_errors(value):
    bench = load_script("bench_generate")
    with pytest.raises(SystemExit) as stop:
        bench.main(["--quick", "--adapters", value])
    assert stop.value.code == 2


@pytest.mark.slow
def test_quick_run_checks_answers_and_prints_every_row(tmp_path):
    pytest.importorskip("peft")
    bench = load_script("bench_generate")
    out = tmp_path / "rows.json"
    text = bench.main(["--quick", "--adapters", "1,3", "--rounds", "1", "--steps", "1", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["adapters"], r["variant"]) for r in rows] == [
        (n, v) for n in (1, 3) for v in ("mmtune, attached", "mmtune, pool", "PEFT")]
    assert all(r["tokens_per_s"] > 0 for r in rows) and "answers checked equal" in text
    pool = [r["pool_device_mib"] for r in rows if r["variant"] == "mmtune, pool"]
    assert pool[0] < pool[1]  # 1 slot vs 2 slots (QUICK's cap): bounded by the slots, not the count
