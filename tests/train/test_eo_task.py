"""The EO task: every configs/eo recipe steps and evaluates on a fake miniset in the release's formats (or on
generated user GeoTIFFs), only adapters and heads train, losses stay finite, data errors name the file."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import mm
from data.m3leo_products import M3LEOError
from train.engine.config import load_recipe

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "eo"
RECIPES = sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.stem != "cluster")
TINY = ["model.embed_dim=16", "model.depth=1", "model.num_heads=2", "model.decoder_width=8", "data.fake_chips=8",
        "data.fake_size=16", "train.batch_size=4", "train.progress=false", "train.eval_every=0"]
EXPECTED = {"sar_only": {"mAP", "micro_f1"}, "s2_only": {"mAP"}, "fused": {"mAP", "macro_f1"},
            "multilabel": {"mAP", "rmse_builtup", "rmse_biomass", "rmse_elevation"},
            "landcover_segmentation": {"mIoU", "pixel_acc", "iou_tree"}, "biomass_regression": {"rmse_biomass"},
            "own_geotiffs": {"mIoU", "iou_10", "rmse_canopy"},
            "resnet_conv_lora": {"mIoU", "iou_tree", "mAP"}}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    from data.fake_m3leo import make_fake_m3leo
    from data.fake_scenes import make_fake_scenes

    scenes = tmp_path_factory.mktemp("scenes")
    make_fake_scenes(scenes, n_scenes=1, size=64)
    chips = tmp_path_factory.mktemp("eo_chips")
    make_fake_m3leo(chips, n_chips=8, size=16)  # what data.synthetic would write for the TINY overrides
    return str(chips), scenes


def overrides(name: str, roots) -> list[str]:
    chips, scenes = roots
    if name != "own_geotiffs":
        return [*TINY, f"data.fake_root={chips}"]
    return [*TINY, "data.geotiff.chip_size=16", "data.geotiff.stride=16", f"data.geotiff.inputs.landsat.files={scenes}/scenes/*.tif",
            f"data.geotiff.labels.cover.files={scenes}/labels/landcover*.tif",
            f"data.geotiff.labels.canopy.files={scenes}/labels/canopy*.tif"]


def test_every_recipe_is_covered_and_validates():
    from train.tasks.eo import validate_config

    assert set(RECIPES) == set(EXPECTED)
    for name in [*RECIPES, "cluster"]:
        assert validate_config(str(CONFIGS / f"{name}.yaml")) is not None


# ResNet towers (timm's smallest, 5M parameters each) take ~10 s to build and step: slow.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if "resnet" in n else n for n in RECIPES])
def test_recipe_steps_and_evaluates_training_only_adapters_and_heads(name, roots):
    from train.engine.task import get_task

    task = get_task("eo")(load_recipe(CONFIGS / f"{name}.yaml", overrides(name, roots)))
    batch = task.collate([task.train_dataset()[i] for i in range(4)])
    loss, logs = task.training_step(batch)
    loss.backward()
    assert torch.isfinite(loss) and logs and all(math.isfinite(v) for v in logs.values())
    trained = {n for n, p in task.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trained and all(".adapters." in n or n.startswith(("presence_heads", "segmentation_heads",
                                                               "regression_head")) for n in trained)
    assert next(mm.adapted_layers(task.encoder), None) is not None
    evaluation = task.eval_dataset()
    metrics = task.evaluate([task.collate([evaluation[i] for i in range(len(evaluation))])])
    assert EXPECTED[name] <= set(metrics)
    assert all(math.isfinite(v) for k, v in metrics.items() if k != "mAP")


def test_a_missing_split_file_is_an_error_naming_it_not_generated_chips(tmp_path):
    from train.engine.task import get_task

    missing = tmp_path / "conus" / "conus_partitions_aschips_x_splits_60-20-20.csv"
    recipe = load_recipe(CONFIGS / "sar_only.yaml", [*TINY, "data.synthetic=false", f"data.split_file={missing}",
                                                     f"data.fake_root={tmp_path / 'gen'}"])
    with pytest.raises(M3LEOError, match=f"{missing}: split file not found"):
        get_task("eo")(recipe)
    assert not (tmp_path / "gen").exists()


def test_recipe_errors_name_the_key():
    with pytest.raises(mm.ConfigError, match="'data.split_file' is empty and 'data.synthetic' is false"):
        load_recipe(CONFIGS / "sar_only.yaml", ["data.synthetic=false"])
    with pytest.raises(mm.ConfigError, match="modalities.s2srm': band 'B99' matches no band"):
        load_recipe(CONFIGS / "s2_only.yaml", ["data.modalities={s2srm: [B99]}"])
    with pytest.raises(mm.ConfigError, match="keys 'split_file' and 'synthetic: true' both given"):
        load_recipe(CONFIGS / "sar_only.yaml", ["data.split_file=x_splits.csv"])
    with pytest.raises(mm.ConfigError, match="'data.geotiff' must declare inputs and labels"):
        load_recipe(CONFIGS / "sar_only.yaml", ["data.source=geotiff"])


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_end_to_end(name, roots, tmp_path):
    from train.engine.loop import train

    result = train(load_recipe(CONFIGS / f"{name}.yaml", [*overrides(name, roots), "train.max_steps=3",
                                                          f"train.out_dir={tmp_path}"]))
    assert EXPECTED[name] <= set(result.eval_metrics)
    assert (tmp_path / "adapters.safetensors").is_file()
