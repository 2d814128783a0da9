"""The M3LEO release's formats: GeoTIFF and NetCDF products from the fake maker, read back as the release is
(folders, variables, date pairs, units), masks instead of NaN, cached statistics, errors naming the file."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
import rasterio
import torch
import xarray as xr

from data.fake_geotiff import CRS, VV_DB, write_geotiff
from data.fake_m3leo import EODataConfig, ensure_chips, make_fake_m3leo
from data.m3leo import (
    GSSIC_BANDS,
    PRODUCTS,
    S1GRD_BANDS,
    WORLDCOVER_CODES,
    M3LEODataConfig,
    M3LEODataset,
    M3LEOError,
    chip_path,
    read_split,
)
from data.m3leo_io import pair_days
from mm.config import ConfigError

ALL_LABELS = ["landcover", "landcover_map", "builtup", "biomass", "elevation"]


@pytest.fixture(scope="module")
def split_file(tmp_path_factory):
    return make_fake_m3leo(tmp_path_factory.mktemp("m3leo"), n_chips=10, size=16, seed=3, nodata_fraction=0.5)


@pytest.fixture
def fresh_split(tmp_path):
    return make_fake_m3leo(tmp_path, n_chips=6, size=8, seed=1, products=["s1grd", "esaworldcover", "s2srm",
                                                                          "gssic", "biomass"])


def config(split_file, **kw) -> M3LEODataConfig:
    kw.setdefault("modalities", {"s1grd": None, "s2srm": None})
    kw.setdefault("labels", ALL_LABELS)
    return M3LEODataConfig(split_file=str(split_file), **kw)


def _ids(split_file):
    return [i for s in ("train", "val", "test") for i in read_split(split_file, s)]


def test_fake_miniset_has_the_release_layout_and_formats(split_file):
    folder = split_file.parent / split_file.name.split("_splits")[0]
    assert sorted(p.name for p in folder.iterdir()) == sorted([
        "s1grd-2020", "gssic", "gunw-2020-01-01_2020-03-31", "s2rgbm-2020", "s2srm-2020", "esaworldcover-2020",
        "ghsbuilts-2020", "biomass-2020", "srtmdem"])
    chip = _ids(split_file)[0]
    for name, product in PRODUCTS.items():
        path = chip_path(split_file, name, chip)
        assert path.suffix == f".{product.fmt}" and path.is_file()
        if product.fmt == "tif":
            with rasterio.open(path) as src:
                assert src.crs.to_string() == CRS and src.res == (10.0, 10.0)
                assert list(src.descriptions) == list(product.bands) and src.dtypes[0] == product.dtype
    with xr.open_dataset(chip_path(split_file, "gssic", chip)) as ds:
        assert ds["coherence"].dims == ("season", "deltadays", "y", "x")
        assert set(ds.data_vars) == {"coherence", "amplitude", "decaymodel", "geometry", "spatial_ref"}
        assert list(ds["deltadays"].values) == [12, 24, 36, 48]
    with xr.open_dataset(chip_path(split_file, "gunw", chip), group="science/grids/data") as ds:
        assert ds["unwrappedPhase"].dims == ("datepair", "y", "x")
        assert all(0 < pair_days(p, "x") <= 60 for p in ds["datepair"].values)
    with xr.open_dataset(chip_path(split_file, "biomass", chip)) as ds:
        assert {"agb", "agb_se"} <= set(ds.data_vars) and ds["agb"].dtype == np.float32


def test_s1grd_is_read_as_decibels_and_nearly_every_pixel_stays_valid(split_file):
    """The release stores dB (negative numbers): the old 10 log10 default masked almost every pixel."""
    dataset = M3LEODataset(config(split_file, normalize=False, modalities={"s1grd": None}, labels=["landcover"]))
    sample = dataset[0]
    with rasterio.open(chip_path(split_file, "s1grd", sample["id"])) as src:
        raw = src.read()
    assert torch.equal(sample["s1grd_mask"], torch.from_numpy(np.isfinite(raw)))
    assert torch.allclose(sample["s1grd"][sample["s1grd_mask"]], torch.from_numpy(raw[np.isfinite(raw)]))
    assert (sample["s1grd"][sample["s1grd_mask"]] < 0).float().mean() > 0.9


def test_samples_have_masks_no_nan_and_georeference(split_file):
    dataset = M3LEODataset(config(split_file, modalities={"s1grd": None, "gssic": ["coherence_*"],
                                                          "gunw": None, "s2srm": None}))
    holes = 0
    for i in range(len(dataset)):
        sample = dataset[i]
        for key in ("s1grd", "gssic", "gunw", "s2srm"):
            assert torch.isfinite(sample[key]).all() and (sample[key][~sample[f"{key}_mask"]] == 0).all()
        holes += int((~sample["s1grd_mask"]).any())
        assert sample["gssic"].shape == (16, 4, 4) and sample["gunw"].shape == (2, 4, 4)  # coarser grid
        assert sample["crs"] == CRS and sample["transform"][0] == 10.0
        left, bottom, right, top = sample["bounds"].tolist()
        assert right - left == top - bottom == 160.0
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
        index = sample["landcover_map"].numpy()
        assert (index[~valid] == -1).all()
        assert (np.asarray(WORLDCOVER_CODES)[index[valid]] == codes[valid]).all()
        with xr.open_dataset(chip_path(split_file, "biomass", sample["id"])) as ds:
            assert sample["biomass"] == pytest.approx(float(np.nanmean(ds["agb"].values)), rel=1e-5)
        vv, ok = sample["s1grd"][0].numpy(), sample["s1grd_mask"][0].numpy()
        water += list(vv[(codes == 80) & ok])
        tree += list(vv[(codes == 10) & ok])
    assert len(water) and len(tree)
    assert np.mean(water) < VV_DB[7] + 3 < VV_DB[0] - 3 < np.mean(tree)  # dark open water, brighter canopy


def test_gssic_variables_flatten_to_named_bands(split_file):
    chip = read_split(split_file, "train")[0]
    dataset = M3LEODataset(config(split_file, normalize=False, labels=["landcover"],
                                  modalities={"gssic": ["coherence_summer_*", "geometry_inc"]}))
    assert dataset.band_names["gssic"] == [f"coherence_summer_{d}" for d in (12, 24, 36, 48)] + ["geometry_inc"]
    sample = dataset[dataset.ids.index(chip)]
    with xr.open_dataset(chip_path(split_file, "gssic", chip)) as ds:
        expected = ds["coherence"].sel(season="summer").values
        inc = ds["geometry"].sel(feature="inc").values
    assert np.allclose(sample["gssic"][:4].numpy(), expected) and np.allclose(sample["gssic"][4].numpy(), inc)
    assert len(GSSIC_BANDS) == 16 + 8 + 12 + 2


@pytest.mark.parametrize("rule", ["mean", "shortest", "longest"])
def test_gunw_date_pairs_are_chosen_by_span_and_reduced(split_file, rule):
    dataset = M3LEODataset(config(split_file, normalize=False, labels=["landcover"], modalities={"gunw": None},
                                  gunw_min_days=12, gunw_max_days=36, gunw_rule=rule, on_error="skip"))
    sample = dataset[0]
    with xr.open_dataset(chip_path(split_file, "gunw", sample["id"]), group="science/grids/data") as ds:
        days = np.array([pair_days(p, "x") for p in ds["datepair"].values])
        keep = np.flatnonzero((days >= 12) & (days <= 36))
        pick = {"mean": keep, "shortest": keep[[np.argmin(days[keep])]], "longest": keep[[np.argmax(days[keep])]]}
        coherence = ds["coherence"].values[pick[rule]].mean(0)
    assert np.allclose(sample["gunw"][1].numpy(), coherence, atol=1e-6)
    for path, reason in dataset.skipped.items():  # chips with no pair in 12-36 days are counted, not NaN
        assert "gunw" in path and "no gunw date pair spans 12-36 days" in reason


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


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="modalities.sentinel3"):
        M3LEODataConfig(split_file="x_splits.csv", modalities={"sentinel3": None})
    with pytest.raises(ConfigError, match="modalities.s1grd': band '\\*_hh\\*' matches no band"):
        M3LEODataConfig(split_file="x_splits.csv", modalities={"s1grd": ["*_hh*"]})
    with pytest.raises(ConfigError, match="unknown label 'ndvi'"):
        M3LEODataConfig(split_file="x_splits.csv", labels=["ndvi"])


def _train_chip(split_file, product: str, k: int = 0):
    return chip_path(split_file, product, read_split(split_file, "train")[k])


def test_netcdf_missing_a_variable_names_the_file_and_variable(fresh_split):
    path = _train_chip(fresh_split, "biomass")
    with xr.open_dataset(path) as ds:
        trimmed = ds.drop_vars("agb").load()
    trimmed.to_netcdf(path, mode="w")
    with pytest.raises(M3LEOError, match=f"{path}: biomass NetCDF has no variable 'agb'"):
        M3LEODataset(config(fresh_split, modalities={"s1grd": None}, labels=["biomass"]))
    dataset = M3LEODataset(config(fresh_split, modalities={"s1grd": None}, labels=["biomass"], on_error="skip"))
    assert list(dataset.skipped) == [str(path)] and torch.isfinite(dataset[0]["biomass"])


def test_a_netcdf_variable_of_the_wrong_dtype_names_the_file(fresh_split):
    path = _train_chip(fresh_split, "biomass")
    with xr.open_dataset(path) as ds:
        broken = ds.load()
    broken["agb"] = broken["agb"].astype(str)
    broken.to_netcdf(path, mode="w")
    with pytest.raises(M3LEOError, match=f"{path}: biomass variable 'agb' has dtype .*expected a number type"):
        M3LEODataset(config(fresh_split, modalities={"s1grd": None}, labels=["biomass"]))


def test_wrong_band_count_and_wrong_dtype_name_the_file(fresh_split):
    path = _train_chip(fresh_split, "s1grd")
    with rasterio.open(path) as src:
        bands, transform = src.read()[:3], src.transform
    with rasterio.open(path, "w", driver="GTiff", height=8, width=8, count=3, dtype="float32", crs=CRS,
                       transform=transform) as dst:
        dst.write(bands)  # no band descriptions: the catalogue's 16 names are expected
    with pytest.raises(M3LEOError, match=f"{path}: s1grd chip has 3 bands, expected 16"):
        M3LEODataset(config(fresh_split, labels=["landcover"]))
    cover = _train_chip(fresh_split, "esaworldcover", 1)
    with rasterio.open(cover) as src:
        codes, transform = src.read().astype(np.float32), src.transform
    write_geotiff(cover, codes, PRODUCTS["ghsbuilts"], transform)
    with pytest.raises(M3LEOError, match=f"{cover}: esaworldcover has dtype float32, expected integer"):
        M3LEODataset(config(fresh_split, labels=["landcover"], on_error="raise", modalities={"s2srm": None}))


def test_a_label_shifted_100_km_is_an_error_or_a_counted_skip(fresh_split):
    from affine import Affine

    path = _train_chip(fresh_split, "esaworldcover")
    with rasterio.open(path) as src:
        codes, transform = src.read(), src.transform
    write_geotiff(path, codes, PRODUCTS["esaworldcover"], Affine.translation(100_000, 0) @ transform)
    with pytest.raises(M3LEOError, match=f"{path}: bounds .* do not overlap"):
        M3LEODataset(config(fresh_split, labels=["landcover"]))
    dataset = M3LEODataset(config(fresh_split, labels=["landcover"], on_error="skip"))
    assert list(dataset.skipped) == [str(path)]


def test_unreadable_file_raises_or_is_skipped_and_counted(fresh_split):
    broken = _train_chip(fresh_split, "esaworldcover")
    broken.write_bytes(b"not a tiff")
    missing = _train_chip(fresh_split, "s1grd", 1)
    missing.unlink()
    with pytest.raises(M3LEOError, match=f"{broken}: unreadable esaworldcover GeoTIFF"):
        M3LEODataset(config(fresh_split, labels=["landcover"]))
    dataset = M3LEODataset(config(fresh_split, labels=["landcover"], on_error="skip"))
    assert sorted(dataset.skipped) == sorted([str(broken), str(missing)])
    assert dataset.skipped[str(missing)] == "s1grd file not found"
    assert len(dataset) == len(read_split(fresh_split, "train")) - 2


def test_split_file_problems_name_the_file_and_never_fall_back_to_fake_chips(tmp_path, fresh_split):
    bad = tmp_path / "r_splits.csv"
    with open(bad, "w", newline="") as handle:
        csv.writer(handle).writerows([["tile", "fold"], ["a", "train"]])
    with pytest.raises(M3LEOError, match=f"{bad}: a split CSV needs columns"):
        read_split(bad, "train")
    copy = tmp_path / "nosplit.csv"
    shutil.copy(fresh_split, copy)
    with pytest.raises(M3LEOError, match="must contain '_splits'"):
        M3LEODataset(config(copy, labels=["landcover"]))
    typo = str(fresh_split).replace("_splits", "_split5")
    with pytest.raises(M3LEOError, match="split file not found .*only with data.synthetic: true"):
        ensure_chips(EODataConfig(split_file=typo, fake_root=str(tmp_path / "gen"), fake_chips=4))
    assert not (tmp_path / "gen").exists()


def test_a_gssic_grid_that_differs_by_a_cell_is_named_unless_resampled(fresh_split):
    path = _train_chip(fresh_split, "gssic", 1)
    with xr.open_dataset(path) as ds:
        x, y = ds["x"].values, ds["y"].values
        finer = ds.interp(x=np.linspace(x[0], x[-1], 3), y=np.linspace(y[0], y[-1], 3)).load()
    finer.to_netcdf(path, mode="w")  # 3 x 3 cells where the other chips have 2 x 2
    modalities = {"s1grd": None, "gssic": ["coherence_*"]}
    with pytest.raises(M3LEOError, match=r"gssic grid \(3, 3\) differs from \(2, 2\) .*data.resize.gssic"):
        M3LEODataset(config(fresh_split, modalities=modalities, labels=["landcover"]))
    dataset = M3LEODataset(config(fresh_split, modalities=modalities, labels=["landcover"], resize={"gssic": 4}))
    batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
    assert batch["gssic"].shape[-2:] == (4, 4) and torch.isfinite(batch["gssic"]).all()
    assert batch["gssic_mask"].float().mean() > 0.9


def test_several_regions_train_together_with_one_normalisation(tmp_path):
    conus = make_fake_m3leo(tmp_path, n_chips=5, size=8, region="conus", seed=1, products=["s1grd", "esaworldcover"])
    europe = make_fake_m3leo(tmp_path, n_chips=5, size=8, region="europe", seed=2, products=["s1grd", "esaworldcover"])
    cfg = config(conus, more_split_files=[str(europe)], modalities={"s1grd": ["*_vvasc"]}, labels=["landcover"])
    both = M3LEODataset(cfg)
    assert sorted(both.ids) == sorted(read_split(conus, "train") + read_split(europe, "train"))
    assert {both.path("s1grd", i).parts[-4] for i in both.ids} == {"conus", "europe"}
    assert both.stats["s1grd"].chips == len(both)
    with pytest.raises(M3LEOError, match="split file not found"):
        M3LEODataset(config(conus, more_split_files=[str(tmp_path / "x_splits.csv")], labels=["landcover"]))
