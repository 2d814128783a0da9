"""M3LEO chips: real GeoTIFFs from the fake-data maker, masks instead of NaN, cached statistics, errors."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import rasterio
import torch

from data.fake_geotiff import CRS, VV_DB, make_fake_m3leo, write_geotiff
from data.m3leo import (
    PRODUCTS,
    S1GRD_BANDS,
    WORLDCOVER_CODES,
    M3LEODataConfig,
    M3LEODataset,
    M3LEOError,
    chip_path,
    read_split,
)
from mm.config import ConfigError

ALL_LABELS = ["landcover", "builtup", "biomass", "elevation"]


@pytest.fixture(scope="module")
def split_file(tmp_path_factory):
    return make_fake_m3leo(tmp_path_factory.mktemp("m3leo"), n_chips=12, size=16, seed=3, nodata_fraction=0.5)


@pytest.fixture
def fresh_split(tmp_path):
    return make_fake_m3leo(tmp_path, n_chips=6, size=8, seed=1, products=["s1grd", "esaworldcover", "s2msi"])


def config(split_file, **kw) -> M3LEODataConfig:
    kw.setdefault("modalities", {"s1grd": None, "s2msi": None})
    kw.setdefault("labels", ALL_LABELS)
    return M3LEODataConfig(split_file=str(split_file), **kw)


def test_fake_chips_are_georeferenced_geotiffs_in_m3leo_layout(split_file):
    ids = read_split(split_file, "train") + read_split(split_file, "val") + read_split(split_file, "test")
    assert len(ids) == 12
    for name, product in PRODUCTS.items():
        path = chip_path(split_file, name, ids[0])
        assert path.parent.name == product.folder_name(2020)
        with rasterio.open(path) as src:
            assert src.driver == "GTiff" and src.crs.to_string() == CRS
            assert src.res == (10.0, 10.0) and src.count == len(product.bands)
            assert list(src.descriptions) == list(product.bands)
            assert src.dtypes[0] == product.dtype
            if product.nodata is not None and product.nodata == product.nodata:
                assert src.nodata == product.nodata


def test_sample_has_masks_and_no_nan_where_files_have_holes(split_file):
    dataset = M3LEODataset(config(split_file))
    holes = 0
    for i in range(len(dataset)):
        sample = dataset[i]
        with rasterio.open(chip_path(split_file, "s1grd", sample["id"])) as src:
            raw = src.read()
        assert torch.equal(sample["s1grd_mask"], torch.from_numpy(np.isfinite(raw) & (raw > 0)))
        holes += int((~sample["s1grd_mask"]).sum() > 0)
        for key in ("s1grd", "s2msi"):
            assert sample[key].shape[0] == len(PRODUCTS[key].bands) and torch.isfinite(sample[key]).all()
            assert (sample[key][~sample[f"{key}_mask"]] == 0).all()
    assert holes > 0, "the fixture should contain nodata swaths"


def test_labels_follow_the_landcover_raster_and_signals_follow_the_labels(split_file):
    cfg = config(split_file, normalize=False, modalities={"s1grd": ["winter_vvasc"]})
    water, tree = [], []
    samples = [d[i] for d in (M3LEODataset(cfg, s) for s in ("train", "val", "test")) for i in range(len(d))]
    for sample in samples:
        with rasterio.open(chip_path(split_file, "esaworldcover", sample["id"])) as src:
            codes = src.read(1)
        valid = codes != 0
        expected = [((codes == c) & valid).sum() / valid.sum() >= 0.01 for c in WORLDCOVER_CODES]
        assert sample["landcover"].bool().tolist() == expected
        vv, ok = sample["s1grd"][0].numpy(), sample["s1grd_mask"][0].numpy()
        water += list(vv[(codes == 80) & ok])
        tree += list(vv[(codes == 10) & ok])
        assert sample["builtup"] == pytest.approx(0.0, abs=1e-6) or expected[4]
        assert sample["elevation_valid"] and sample["biomass"] >= 0
    assert len(water) and len(tree)
    assert np.mean(water) < VV_DB[7] + 3 < VV_DB[0] - 3 < np.mean(tree)  # dark open water, brighter canopy


def test_normalisation_statistics_are_streamed_once_and_cached(fresh_split):
    cfg = config(fresh_split, modalities={"s1grd": ["*_vvasc"]}, labels=["landcover"])
    first = M3LEODataset(cfg)
    cache = sorted((fresh_split.parent / ".stats").glob("s1grd-*.json"))
    assert len(cache) == 1 and first.stats["s1grd"].bands == [b for b in S1GRD_BANDS if b.endswith("_vvasc")]
    stamp = cache[0].stat().st_mtime_ns
    values = torch.cat([first[i]["s1grd"][first[i]["s1grd_mask"]].reshape(-1) for i in range(len(first))])
    assert values.mean().abs() < 0.05 and (values.std() - 1).abs() < 0.05  # pooled over the 4 bands
    val = M3LEODataset(cfg, "val")  # reuses the train statistics
    assert cache[0].stat().st_mtime_ns == stamp and val.stats["s1grd"].mean == first.stats["s1grd"].mean


def test_sar_db_conversion_and_band_selection(fresh_split):
    linear = M3LEODataset(config(fresh_split, modalities={"s1grd": ["summer_vh*"]}, normalize=False,
                                 sar_db=False, labels=["landcover"]))
    db = M3LEODataset(config(fresh_split, modalities={"s1grd": ["summer_vh*"]}, normalize=False,
                             labels=["landcover"]))
    a, b = linear[0], db[0]
    assert a["s1grd"].shape[0] == 2
    mask = b["s1grd_mask"]
    assert torch.allclose(b["s1grd"][mask], 10 * torch.log10(a["s1grd"][mask]), atol=1e-4)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="modalities.sentinel3"):
        M3LEODataConfig(split_file="x_splits.csv", modalities={"sentinel3": None})
    with pytest.raises(ConfigError, match="'\\*_hh\\*' matches no band of s1grd"):
        M3LEODataConfig(split_file="x_splits.csv", modalities={"s1grd": ["*_hh*"]})
    with pytest.raises(ConfigError, match="unknown label 'ndvi'"):
        M3LEODataConfig(split_file="x_splits.csv", labels=["ndvi"])


def _train_chip(split_file, product: str):
    return chip_path(split_file, product, read_split(split_file, "train")[0])


def test_wrong_band_count_names_the_file(fresh_split):
    path = _train_chip(fresh_split, "s1grd")
    with rasterio.open(path) as src:
        bands, transform = src.read()[:3], src.transform
    write_geotiff(path, bands, PRODUCTS["s1grd"], transform)
    with pytest.raises(M3LEOError, match=f"{path}: s1grd chip has 3 bands, expected 16"):
        M3LEODataset(config(fresh_split, labels=["landcover"]))


def test_crs_mismatch_between_modalities_names_the_file(fresh_split):
    path = _train_chip(fresh_split, "s2msi")
    with rasterio.open(path) as src:
        bands, transform = src.read(), src.transform
    write_geotiff(path, bands, PRODUCTS["s2msi"], transform, crs="EPSG:4326")
    with pytest.raises(M3LEOError, match=f"{path}: CRS EPSG:4326 differs"):
        M3LEODataset(config(fresh_split, labels=["landcover"]))


def test_unreadable_file_raises_or_is_skipped_and_counted(fresh_split):
    broken = _train_chip(fresh_split, "esaworldcover")
    broken.write_bytes(b"not a tiff")
    missing = chip_path(fresh_split, "s1grd", read_split(fresh_split, "train")[1])
    missing.unlink()
    with pytest.raises(M3LEOError, match=f"{broken}: unreadable esaworldcover chip"):
        M3LEODataset(config(fresh_split, labels=["landcover"]))
    dataset = M3LEODataset(config(fresh_split, labels=["landcover"], on_error="skip"))
    assert sorted(dataset.skipped) == sorted([str(broken), str(missing)])
    assert len(dataset) == len(read_split(fresh_split, "train")) - 2
    assert torch.isfinite(dataset[0]["s1grd"]).all()


def test_split_file_problems_name_the_file(tmp_path, fresh_split):
    bad = tmp_path / "r_splits.csv"
    with open(bad, "w", newline="") as handle:
        csv.writer(handle).writerows([["tile", "fold"], ["a", "train"]])
    with pytest.raises(M3LEOError, match=f"{bad}: a split CSV needs columns"):
        read_split(bad, "train")
    copy = tmp_path / "nosplit.csv"
    shutil.copy(fresh_split, copy)
    with pytest.raises(M3LEOError, match="must contain '_splits'"):
        M3LEODataset(config(copy, labels=["landcover"]))
