"""Images of every bit depth and mode, and bad image datasets given to ``mmtune fewshot``.

Reading (``data.images.read_image``): 16-bit PNGs (grey, grey+alpha, RGB, RGBA), float and 32-bit integer
TIFFs and Pillow's other modes come out as 8-bit RGB scaled to their white level, never clipped; a float
image outside [0, 255] or holding NaN is an error naming the file. Through the CLI: a broken image, a
short class, a missing split or listing is ONE line naming the file or class, exit 2, before any result is
written, and the results an earlier run left in the output folder are kept.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from corpus import assert_clear_error, assert_kept, run_mmtune, snapshot
from PIL import Image

from data.fake_images import make_fake_fewshot_dataset, write_png
from data.images import ImageReadError, read_image

LEVELS_8 = np.arange(0, 256, 17, dtype=np.uint8)  # 16 grey levels, black to white


def _grey_8(height: int = 4) -> np.ndarray:
    return np.tile(LEVELS_8, (height, 1))  # (4, 16)


def _rgb_8() -> np.ndarray:
    grey = _grey_8()
    return np.stack([grey, grey[:, ::-1], np.full_like(grey, 51)], axis=-1)


# ---------------------------------------------------------------------------- reading: works


@pytest.mark.parametrize("channels", [1, 2, 3, 4], ids=["grey", "grey_alpha", "rgb", "rgba"])
def test_16_bit_png_reads_scaled_not_clipped(tmp_path, channels):
    """v * 257 is the 16-bit level of the 8-bit level v: reading gives v back, white stays white."""
    eight = {1: _grey_8(), 2: np.stack([_grey_8(), np.full_like(_grey_8(), 255)], -1), 3: _rgb_8(),
             4: np.concatenate([_rgb_8(), np.full_like(_grey_8(), 255)[..., None]], -1)}[channels]
    path = tmp_path / "deep.png"
    write_png(path, eight.astype(np.uint16) * 257)
    expected = eight[..., :3] if channels >= 3 else np.repeat(eight[..., :1] if channels == 2 else eight[..., None],
                                                               3, axis=-1)
    np.testing.assert_array_equal(np.asarray(read_image(path)), expected)


def test_16_bit_grey_png_is_the_mode_pillow_clips(tmp_path):
    """The defect: Pillow opens a 16-bit grey PNG as I;16 and convert('RGB') clips it to white."""
    path = tmp_path / "deep.png"
    write_png(path, np.full((4, 4), 30000, np.uint16))
    with Image.open(path) as raw:
        assert raw.mode == "I;16" and np.asarray(raw.convert("RGB")).min() == 255
    np.testing.assert_array_equal(np.asarray(read_image(path)), np.full((4, 4, 3), round(30000 / 257), np.uint8))


@pytest.mark.parametrize("scale", [1.0, 255.0], ids=["unit", "levels"])
def test_float_tiff_in_unit_or_level_range_reads_scaled(tmp_path, scale):
    levels = _grey_8().astype(np.float32) / 255.0 * scale
    path = tmp_path / "float.tif"
    Image.fromarray(levels).save(path)
    np.testing.assert_array_equal(np.asarray(read_image(path))[..., 0], _grey_8())


def test_32_bit_integer_tiff_reads_as_16_bit_levels(tmp_path):
    path = tmp_path / "int.tif"
    Image.fromarray(_grey_8().astype(np.int32) * 257).save(path)
    with Image.open(path) as raw:
        assert raw.mode == "I"
    np.testing.assert_array_equal(np.asarray(read_image(path))[..., 0], _grey_8())


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "CMYK"])
def test_other_modes_read_as_pillow_converts_them(tmp_path, mode):
    source = Image.fromarray(_rgb_8()).convert(mode)
    path = tmp_path / ("image.tif" if mode == "CMYK" else "image.png")
    source.save(path)
    with Image.open(path) as raw:
        expected = np.asarray(raw.convert("RGB"))
    assert np.asarray(read_image(path)).shape == (4, 16, 3)
    np.testing.assert_array_equal(np.asarray(read_image(path)), expected)


def test_palette_png_with_transparency_reads_without_a_warning(tmp_path):
    image = Image.fromarray(_grey_8()).convert("P")
    path = tmp_path / "palette.png"
    image.save(path, transparency=bytes(range(256)))  # per-entry alpha: Pillow warns on convert('RGB')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixels = np.asarray(read_image(path))
    np.testing.assert_array_equal(pixels[..., 0], _grey_8())


# ---------------------------------------------------------------------------- reading: errors name the file


@pytest.mark.parametrize("values, message", [
    (np.full((4, 4), 300.0, np.float32), r"values in \[300, 300\]; expected \[0, 1\] or \[0, 255\]"),
    (np.full((4, 4), -0.5, np.float32), r"values in \[-0.5, -0.5\]"),
    (np.array([[np.nan, 0.5]], np.float32), "NaN or infinite"),
], ids=["above_255", "negative", "nan"])
def test_float_image_out_of_range_is_an_error_naming_it(tmp_path, values, message):
    path = tmp_path / "odd.tif"
    Image.fromarray(values).save(path)
    with pytest.raises(ImageReadError, match=f"odd.tif: mode F image .*{message}"):
        read_image(path)


# ---------------------------------------------------------------------------- through mmtune fewshot


@pytest.fixture
def dataset(tmp_path) -> Path:
    return make_fake_fewshot_dataset(tmp_path / "data", "folder", train_per_class=3, test_per_class=2, size=32)


@pytest.fixture
def earlier_results(tmp_path) -> Path:
    """An output folder holding an earlier run's results, which a failing run must leave as they were."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "fewshot_results.json").write_text(json.dumps({"records": [{"method": "lora", "accuracy": 0.9}]}))
    (out / "fewshot_table.md").write_text("| method |\n|---|\n| lora |\n")
    return out


