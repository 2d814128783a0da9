"""A user's own GeoTIFFs: declared bands / scale / offset / nodata, windowed chips with counted drops, labels
aligned by CRS and bounds (reprojected from EPSG:4326, resampled from 60 m), and errors naming the file."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio

from data.fake_geotiff import SPECTRA
from data.fake_scenes import CLASSES, make_fake_scenes
from data.geotiff import GeoTIFFChips
from data.geotiff_config import GeoTIFFDataConfig
from data.m3leo_products import M3LEOError
from mm.config import ConfigError


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    return root, make_fake_scenes(root, n_scenes=2, size=64, seed=2)


def declare(root, chip_size=16, **inputs) -> GeoTIFFDataConfig:
    landsat = {"files": str(root / "scenes" / "*.tif"), "bands": [1, "SR_B3", 3], "scale": 2.75e-5,
               "offset": -0.2, **inputs}
    return GeoTIFFDataConfig(
        inputs={"landsat": landsat},
        labels={"cover": {"files": str(root / "labels" / "landcover*.tif"), "kind": "categorical",
                          "classes": list(CLASSES)},
                "canopy": {"files": str(root / "labels" / "canopy*.tif"), "kind": "continuous"}},
        chip_size=chip_size, normalize=False)


def test_scenes_are_chipped_with_counted_drops_and_georeferenced_samples(scenes):
    root, files = scenes
    chips = GeoTIFFChips(declare(root))
    # 2 scenes x 4 x 4 windows; the 16 x 16 nodata corner of each scene is one whole chip: dropped, counted.
    assert len(chips.chips) == 30 and dict(chips.dropped) == {"more than 50% nodata": 2}
    assert len(chips.dataset("train")) + len(chips.dataset("val")) == 30
    sample = chips.sample(0)
    with rasterio.open(files["inputs"][0]) as src:
        window = chips.chips[0][1]
        dn = src.read(window=window)
        assert sample["crs"] == src.crs.to_string()
        assert sample["transform"].tolist() == list(rasterio.windows.transform(window, src.transform))[:6]
        assert sample["bounds"].tolist() == pytest.approx(list(rasterio.windows.bounds(window, src.transform)))
    valid = dn != 0
    assert sample["landsat_mask"].numpy().tolist() == valid.tolist()  # the file's nodata tag (0) is respected
    expected = np.where(valid, dn * 2.75e-5 - 0.2, 0.0)  # Landsat Collection-2 L2 reflectance
    assert np.allclose(sample["landsat"].numpy(), expected, atol=1e-6)


def test_whole_scenes_can_be_held_out(scenes):
    root, _ = scenes
    config = declare(root)
    config.split_by = "scene"
    chips = GeoTIFFChips(config)
    scene_of = {split: {chips.chips[i][0] for i in chips.split_index[split]} for split in ("train", "val")}
    assert len(scene_of["val"]) == 1 and not scene_of["train"] & scene_of["val"]
    assert len(chips.split_index["train"]) + len(chips.split_index["val"]) == len(chips.chips)


def test_labels_are_reprojected_onto_the_scene_grid(scenes):
    root, files = scenes
    chips = GeoTIFFChips(declare(root))
    agree = total = 0
    for i in range(len(chips.chips)):
        sample = chips.sample(i)
        # The scene's truth: its blue, green, red were rendered from the same class map (nearest class spectrum).
        assert sample["cover_map"].shape == (16, 16) and sample["cover"].shape == (4,)
        labelled = sample["cover_map"] >= 0
        total += int(labelled.sum())
        scene, window = chips.chips[i]
        with rasterio.open(files["inputs"][scene]) as src:
            bgr = src.read(window=window).transpose(1, 2, 0) * 2.75e-5 - 0.2
        truth = np.linalg.norm(bgr[:, :, None] - SPECTRA[None, None, :4, [0, 1, 2]], axis=-1).argmin(-1)
        agree += int((sample["cover_map"].numpy() == truth)[labelled.numpy()].sum())
        assert sample["canopy_valid"] and 0.0 < float(sample["canopy"]) < 25.0
    assert agree / total > 0.9  # nearest-neighbour from EPSG:4326 back onto the 30 m UTM grid


def test_a_label_that_does_not_overlap_is_an_error_naming_the_files(tmp_path):
    make_fake_scenes(tmp_path, n_scenes=1, size=32, shifted_km=100)
    with pytest.raises(M3LEOError, match="geotiff.labels.cover: no file of .*landcover0.tif.* overlaps scene"):
        GeoTIFFChips(declare(tmp_path))


def test_band_index_out_of_range_and_unknown_description_name_the_file(scenes):
    root, files = scenes
    with pytest.raises(M3LEOError, match=f"{files['inputs'][0]}: geotiff.inputs.landsat: band index 7 out of range"):
        GeoTIFFChips(declare(root, bands=[1, 7]))
    with pytest.raises(M3LEOError, match="no band described 'SR_B5'"):
        GeoTIFFChips(declare(root, bands=["SR_B5"]))


def test_all_nodata_chips_are_an_error_not_a_nan_loss(tmp_path):
    paths = make_fake_scenes(tmp_path, n_scenes=1, size=32)
    with rasterio.open(paths["inputs"][0], "r+") as dst:
        dst.write(np.zeros((3, 32, 32), np.uint16))
    with pytest.raises(M3LEOError, match="every chip was dropped: {'more than 50% nodata': 4}"):
        GeoTIFFChips(declare(tmp_path))


def test_genuine_zeros_stay_valid_without_a_nodata_tag_and_declared_nodata_applies(tmp_path):
    from affine import Affine

    path = tmp_path / "dem.tif"
    values = np.arange(64, dtype=np.int16).reshape(1, 8, 8) - 10  # zeros and negatives are real heights
    with rasterio.open(path, "w", driver="GTiff", height=8, width=8, count=1, dtype="int16", crs="EPSG:32633",
                       transform=Affine(10, 0, 0, 0, -10, 80)) as dst:
        dst.write(values)
    labels = {"mean": {"files": str(path), "kind": "continuous"}}
    untagged = GeoTIFFChips(GeoTIFFDataConfig(inputs={"dem": {"files": str(path)}}, labels=labels, chip_size=8,
                                              val_fraction=0.5, normalize=False))
    assert untagged.sample(0)["dem_mask"].all()
    declared = GeoTIFFChips(GeoTIFFDataConfig(inputs={"dem": {"files": str(path), "nodata": 0}}, labels=labels,
                                              chip_size=8, val_fraction=0.5, normalize=False))
    assert int((~declared.sample(0)["dem_mask"]).sum()) == 1
    # Warped from another CRS with no tag: only pixels beyond the file's footprint are invalid, not its zeros.
    geographic = tmp_path / "dem_4326.tif"
    with rasterio.open(geographic, "w", driver="GTiff", height=8, width=8, count=1, dtype="int16",
                       crs="EPSG:4326", transform=Affine(1e-4, 0, 15.0, 0, -1e-4, 7.2e-4)) as dst:
        dst.write(np.zeros((1, 8, 8), np.int16))
    inputs = {"dem": {"files": str(path)}, "flat": {"files": str(geographic)}}
    with rasterio.open(geographic) as src:
        from rasterio.warp import transform_bounds

        utm = transform_bounds(src.crs, "EPSG:32633", *src.bounds)
    with rasterio.open(path, "r+") as dst:  # put the DEM under the geographic file's footprint
        dst.transform = Affine(10, 0, utm[0] - 20, 0, -10, utm[3] + 20)
    warped = GeoTIFFChips(GeoTIFFDataConfig(inputs=inputs, labels=labels, chip_size=8, val_fraction=0.5,
                                            normalize=False)).sample(0)
    inside = warped["flat_mask"][0]
    assert inside.any() and not inside.all()  # the footprint covers part of the chip
    assert (warped["flat"][0][inside] == 0).all()  # and the zeros inside it stay valid


def test_a_float_raster_declared_categorical_is_a_dtype_error(scenes):
    root, files = scenes
    config = declare(root)
    config.labels["cover"].files = str(files["canopy"][0])
    with pytest.raises(M3LEOError, match="dtype float32; a categorical label needs integer class codes"):
        GeoTIFFChips(config)


def test_declaration_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="geotiff.labels.cover.classes"):
        GeoTIFFDataConfig(inputs={"a": {"files": "x.tif"}}, labels={"cover": {"files": "y.tif", "kind": "categorical"}})
    with pytest.raises(ConfigError, match="unknown key.*geotiff.inputs.a.band"):
        GeoTIFFDataConfig(inputs={"a": {"files": "x.tif", "band": 1}}, labels={"h": {"files": "y.tif",
                                                                                       "kind": "continuous"}})
    with pytest.raises(ConfigError, match="geotiff.inputs.a.bands' takes 1-based indices"):
        GeoTIFFDataConfig(inputs={"a": {"files": "x.tif", "bands": [0]}}, labels={"h": {"files": "y.tif",
                                                                                          "kind": "continuous"}})
    config = GeoTIFFDataConfig(inputs={"a": {"files": str(tmp_path / "none*.tif")}},
                               labels={"h": {"files": "y.tif", "kind": "continuous"}})
    with pytest.raises(ConfigError, match="geotiff.inputs.a.files': no file matches"):
        GeoTIFFChips(config)
