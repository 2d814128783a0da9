"""scripts/bench_clip.py runs end to end on a tiny CLIP and prints every row (no timing assertions)."""

from __future__ import annotations

import pytest
from script_loader import load_script


@pytest.mark.slow
def test_bench_clip_prints_every_variant(capsys):
    module = load_script("bench_clip")
    table = module.main(["--model", "tiny-test", "--batch", "2", "--image", "32", "--rounds", "1"])
    for row in ("frozen forward", "lora", "block_lora", "qladder"):
        assert f"| {row} " in table
    assert "x frozen forward" in capsys.readouterr().out
