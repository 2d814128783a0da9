"""Smoke test of scripts/bench_limits.py at tiny sizes: both variants run, the gradient errors fall on the two
sides of the threshold, and every length gets a row and the closing verdict. Timing figures are never
asserted (the script reports ratios measured in the same run)."""

from __future__ import annotations

import pytest
from script_loader import load_script


def test_quick_run_prints_a_row_per_length_and_a_verdict():
    bench = load_script("bench_limits")
    text = bench.main(["--quick", "--rounds", "1", "--steps", "1", "--size", "max_seq=32"])
    table = [line for line in text.splitlines() if line.startswith("| 32 |")]
    assert len(table) == 1
    cells = [c.strip() for c in table[0].strip("|").split("|")]
    assert cells[1] == "70"  # C(4 + 4, 4) monomials of degree <= 4 in 4 variables
    below, above = float(cells[5]), float(cells[6])
    assert below < 1e-3 < 0.1 < above
    assert "On this hardware the approximation" in text or "no clean crossover" in text


def test_verdict_says_where_it_pays():
    bench = load_script("bench_limits")
    rows = [{"L": 256, "exact_ms": 1.0, "poly_ms": 2.0}, {"L": 512, "exact_ms": 3.0, "poly_ms": 2.5},
            {"L": 1024, "exact_ms": 9.0, "poly_ms": 5.0}]
    assert "pays from L = 512" in bench.verdict(rows) and "L < 512" in bench.verdict(rows)
    assert "does not pay at any" in bench.verdict([{**r, "poly_ms": 10.0} for r in rows])


def test_an_odd_degree_is_a_usage_error():
    bench = load_script("bench_limits")
    with pytest.raises(SystemExit) as err:
        bench.main(["--quick", "--size", "degree=3"])
    assert err.value.code == 2
