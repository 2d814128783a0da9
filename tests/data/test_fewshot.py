"""data.fewshot on real PNG files from the fake maker: the three layouts agree, K-shot sampling is exact and
seeded, base/novel follows CoOp, and bad files or labels are errors naming the file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data.fake_images import (
    FAKE_CLASSES,
    LAYOUTS,
    fake_images,
    make_fake_fewshot_dataset,
    write_image_dataset,
)
from data.fewshot import (
    FewShotDataError,
    ImageDataset,
    ImageReadError,
    Sample,
    base_novel_classes,
    load_fewshot_data,
    read_image,
    restrict_classes,
    sample_k_shot,
    select_classes,
)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fewshot")
    return {layout: make_fake_fewshot_dataset(root / layout, layout, train_per_class=6, test_per_class=3)
            for layout in LAYOUTS}


def _pixels(sample):
    return np.asarray(read_image(sample.path))


def test_every_layout_reads_the_same_images_and_labels(datasets):
    loaded = {layout: load_fewshot_data(path) for layout, path in datasets.items()}
    images, labels = fake_images(len(FAKE_CLASSES), 9, size=32, seed=0)
    for layout, data in loaded.items():
        assert data.classes == list(FAKE_CLASSES), layout
        assert data.layout == layout and sorted(data.splits) == ["test", "train"]
        assert len(data.split("train")) == 24 and len(data.split("test")) == 12
        for sample in data.split("test")[:4] + data.split("train")[-2:]:
            index = int(sample.path.stem)  # the writer names files by their index in the arrays
            assert sample.label == labels[index]
            expected = (images[index] * 255).round().astype(np.uint8)
            np.testing.assert_array_equal(_pixels(sample), expected)
    coop_file = next(datasets["coop"].glob("split*.json"))
    assert load_fewshot_data(coop_file).classes == list(FAKE_CLASSES)  # the JSON file itself works too


def test_image_dataset_gives_dict_samples(datasets):
    data = load_fewshot_data(datasets["folder"])
    dataset = ImageDataset(data.split("test"), transform=lambda image: np.asarray(image).shape)
    item = dataset[0]
    assert len(dataset) == 12 and item["image"] == (32, 32, 3) and item["label"] == data.split("test")[0].label
    assert item["path"].endswith(".png")


def test_k_shot_sampling_is_exact_and_reproducible(datasets):
    train = load_fewshot_data(datasets["csv"]).split("train")
    chosen = sample_k_shot(train, 4, seed=1)
    assert np.bincount([s.label for s in chosen]).tolist() == [4, 4, 4, 4]
    assert len(set(chosen)) == 16 and set(chosen) <= set(train)
    assert sample_k_shot(train, 4, seed=1) == chosen
    assert sample_k_shot(list(reversed(train)), 4, seed=1) == chosen  # input order does not matter
    assert sample_k_shot(train, 4, seed=2) != chosen
    with pytest.raises(FewShotDataError, match="class 'red_square' has 6 training images, fewer than 7 shots"):
        sample_k_shot(train, 7, seed=1, classes=FAKE_CLASSES)


def test_base_novel_split_follows_coop_and_relabels(datasets):
    assert base_novel_classes(["a", "b", "c", "d", "e"]) == (["a", "b", "c"], ["d", "e"])
    data = load_fewshot_data(datasets["coop"])
    novel = select_classes(data, "novel")
    assert novel.classes == ["blue_cross", "yellow_bar"]
    assert sorted({s.label for s in novel.split("train")}) == [0, 1] and len(novel.split("test")) == 6
    originals = {s.path: s.label for s in data.split("test")}
    assert all(originals[s.path] == s.label + 2 for s in novel.split("test"))
    with pytest.raises(FewShotDataError, match="classes \\['zebra'\\] are not in the dataset"):
        restrict_classes(data, ["zebra"])


def test_unreadable_and_missing_images_name_the_file(tmp_path, datasets):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageReadError, match="broken.png: cannot read image"):
        read_image(broken)
    with pytest.raises(ImageReadError, match="gone.png: image file not found"):
        ImageDataset([Sample(tmp_path / "gone.png", 0)])[0]


def test_csv_label_outside_the_class_list_names_file_and_line(tmp_path):
    images, labels = fake_images(2, 3, size=8)
    root = write_image_dataset(tmp_path, images, labels, ["cat", "dog"], {"train": [0, 1, 3], "test": [2, 5]},
                               layout="csv")
    (root / "test.csv").write_text("path,label\ntest/00002.png,cat\ntest/00005.png,horse\n")
    with pytest.raises(FewShotDataError, match="test.csv:3: label 'horse' is not in the class list"):
        load_fewshot_data(root)


def test_folder_outside_the_class_list_is_named(tmp_path):
    images, labels = fake_images(2, 2, size=8)
    root = write_image_dataset(tmp_path, images, labels, ["cat", "dog"], {"train": [0, 2], "test": [1, 3]})
    (root / "test" / "horse").mkdir()
    with pytest.raises(FewShotDataError, match="horse: class folder 'horse' is not in the class list"):
        load_fewshot_data(root)


def test_coop_json_errors_name_the_file_and_entry(tmp_path):
    split = tmp_path / "split_x.json"
    split.write_text(json.dumps({"train": [["a.png", 0, "cat"]], "test": [["b.png", 1, "dog"]]}))
    with pytest.raises(FewShotDataError, match="split_x.json: test\\[0\\]: label 1 \\('dog'\\) is not among"):
        load_fewshot_data(tmp_path)
    split.write_text(json.dumps({"train": [["a.png", 0, "cat"], ["c.png", 0, "kitten"]], "test": []}))
    with pytest.raises(FewShotDataError, match="train\\[1\\]: label 0 is named 'kitten' here, 'cat' before"):
        load_fewshot_data(split)
    split.write_text("{not json")
    with pytest.raises(FewShotDataError, match="split_x.json: not a readable JSON"):
        load_fewshot_data(split)


def test_a_folder_without_a_known_layout_is_refused(tmp_path):
    with pytest.raises(FewShotDataError, match="found no split\\*.json, train.csv or train/"):
        load_fewshot_data(tmp_path)
    with pytest.raises(FewShotDataError, match="no such dataset folder"):
        load_fewshot_data(tmp_path / "absent")
