"""Smoke test of scripts/repro_moe.py on tiny settings: it runs end to end and prints every method's row.

The accuracies themselves are the script's claim, reported in its output, never asserted here.
"""

from __future__ import annotations

import pytest
import torch
from script_loader import load_script


def load_repro():
    return load_script('repro_moe')


def test_conflicting_tasks_share_inputs_and_disagree_on_labels():
    repro = load_repro()
    task_a, mixture, test = repro.conflicting_digits(limit=50)
    half = len(mixture.labels) // 2
    assert len(task_a.labels) == half == 35 and len(test.labels) == 2 * 15
    assert mixture.tasks.tolist() == [0] * half + [1] * half
    assert torch.equal(mixture.images[:half], mixture.images[half:])
    assert (mixture.labels[half:] == 9 - mixture.labels[:half]).all()


@pytest.mark.slow
def test_quick_run_prints_every_method():
    repro = load_repro()
    text = repro.main(["--quick"])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]]
            for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    rows.pop("method")
    assert list(rows) == list(repro.METHODS)
    for name, (_params, acc_a, acc_b, mean, purity) in rows.items():
        for cell in (acc_a, acc_b, mean):
            assert 0.0 <= float(cell.split(" ± ")[0]) <= 100.0
        assert (purity == "-") == name.startswith(("head only", "LoRA")), name
    lora, mole = int(rows["LoRA r=8"][0].replace(",", "")), int(rows["MoLE 4x r=2"][0].replace(",", ""))
    assert rows["head only"][0] == "0" and lora <= mole <= 1.1 * lora  # equal adapter budgets, routers aside
