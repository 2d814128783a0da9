"""``mmtune cluster``: Hungarian ACC, recipe loading, feature sources, an end-to-end run."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
import pytest
import yaml

from mm.config import ConfigError
from train.tasks.cluster import (
    ClusterDataConfig,
    ClusterDataError,
    cluster_accuracy,
    clustering_scores,
    load_cluster_recipe,
    load_features,
    load_samples,
    read_idx,
    stratified,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "eo"


def test_cluster_accuracy_uses_the_best_one_to_one_map():
    labels = np.array([0, 0, 1, 1, 2, 2])
    assert cluster_accuracy(labels, np.array([2, 2, 0, 0, 1, 1])) == 1.0
    # best map: cluster 1 -> class 0 (2), cluster 0 -> class 1 (2), cluster 2 -> class 2 (1): 5 of 6.
    assert cluster_accuracy(labels, np.array([1, 1, 0, 0, 0, 2])) == pytest.approx(5 / 6)
    # more clusters than classes: the extra cluster counts as wrong.
    assert cluster_accuracy(labels, np.array([0, 0, 1, 1, 2, 3])) == pytest.approx(5 / 6)
    scores = clustering_scores(labels, np.array([2, 2, 0, 0, 1, 1]))
    assert scores == {"ACC": 1.0, "NMI": pytest.approx(1.0), "ARI": pytest.approx(1.0)}


def test_idx_reader_and_missing_fashion_mnist_message(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(bytes([0, 0, 8, 3]) + b"".join(int(n).to_bytes(4, "big") for n in images.shape))
        handle.write(images.tobytes())
    assert np.array_equal(read_idx(path), images)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_features(ClusterDataConfig(source="fashion_mnist", path=str(tmp_path)))


def test_stratified_subset_keeps_class_shares():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    index = stratified(labels, 50)
    assert np.bincount(labels[index]).tolist() == [25, 15, 10]


def test_recipe_errors_name_the_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"data": {"source": "digits", "colour": 1}}))
    with pytest.raises(ConfigError, match=f"{path}: unknown key\\(s\\) recipe.data.colour"):
        load_cluster_recipe(path)
    path.write_text(yaml.safe_dump({"methods": ["dbscan"]}))
    with pytest.raises(ConfigError, match="unknown method"):
        load_cluster_recipe(path)
    path.write_text(yaml.safe_dump({"mlc": {"eta": 0}}))
    with pytest.raises(ConfigError, match="'eta' must be > 0"):
        load_cluster_recipe(path)


def test_eo_cluster_recipe_loads_with_overrides():
    recipe = load_cluster_recipe(CONFIGS / "cluster.yaml", ["mlc.epochs=3", "seeds=[0, 1]"])
    assert recipe.mlc.epochs == 3 and recipe.seeds == [0, 1] and recipe.data.source == "m3leo"


def test_cli_clusters_blobs_with_all_three_methods(tmp_path, capsys):
    from train.cli import main

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 5)) * 6
    labels = np.repeat(np.arange(3), 30)
    np.savez(tmp_path / "blobs.npz", features=centers[labels] + rng.normal(size=(90, 5)), labels=labels)
    recipe = tmp_path / "blobs.yaml"
    recipe.write_text(yaml.safe_dump({
        "data": {"source": "npz", "path": str(tmp_path / "blobs.npz")},
        "mlc": {"z_dim": 4, "hidden_dim": 16, "batch_size": 45, "init_epochs": 1, "epochs": 2},
    }))
    assert main(["cluster", "--config", str(recipe)]) == 0
    out = capsys.readouterr().out
    for method in ("mlc", "kmeans", "spectral"):
        assert f"| {method}" in out
    kmeans_row = next(line for line in out.splitlines() if line.startswith("| kmeans"))
    assert "100.0 +-  0.0" in kmeans_row  # well-separated blobs: k-means is exact
    assert "data.max_shift/data.flip do not apply" in out  # plain features: said, not silently ignored


def test_m3leo_features_label_chips_by_dominant_landcover(tmp_path):
    data = ClusterDataConfig(source="m3leo", split="train", m3leo={
        "synthetic": True, "fake_root": str(tmp_path), "fake_chips": 8, "fake_size": 8,
        "modalities": {"s1grd": ["*_vvasc"]}})
    x, y, shape = load_features(data)
    assert x.shape == (len(y), 2 * 4) and shape is None and np.isfinite(x).all()
    assert set(y.tolist()) <= set(range(11))


# ---------------------------------------------------------------------------- sources in real formats


def write_png_classes(root: Path, per_class: int = 6, size: int = 12, colour: bool = False, loose: bool = False):
    """PNG files of two well-separated classes (dark / bright, with noise) in class subfolders or loose."""
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for label, level in enumerate((40, 210)):
        folder = root if loose else root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size, size, 3) if colour else (size, size)
            pixels = np.clip(level + rng.normal(0, 20, shape), 0, 255).astype(np.uint8)
            path = folder / f"{label}_{i:02d}.png"
            Image.fromarray(pixels).save(path)
            paths.append(path)
    return paths


def test_image_folder_with_class_subfolders(tmp_path):
    write_png_classes(tmp_path / "grey")
    samples = load_samples(ClusterDataConfig(source="image_folder", path=str(tmp_path / "grey")))
    assert samples.x.shape == (12, 144) and samples.image_shape == (12, 12)
    assert samples.labels.tolist() == [0] * 6 + [1] * 6 and samples.ids[0].endswith("class_0/0_00.png")
    assert samples.x.min() >= 0.0 and samples.x.max() <= 1.0
    write_png_classes(tmp_path / "rgb", colour=True)
    x, y, shape = load_features(ClusterDataConfig(source="image_folder", path=str(tmp_path / "rgb"),
                                                  image_size=[8, 10]))
    assert x.shape == (12, 3 * 8 * 10) and shape == (3, 8, 10)


def test_image_folder_errors_name_the_file(tmp_path):
    from PIL import Image

    paths = write_png_classes(tmp_path)
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(paths[3])
    with pytest.raises(ClusterDataError, match=r"0_03.png: image is 7x5, .*0_00.png is 12x12; set data.image_size"):
        load_samples(ClusterDataConfig(source="image_folder", path=str(tmp_path)))
    paths[4].write_bytes(b"not a png")
    with pytest.raises(Exception, match=r"0_04.png: cannot read image"):
        load_samples(ClusterDataConfig(source="image_folder", path=str(tmp_path), image_size=[12, 12]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClusterDataError, match=r"empty: needs >= 2 images"):
        load_samples(ClusterDataConfig(source="image_folder", path=str(tmp_path / "empty")))
    with pytest.raises(FileNotFoundError, match="no such image folder"):
        load_samples(ClusterDataConfig(source="image_folder", path=str(tmp_path / "nowhere")))


def test_unlabeled_folder_needs_a_cluster_count_and_writes_assignments(tmp_path, capsys):
    from train.cli import main

    write_png_classes(tmp_path / "loose", loose=True)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"source": "image_folder", "path": str(tmp_path / "loose")},
                                      "methods": ["kmeans"]}))
    assert main(["cluster", "--config", str(recipe)]) == 2
    assert "key 'data.num_clusters'" in capsys.readouterr().err
    out_csv = tmp_path / "out" / "assign.csv"
    assert main(["cluster", "--config", str(recipe), "--set", "data.num_clusters=2",
                 "--set", f"assignments={out_csv}"]) == 0
    assert "| kmeans   | 2 |" in capsys.readouterr().out
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 12 and rows[0]["label"] == "" and rows[0]["id"].endswith("0_00.png")
    dark = {r["kmeans_seed0"] for r in rows if Path(r["id"]).name.startswith("0_")}
    bright = {r["kmeans_seed0"] for r in rows if Path(r["id"]).name.startswith("1_")}
    assert len(dark) == len(bright) == 1 and dark != bright


def test_csv_with_declared_image_shape(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (10, 12))
    labels = np.arange(10) % 2
    table = np.column_stack([labels, pixels])
    header = "label," + ",".join(f"p{i}" for i in range(12))
    for name in ("rows.csv", "rows.csv.gz"):
        np.savetxt(tmp_path / name, table, fmt="%d", delimiter=",", header=header, comments="")
        samples = load_samples(ClusterDataConfig(source="csv", path=str(tmp_path / name), image_shape=[3, 4]))
        assert samples.image_shape == (3, 4) and samples.labels.tolist() == labels.tolist()
        assert np.allclose(samples.x, pixels / 255.0)
    with pytest.raises(ClusterDataError, match=r"rows.csv: rows have 12 values but key 'data.image_shape' \[5, 5\]"):
        load_samples(ClusterDataConfig(source="csv", path=str(tmp_path / "rows.csv"), image_shape=[5, 5]))
    with pytest.raises(ClusterDataError, match=r"rows.csv: no label column 'class'"):
        load_samples(ClusterDataConfig(source="csv", path=str(tmp_path / "rows.csv"), label_column="class"))
    unlabeled = load_samples(ClusterDataConfig(source="csv", path=str(tmp_path / "rows.csv"), label_column=None))
    assert unlabeled.labels is None and unlabeled.x.shape == (10, 13)
    (tmp_path / "text.csv").write_text("label,a\n0,1\n1,x\n")
    with pytest.raises(ClusterDataError, match=r"text.csv: not numeric csv"):
        load_samples(ClusterDataConfig(source="csv", path=str(tmp_path / "text.csv")))
    with pytest.raises(ClusterDataError, match=r"rows.csv.gz: not readable as an .npz.*use data.source: csv"):
        load_samples(ClusterDataConfig(source="npz", path=str(tmp_path / "rows.csv.gz")))


def test_npz_with_image_shape_gets_the_augmentation(tmp_path):
    np.savez(tmp_path / "img.npz", features=np.random.default_rng(0).random((6, 16)), labels=np.arange(6) % 2)
    x, _, shape = load_features(ClusterDataConfig(source="npz", path=str(tmp_path / "img.npz"), image_shape=[4, 4]))
    assert shape == (4, 4) and x.shape == (6, 16)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_idx_files_by_name_plain_or_gzip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 6, 6))
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(5) % 3)
    samples = load_samples(ClusterDataConfig(source="mnist", path=str(tmp_path), split="train"))
    assert samples.image_shape == (6, 6) and np.allclose(samples.x, images.reshape(5, -1) / 255.0)
    assert samples.labels.tolist() == [0, 1, 2, 0, 1]
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz"):
        load_samples(ClusterDataConfig(source="mnist", path=str(tmp_path), split="test"))
    with pytest.raises(ConfigError, match="key 'data.path': source mnist needs"):
        ClusterDataConfig(source="mnist")


def test_unknown_source_through_the_cli_is_one_line(tmp_path, capsys):
    from train.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"source": "digits"}}))
    assert main(["cluster", "--config", str(recipe), "--set", "data.source=cifar"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "key 'data.source': unknown source 'cifar'" in err[0] and "image_folder" in err[0]


def test_clip_tower_features_of_an_image_folder(tmp_path):
    write_png_classes(tmp_path, per_class=3, colour=True)
    samples = load_samples(ClusterDataConfig(source="image_folder", path=str(tmp_path), features="clip"))
    assert samples.x.shape == (6, 32) and samples.image_shape is None  # tiny-test embeds in 32 dims
    assert np.allclose(np.linalg.norm(samples.x, axis=1), 1.0, atol=1e-5)
    again = load_samples(ClusterDataConfig(source="image_folder", path=str(tmp_path), features="clip"))
    assert np.allclose(samples.x, again.x)  # the random-init tower is seeded
    np.savez(tmp_path / "plain.npz", features=np.zeros((4, 3)), labels=np.arange(4))
    with pytest.raises(ConfigError, match="key 'data.features': clip embeds images"):
        load_samples(ClusterDataConfig(source="npz", path=str(tmp_path / "plain.npz"), features="clip"))


def test_shift_augment_on_colour_images_keeps_channels():
    import torch

    from train.tasks.cluster import image_shift_augment

    images = torch.zeros(4, 3, 5, 5)
    images[:, 0, 2, 2] = 1.0  # a red dot in the middle
    augment = image_shift_augment((3, 5, 5), max_shift=1, noise=0.0, flip=True)
    out = augment(images.reshape(4, -1), torch.Generator().manual_seed(0)).reshape(4, 3, 5, 5)
    assert out[:, 0].sum() == 4 and out[:, 1:].sum() == 0
