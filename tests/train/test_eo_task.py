"""The EO task on generated M3LEO chips: fused towers with adapters, masked heads, recipes validate."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import mm
from train.engine.config import load_recipe

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "eo"
TINY = ["model.embed_dim=16", "model.depth=1", "model.num_heads=2", "data.fake_chips=12", "data.fake_size=16",
        "train.batch_size=4", "train.progress=false", "train.eval_every=0"]


@pytest.fixture(scope="module")
def chips(tmp_path_factory):
    return str(tmp_path_factory.mktemp("eo_chips"))


@pytest.mark.parametrize("name", ["sar_only", "s2_only", "fused", "multilabel", "cluster"])
def test_eo_recipes_validate(name):
    from train.tasks.eo import validate_config

    assert validate_config(str(CONFIGS / f"{name}.yaml")) is not None


def test_eo_task_step_trains_only_adapters_and_heads(chips):
    from train.engine.task import get_task

    recipe = load_recipe(CONFIGS / "multilabel.yaml", [*TINY, f"data.fake_root={chips}"])
    task = get_task("eo")(recipe)
    batch = task.collate([task.train_dataset()[i] for i in range(4)])
    loss, logs = task.training_step(batch)
    loss.backward()
    assert torch.isfinite(loss) and set(logs) == {"bce", "mse_std"}
    trained = {n for n, p in task.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all(".adapters." in n or n.startswith(("landcover_head", "regression_head")) for n in trained)
    assert len(mm.adapted_layers(task.encoder).__next__()) == 2
    metrics = task.evaluate([task.collate([task.eval_dataset()[i] for i in range(len(task.eval_dataset()))])])
    assert {"mAP", "micro_f1", "macro_f1", "rmse_builtup", "rmse_biomass", "rmse_elevation"} <= set(metrics)
    assert all(math.isfinite(v) for k, v in metrics.items() if k != "mAP")


def test_recipe_without_adapters_or_data_is_an_error_naming_the_key(chips):
    with pytest.raises(mm.ConfigError, match="'data.split_file' is empty"):
        load_recipe(CONFIGS / "sar_only.yaml", ["data.fake_chips=0"])
    with pytest.raises(mm.ConfigError, match="band 'B99' matches no band of s2msi"):
        load_recipe(CONFIGS / "s2_only.yaml", ["data.modalities={s2msi: [B99]}"])


@pytest.mark.slow
def test_fused_recipe_trains_end_to_end(chips, tmp_path):
    from train.engine.loop import train

    recipe = load_recipe(CONFIGS / "fused.yaml", [*TINY, f"data.fake_root={chips}", "train.max_steps=4",
                                                   f"train.out_dir={tmp_path}"])
    result = train(recipe)
    assert {"mAP", "micro_f1", "macro_f1"} <= set(result.eval_metrics)
    assert (tmp_path / "adapters.safetensors").is_file()
