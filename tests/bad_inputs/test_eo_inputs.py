"""Bad EO inputs through `mmtune train`: one line naming the file and the problem, exit 2, no NaN loss and
no generated data in place of a missing file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
import xarray as xr

from data.fake_m3leo import make_fake_m3leo
from data.fake_scenes import make_fake_scenes
from data.m3leo import chip_path, read_split
from tests.bad_inputs.corpus import assert_clear_error, run_mmtune

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "eo"
TINY = ["model.embed_dim=16", "model.depth=1", "model.num_heads=2", "train.max_steps=1", "train.progress=false"]


def _train(recipe: str, overrides: list[str], capsys, tmp_path):
    return run_mmtune(["train", "--config", str(CONFIGS / recipe), *TINY, f"train.out_dir={tmp_path / 'run'}",
                       *overrides], capsys)


def test_a_split_file_typo_is_named_and_nothing_is_generated(tmp_path, capsys):
    typo = tmp_path / "conus" / "conus_partitions_aschips_abc_splits_60-20-2O.csv"
    result = _train("sar_only.yaml", ["data.synthetic=false", f"data.split_file={typo}",
                                      f"data.fake_root={tmp_path / 'gen'}"], capsys, tmp_path)
    assert_clear_error(result, "train", str(typo), "split file not found")
    assert not (tmp_path / "gen").exists()


def test_a_netcdf_without_its_variable_is_named(tmp_path, capsys):
    split_file = make_fake_m3leo(tmp_path, n_chips=5, size=16, products=["s1grd", "gssic", "esaworldcover"])
    path = chip_path(split_file, "gssic", read_split(split_file, "train")[0])
    with xr.open_dataset(path) as ds:
        trimmed = ds.drop_vars("coherence").load()
    trimmed.to_netcdf(path, mode="w")
    result = _train("biomass_regression.yaml", ["data.synthetic=false", f"data.split_file={split_file}",
                                                "data.labels=[landcover]"], capsys, tmp_path)
    assert_clear_error(result, "train", str(path), "gssic NetCDF has no variable 'coherence'")


def _own(tmp_path, **change) -> list[str]:
    make_fake_scenes(tmp_path, n_scenes=1, size=32, shifted_km=change.pop("shifted_km", 0))
    return ["data.geotiff.chip_size=16", "data.geotiff.stride=16",
            f"data.geotiff.inputs.landsat.files={tmp_path}/scenes/*.tif",
            f"data.geotiff.labels.cover.files={tmp_path}/labels/landcover*.tif",
            f"data.geotiff.labels.canopy.files={tmp_path}/labels/canopy*.tif",
            *(f"data.geotiff.{k}={v}" for k, v in change.items())]


def test_a_band_index_out_of_range_is_named(tmp_path, capsys):
    result = _train("own_geotiffs.yaml", _own(tmp_path, **{"inputs.landsat.bands": "[1,4]"}), capsys, tmp_path)
    assert_clear_error(result, "train", "LC08_scene0.tif", "band index 4 out of range", "3 band(s)")


def test_a_label_100_km_away_is_named(tmp_path, capsys):
    result = _train("own_geotiffs.yaml", _own(tmp_path, shifted_km=100), capsys, tmp_path)
    assert_clear_error(result, "train", "landcover0.tif", "overlaps scene", "LC08_scene0.tif")


def test_all_nodata_chips_stop_with_the_counts(tmp_path, capsys):
    overrides = _own(tmp_path)
    scene = tmp_path / "scenes" / "LC08_scene0.tif"
    with rasterio.open(scene, "r+") as dst:
        dst.write(np.zeros((3, 32, 32), np.uint16))
    result = _train("own_geotiffs.yaml", overrides, capsys, tmp_path)
    assert_clear_error(result, "train", str(scene), "every chip was dropped", "'more than 50% nodata': 4")


def test_a_float_raster_declared_categorical_is_named(tmp_path, capsys):
    overrides = [o for o in _own(tmp_path) if "labels.cover.files" not in o]
    canopy = tmp_path / "labels" / "canopy0.tif"
    result = _train("own_geotiffs.yaml", [*overrides, f"data.geotiff.labels.cover.files={canopy}"], capsys, tmp_path)
    assert_clear_error(result, "train", str(canopy), "dtype float32", "integer class codes")
