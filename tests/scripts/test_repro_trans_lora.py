"""Smoke test of scripts/repro_trans_lora.py on tiny settings, and checks of its task data and verdict. The
accuracies themselves are the script's claim, reported in its output, never asserted here."""

from __future__ import annotations

import json

import pytest
import torch
from script_loader import load_script


def test_task_sequences_count_down_and_validity_is_measured():
    repro = load_script("repro_trans_lora")
    data = repro.sequences(32, repro.TASK_STRIDES, seed=0)
    assert data.shape == (32, repro.LENGTH) and int(data.max()) < repro.VOCAB
    assert repro.valid_share(data) == 100.0
    assert repro.valid_share(repro.sequences(32, repro.PRETRAIN_STRIDES, seed=0)) == 0.0
    broken = data.clone()
    broken[:8, 5] = (broken[:8, 5] + 1) % repro.VOCAB
    assert repro.valid_share(broken) == 75.0
    assert repro.valid_share(torch.zeros(0, repro.LENGTH, dtype=torch.long)) == 0.0


def test_verdict_says_plainly_which_way_the_claim_went():
    repro = load_script("repro_trans_lora")
    means = dict(zip(repro.ROWS, (99.0, 0.0, 50.0, 98.0, 97.5, 90.0), strict=True))
    assert repro.verdict(means).startswith("The claim reproduces here: Trans-LoRA, no filter is within 1 point")
    means["Trans-LoRA, no filter"] = 80.0
    assert repro.verdict(means).startswith("The claim does NOT reproduce here: the best transfer (Trans-LoRA "
                                           "(discriminator filter)) trails the target LoRA trained on the real "
                                           "data by 8.0 points")


@pytest.mark.slow
def test_quick_run_prints_every_row(tmp_path):
    repro = load_script("repro_trans_lora")
    text = repro.main(["--quick", "--json", str(tmp_path / "seeds.json")])
    rows = {line.split("|")[1].strip(): line.strip("|").split("|")[1:]
            for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    rows.pop("model")
    assert list(rows) == list(repro.ROWS)
    for cells in rows.values():
        assert 0.0 <= float(cells[0].split(" ± ")[0]) <= 100.0
    assert "The claim" in text
    saved = json.loads((tmp_path / "seeds.json").read_text())
    assert len(saved["seeds"]) == 2 and saved["rows"] == list(repro.ROWS)


@pytest.mark.parametrize("method", ["dora", "pissa"])
def test_target_method_builds_every_target_adapter_of_that_method(method):
    repro = load_script("repro_trans_lora")
    import mm

    target, ids = repro.gpt2(0), torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        reference = target(input_ids=ids).logits
        repro.with_lora(target, repro.TARGET_TARGETS, "moved", None, 0, 0, method)
        assert mm.adapter_config(target, "moved").method == method
        # PiSSA keeps its residual in the adapter here, so every row of the script sees the same target base.
        with mm.disable_adapters(target):
            assert torch.allclose(target(input_ids=ids).logits, reference, atol=1e-5)
