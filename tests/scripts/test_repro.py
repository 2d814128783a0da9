"""Smoke test of scripts/repro.py with tiny settings: the base is pretrained and cached, every method in
scripts/repro_methods.py runs (plain LoRA always), and one table row per method is printed.

The figures themselves are the script's output for a person to read, never asserted here.
"""

from __future__ import annotations

import pytest
from script_loader import load_script


def load_repro():
    return load_script('repro')


def table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_tiny_run_prints_a_row_per_method_and_caches_the_base(tmp_path):
    repro = load_repro()
    methods = [name for name in repro.METHODS if name != "lora"]
    tiny = ["--seeds", "2", "--steps", "4", "--checkpoints", "0,2,4", "--hidden", "16", "--pretrain-epochs", "1",
            "--calibration-batches", "2", "--cache-dir", str(tmp_path)]
    text = repro.main([*methods, *tiny])
    rows = table_rows(text)
    assert list(rows) == ["lora", *methods]
    for name, cells in rows.items():
        assert len(cells) == 1 + 3 + 1, f"{name}: {cells}"
        assert int(cells[0].split("-")[0]) > 0, f"{name}: no trainable parameters"
        assert all("±" in cell for cell in cells[1:]), f"{name}: {cells}"
    starts_at_base = ["lora", "pissa", "lora_ga", "eva"]  # these promise the base's output at init
    assert len({rows[name][1] for name in starts_at_base}) == 1, "loss@0 differs from the base's"
    cached = list(tmp_path.glob("*.safetensors"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    repro.main(["lora", *tiny])  # the second run reads the cached base instead of pretraining again
    assert cached[0].stat().st_mtime_ns == mtime


def test_unknown_method_is_a_clear_error(capsys):
    repro = load_repro()
    with pytest.raises(SystemExit):
        repro.parse_args(["lorax"])
    assert "unknown method(s) ['lorax']" in capsys.readouterr().err
