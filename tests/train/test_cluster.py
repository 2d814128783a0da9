"""``mmtune cluster``: Hungarian ACC, recipe loading, feature sources, an end-to-end run."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import yaml

from mm.config import ConfigError
from train.tasks.cluster import (
    ClusterDataConfig,
    cluster_accuracy,
    clustering_scores,
    load_cluster_recipe,
    load_features,
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


def test_m3leo_features_label_chips_by_dominant_landcover(tmp_path):
    data = ClusterDataConfig(source="m3leo", split="train", m3leo={
        "synthetic": True, "fake_root": str(tmp_path), "fake_chips": 8, "fake_size": 8,
        "modalities": {"s1grd": ["*_vvasc"]}})
    x, y, shape = load_features(data)
    assert x.shape == (len(y), 2 * 4) and shape is None and np.isfinite(x).all()
    assert set(y.tolist()) <= set(range(11))