def fewshot(data: Path, out: Path, capsys, *extra: str):
    return run_mmtune(["fewshot", "--model", "tiny-test", "--data", str(data), "--out-dir", str(out),
                       "--methods", "zero-shot", "--shots", "1", "--seeds", "1", "--no-progress", *extra], capsys)


def _first_train_image(data: Path) -> Path:
    return sorted((data / "train").rglob("*.png"))[0]


@pytest.mark.parametrize("damage, reason", [
    (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "cannot read image"),
    (lambda p: p.write_text("not a picture"), "cannot read image"),
    (lambda p: p.write_bytes(b""), "cannot read image"),
], ids=["truncated_png", "text_named_png", "empty_png"])
def test_broken_training_image_is_one_line_naming_it(dataset, earlier_results, capsys, damage, reason):
    broken = _first_train_image(dataset)
    damage(broken)
    before = snapshot(earlier_results)
    result = fewshot(dataset, earlier_results, capsys, "--methods", "linear-probe", "--shots", "3")
    assert_clear_error(result, "fewshot", str(broken), reason)
    assert_kept(before, earlier_results)


def test_float_image_out_of_range_in_a_dataset_is_one_line(dataset, earlier_results, capsys):
    odd = dataset / "test" / "red_square" / "odd.tif"
    Image.fromarray(np.full((32, 32), 1000.0, np.float32)).save(odd)
    before = snapshot(earlier_results)
    assert_clear_error(fewshot(dataset, earlier_results, capsys), "fewshot", str(odd), "[1000, 1000]")
    assert_kept(before, earlier_results)


def test_empty_class_folder_names_the_class(dataset, earlier_results, capsys):
    for image in (dataset / "train" / "blue_cross").iterdir():
        image.unlink()
    before = snapshot(earlier_results)
    assert_clear_error(fewshot(dataset, earlier_results, capsys), "fewshot", "class 'blue_cross' has 0")
    assert_kept(before, earlier_results)


def test_too_few_images_for_the_largest_shot_count_fails_before_any_result(dataset, earlier_results, capsys):
    """The shots are checked up front: the 1- and 2-shot runs must not be computed and then lost."""
    before = snapshot(earlier_results)
    result = fewshot(dataset, earlier_results, capsys, "--shots", "1", "2", "4")
    assert_clear_error(result, "fewshot", "--shots 4", "class 'red_square' has 3", "class 'yellow_bar' has 3")
    assert result.out == ""  # no model was built, nothing was run
    assert_kept(before, earlier_results)


