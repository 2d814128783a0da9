"""Smoke test of scripts/repro_icm_lora.py on tiny settings, and checks of its task family (rotation) and its
verdict. The accuracies themselves are the script's claim, reported in its output, never asserted here."""

from __future__ import annotations

import json

import pytest
import torch
from script_loader import load_script


def test_rotation_family_is_a_real_rotation():
    repro = load_script("repro_icm_lora")
    image = torch.zeros(1, 8, 8)
    image[0, 1:7, 5] = 1.0  # a vertical bar right of the centre
    assert torch.allclose(repro.rotate(image, 0), image, atol=1e-6)
    quarter = repro.rotate(image, 90)
    assert torch.allclose(quarter, torch.rot90(image, 1, dims=(-2, -1)), atol=1e-5) or \
        torch.allclose(quarter, torch.rot90(image, -1, dims=(-2, -1)), atol=1e-5)
    assert torch.allclose(repro.rotate(repro.rotate(image, 90), -90), image, atol=1e-5)
    assert not torch.allclose(repro.rotate(image, 30), repro.rotate(image, 40))


def test_verdict_says_plainly_which_way_the_claim_went():
    repro = load_script("repro_icm_lora")
    means = dict(zip(repro.ROWS, (20.0, 90.0, 70.0, 60.0, 65.0, 75.0), strict=True))
    assert repro.verdict(means).startswith("The claim reproduces here: ICM generated (text + in-context) beats "
                                           "the best non-generated stand-in (nearest training task's LoRA) by 5.0")
    means["ICM generated (text + in-context)"] = 50.0
    assert repro.verdict(means).startswith("The claim does NOT reproduce here: the best generated LoRA "
                                           "(ICM generated (text)) trails nearest training task's LoRA by 5.0")


@pytest.mark.slow
def test_quick_run_prints_every_row(tmp_path):
    repro = load_script("repro_icm_lora")
    text = repro.main(["--quick", "--json", str(tmp_path / "seeds.json")])
    rows = {line.split("|")[1].strip(): line.strip("|").split("|")[1:]
            for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    rows.pop("LoRA")
    assert list(rows) == list(repro.ROWS)
    for cells in rows.values():
        assert len(cells) == len(repro.HELD_OUT) + 1
        assert all(0.0 <= float(cell.split(" ± ")[0]) <= 100.0 for cell in cells)
    assert "relative update error" in text and "storage: generator" in text and "The claim" in text
    saved = json.loads((tmp_path / "seeds.json").read_text())
    assert len(saved["seeds"]) == 2 and saved["held_out"] == list(repro.HELD_OUT)
