"""scripts/sweep_fewshot_lr.py: validation images are the train split minus the shots, never test images."""

from __future__ import annotations

from pathlib import Path

import pytest
from script_loader import load_script


def load_sweep():
    return load_script('sweep_fewshot_lr')


def test_validation_pool_is_the_train_split_without_the_shots():
    from data.fewshot import Sample, sample_k_shot

    train = [Sample(Path(f"train/{c}/{i}.png"), c) for c in range(3) for i in range(6)]
    shots = sample_k_shot(train, 2, seed=1, classes=["a", "b", "c"])
    pool = load_sweep().validation_pool(train, shots)
    assert len(pool) == len(train) - len(shots) == 12
    assert not {s.path for s in pool} & {s.path for s in shots}


@pytest.mark.slow
def test_sweep_scores_every_lr_on_validation_images(tmp_path):
    from train.tasks.demo import DemoSettings

    sweep = load_sweep()
    lines: list[str] = []
    settings = DemoSettings(cache_dir=str(tmp_path / "cache"), pretrain_epochs=2, progress=False)
    scores = sweep.sweep("lora", [1e-2, 3e-2], [1], [101], settings, max_steps=2, log=lines.append)
    assert set(scores) == {1e-2, 3e-2} and all(len(v) == 1 and 0.0 <= v[0] <= 1.0 for v in scores.values())
    assert any("validation" in line and "660 images" in line for line in lines)  # 665 novel train - 5 shots
    assert "best lr on validation:" in sweep.report("lora", scores)