def test_missing_test_split_names_the_dataset(dataset, earlier_results, capsys):
    import shutil

    shutil.rmtree(dataset / "test")
    assert_clear_error(fewshot(dataset, earlier_results, capsys), "fewshot", str(dataset), "'test' split")


@pytest.mark.parametrize("text, culprit", [
    ('{"train": [["a.png", 0, "cat"]], ', "not a readable JSON"),
    ('{"train": [["a.png", "zero", "cat"]], "test": []}', "train[0]: expected [image_path, label, classname]"),
    ('[1, 2]', "expected an object with 'train' and 'test'"),
], ids=["malformed", "label_not_int", "not_an_object"])
def test_bad_split_json_names_the_file(tmp_path, earlier_results, capsys, text, culprit):
    split = tmp_path / "split_pets.json"
    split.write_text(text)
    assert_clear_error(fewshot(split, earlier_results, capsys), "fewshot", "split_pets.json", culprit)


def test_split_json_listing_a_missing_image_names_it(tmp_path, earlier_results, capsys):
    write_png(tmp_path / "present.png", np.zeros((8, 8), np.uint8))
    split = tmp_path / "split_pets.json"
    split.write_text(json.dumps({"train": [["present.png", 0, "cat"], ["gone.png", 0, "cat"]],
                                 "test": [["present.png", 0, "cat"]]}))
    before = snapshot(earlier_results)
    result = fewshot(split, earlier_results, capsys, "--shots", "2")
    assert_clear_error(result, "fewshot", str(tmp_path / "gone.png"), "not found", "split_pets.json")
    assert_kept(before, earlier_results)


def test_csv_label_outside_the_class_list_names_file_and_line(tmp_path, earlier_results, capsys):
    data = make_fake_fewshot_dataset(tmp_path / "csv", "csv", train_per_class=2, test_per_class=1, size=32)
    with (data / "test.csv").open("a") as handle:
        handle.write("test/00000.png,horse\n")
    assert_clear_error(fewshot(data, earlier_results, capsys), "fewshot", "test.csv:6", "'horse'")


def test_output_folder_that_is_a_file_is_named_before_any_work(dataset, tmp_path, capsys):
    blocker = tmp_path / "out_file"
    blocker.write_text("keep me")
    result = fewshot(dataset, blocker, capsys)
    assert_clear_error(result, "fewshot", str(blocker))
    assert blocker.read_text() == "keep me"


@pytest.mark.slow  # two CLI runs with a linear probe: about 15 s
def test_16_bit_dataset_gives_the_8_bit_results(tmp_path, capsys):
    """The same grey pictures as 8-bit and as 16-bit PNGs: identical accuracies (16-bit grey PNGs used to
    read as white squares; 16-bit RGB ones Pillow scales itself)."""
    eight = make_fake_fewshot_dataset(tmp_path / "eight", "folder", train_per_class=2, test_per_class=2, size=32)
    deep = tmp_path / "deep"
    for png in eight.rglob("*.png"):
        with Image.open(png) as colour:
            grey = np.asarray(colour.convert("L"))
        write_png(png, grey)
        target = deep / png.relative_to(eight)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_png(target, grey.astype(np.uint16) * 257)
    (deep / "classes.txt").write_text((eight / "classes.txt").read_text())
    from encoders.clip import create_clip, save_clip_weights

    weights = save_clip_weights(create_clip("tiny-test", seed=0).model, tmp_path / "clip.safetensors")  # one model
    accuracies = []
    for data, out in ((eight, tmp_path / "out8"), (deep, tmp_path / "out16")):
        result = fewshot(data, out, capsys, "--methods", "zero-shot", "linear-probe", "--shots", "2",
                         "--pretrained", str(weights))
        assert result.code == 0, result.err
        records = json.loads((out / "fewshot_results.json").read_text())["records"]
        accuracies.append([(r["method"], r["accuracy"]) for r in records])
    assert accuracies[0] == accuracies[1] and len(accuracies[0]) == 2
