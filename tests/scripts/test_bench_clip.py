"""scripts/bench_clip.py runs end to end on a tiny CLIP and prints every row (no timing assertions)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.mark.slow
def test_bench_clip_prints_every_variant(capsys):
    path = Path(__file__).resolve().parents[2] / "scripts" / "bench_clip.py"
    spec = importlib.util.spec_from_file_location("bench_clip", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = module.main(["--model", "tiny-test", "--batch", "2", "--image", "32", "--rounds", "1"])
    for row in ("frozen forward", "lora", "block_lora", "qladder"):
        assert f"| {row} " in table
    assert "x frozen forward" in capsys.readouterr().out
