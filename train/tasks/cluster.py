"""``mmtune cluster``: cluster one data set's features with MLC, k-means and spectral clustering in one run.

Scores against the true labels: ACC (best one-to-one cluster -> class map, Hungarian algorithm via
scipy's ``linear_sum_assignment``), NMI and ARI (scikit-learn); unlabeled data gets cluster sizes only.
Sources (digits, MNIST/Fashion-MNIST IDX files, image folders, csv, npz, M3LEO) live in
data/cluster_sources.py; features are the raw numbers or a CLIP image tower's embeddings
(``data.features: clip``). ``assignments: out.csv`` writes every sample's cluster per method and seed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data.cluster_sources import (  # noqa: F401  (read_idx, stratified... are this module's API too)
    FASHION_MNIST_DIR,
    SOURCES,
    ClusterDataConfig,
    ClusterDataError,
    ClusterSamples,
    m3leo_features,
    read_feature_npz,
    read_idx,
    read_samples,
    stratified,
)
from data.fake_m3leo import EODataConfig
from heads.mlc import MLCConfig
from mm.config import ConfigError

METHODS = ("mlc", "kmeans", "spectral")


@dataclass
class ClusterRecipe:
    data: ClusterDataConfig = field(default_factory=ClusterDataConfig)
    mlc: MLCConfig = field(default_factory=MLCConfig)
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: list[int] = field(default_factory=lambda: [0])
    spectral_neighbors: int = 10
    standardize: bool = False
    threads: int = 1  # torch CPU threads: MLC's ops are small, extra threads mostly spin
    assignments: str | None = None  # csv: id, label, then one cluster column per method and seed

    def __post_init__(self) -> None:
        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not isinstance(self.seeds, list) or not self.seeds or not all(map(is_int, self.seeds)):
            raise ConfigError(f"key 'seeds': expected a list of integers, got {self.seeds!r}")
        if not isinstance(self.methods, list) or not self.methods:
            raise ConfigError(f"key 'methods': expected a list of {', '.join(METHODS)}, got {self.methods!r}")
        for key, low in (("spectral_neighbors", 2), ("threads", 1)):
            if not is_int(getattr(self, key)) or getattr(self, key) < low:
                raise ConfigError(f"key {key!r}: expected an integer >= {low}, got {getattr(self, key)!r}")


# ---------------------------------------------------------------------------- scores


def cluster_accuracy(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Accuracy under the best one-to-one map of clusters to classes (Hungarian algorithm)."""
    from scipy.optimize import linear_sum_assignment

    labels, clusters = np.asarray(labels), np.asarray(clusters)
    _, y = np.unique(labels, return_inverse=True)
    _, c = np.unique(clusters, return_inverse=True)
    counts = np.zeros((c.max() + 1, y.max() + 1))
    np.add.at(counts, (c, y), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / len(labels))


def clustering_scores(labels: np.ndarray, clusters: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return {"ACC": cluster_accuracy(labels, clusters), "NMI": float(normalized_mutual_info_score(labels, clusters)),
            "ARI": float(adjusted_rand_score(labels, clusters))}


# ---------------------------------------------------------------------------- features


def load_samples(data: ClusterDataConfig, seed: int = 0) -> ClusterSamples:
    """The source's samples (data/cluster_sources.py), embedded by the CLIP tower if ``data.features`` is
    clip, then class-stratified down to ``data.limit``."""
    samples = read_samples(data)
    index = stratified(samples.labels, data.limit, seed, count=len(samples.x))
    samples = ClusterSamples(samples.x[index], None if samples.labels is None else samples.labels[index],
                             samples.image_shape, [samples.ids[i] for i in index])
    if data.features == "clip":
        samples = ClusterSamples(clip_features(samples, data), samples.labels, None, samples.ids)
    return samples


def load_features(data: ClusterDataConfig) -> tuple[np.ndarray, np.ndarray | None, tuple[int, ...] | None]:
    """(features (n, D) float32, labels (n,) or None, image shape or None)."""
    samples = load_samples(data)
    return samples.x, samples.labels, samples.image_shape


def clip_features(samples: ClusterSamples, data: ClusterDataConfig, batch_size: int = 64) -> np.ndarray:
    """Unit-length image embeddings of ``data.encoder`` (encoders/clip.py) with its own preprocessing."""
    import torch
    from PIL import Image

    from encoders.clip import create_clip

    shape = samples.image_shape
    if shape is None:
        raise ConfigError(f"key 'data.features': clip embeds images, but source {data.source!r} gives plain "
                          "features (csv/npz rows that are images need data.image_shape)")
    bundle = create_clip(data.encoder, data.encoder_pretrained, seed=0)
    out = []
    with torch.no_grad():
        for start in range(0, len(samples.x), batch_size):
            images = []
            for row in samples.x[start : start + batch_size]:
                pixels = row.reshape(shape)
                pixels = pixels.transpose(1, 2, 0) if len(shape) == 3 else pixels  # (H, W, C) for PIL
                pixels = pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels
                image = Image.fromarray((np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)).convert("RGB")
                images.append(bundle.preprocess(image))
            embedded = bundle.model.encode_image(torch.stack(images)).float()
            out.append(torch.nn.functional.normalize(embedded, dim=-1).numpy())
    return np.concatenate(out).astype(np.float32)


def image_shift_augment(shape: tuple[int, ...], max_shift: int = 1, noise: float = 0.05,
                        flip: bool = False) -> Callable:
    """Augment flattened images of ``shape`` ((H, W) or (C, H, W)): a random translation by up to
    ``max_shift`` pixels, optionally a left-right mirror of a random half of the batch, plus Gaussian noise."""
    import torch

    def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        images = x.reshape(len(x), *shape)
        if flip:
            mirror = torch.rand(len(x), generator=generator) < 0.5
            images = torch.where(mirror.view(-1, *[1] * len(shape)), images.flip(-1), images)
        padded = torch.nn.functional.pad(images, (max_shift,) * 4)
        dy, dx = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()
        shifted = padded[..., dy : dy + shape[-2], dx : dx + shape[-1]].reshape(len(x), -1)
        return shifted + noise * torch.randn(shifted.shape, generator=generator)

    return augment


# ---------------------------------------------------------------------------- running


def cluster_once(method: str, x: np.ndarray, k: int, seed: int, recipe: ClusterRecipe,
                 image_shape: tuple[int, ...] | None, log: Callable[[str], None]) -> np.ndarray:
    if method == "kmeans":
        from sklearn.cluster import KMeans

        return KMeans(k, n_init=10, random_state=seed).fit_predict(x)
    if method == "spectral":
        from sklearn.cluster import SpectralClustering

        return SpectralClustering(k, affinity="nearest_neighbors", n_neighbors=recipe.spectral_neighbors,
                                  random_state=seed, assign_labels="kmeans").fit_predict(x)
    if method == "mlc":
        import dataclasses

        import torch

        from heads.mlc import MLC

        config = dataclasses.replace(recipe.mlc, num_clusters=k, seed=seed)
        data = recipe.data
        augment = image_shift_augment(image_shape, data.max_shift, flip=data.flip) if image_shape else None
        if augment is None:  # said, not silent: data.max_shift/data.flip need images
            log("mlc: the features are not images (no image shape; csv/npz rows that are images need "
                "data.image_shape), so data.max_shift/data.flip do not apply")
        model = MLC(x.shape[1], config).fit(torch.from_numpy(x), augment=augment)
        return model.predict(torch.from_numpy(x))
    raise ConfigError(f"cluster: unknown method {method!r}; known: {', '.join(METHODS)}")


def run_clustering(recipe: ClusterRecipe, log: Callable[[str], None] = print) -> dict[str, list[dict[str, float]]]:
    """Every method x seed on the recipe's features; prints and returns the scores."""
    import torch

    torch.set_num_threads(recipe.threads)
    data = recipe.data
    samples = load_samples(data)
    x, y, image_shape = samples.x, samples.labels, samples.image_shape
    if recipe.standardize:
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        image_shape = None  # standardised pixels are no longer an image to shift
    if y is None and data.num_clusters is None:
        raise ConfigError(f"key 'data.num_clusters': the {data.source} data at {data.path} has no labels; say how "
                          "many clusters to make")
    k = data.num_clusters or len(np.unique(y))
    classes = "unlabeled" if y is None else f"{len(np.unique(y))} classes"
    log(f"{data.source}: {len(x)} samples, {x.shape[1]} {data.features} features, {classes}, {k} clusters")
    results: dict[str, list[dict[str, float]]] = {m: [] for m in recipe.methods}
    columns: dict[str, np.ndarray] = {}
    for seed in recipe.seeds:
        for method in recipe.methods:
            start = time.perf_counter()
            clusters = cluster_once(method, x, k, seed, recipe, image_shape, log)
            scores = clustering_scores(y, clusters) if y is not None else {"clusters": float(len(np.unique(clusters)))}
            scores["seconds"] = time.perf_counter() - start
            results[method].append(scores)
            columns[f"{method}_seed{seed}"] = clusters
            log(f"seed {seed} {method:9s} " + " ".join(f"{key}={value:.4f}" for key, value in scores.items()))
    log(format_table(results))
    if recipe.assignments:
        log(f"assignments: {write_assignments(recipe.assignments, samples, columns)}")
    return results


def write_assignments(path: str | Path, samples: ClusterSamples, columns: dict[str, np.ndarray]) -> Path:
    """A csv (id, label, one column per method and seed), written to a temp file then renamed."""
    import csv

    from mm.state import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "label", *columns])
            for i, sample_id in enumerate(samples.ids):
                label = "" if samples.labels is None else samples.labels[i]
                writer.writerow([sample_id, label, *(int(c[i]) for c in columns.values())])

    atomic_write(Path(path), write)
    return Path(path)


def format_table(results: dict[str, list[dict[str, float]]]) -> str:
    if any("ACC" not in r for runs in results.values() for r in runs):  # unlabeled: nothing to score
        lines = ["| method   | clusters found | seconds | seeds |", "|---|---|---|---|"]
        for method, runs in results.items():
            found = ", ".join(str(int(r["clusters"])) for r in runs)
            lines.append(f"| {method:8s} | {found} | {np.mean([r['seconds'] for r in runs]):.1f} | {len(runs)} |")
        return "\n".join(lines)
    lines = ["| method   | ACC           | NMI           | ARI           | seeds |", "|---|---|---|---|---|"]
    for method, runs in results.items():
        cells = []
        for key in ("ACC", "NMI", "ARI"):
            values = 100 * np.array([r[key] for r in runs])
            cells.append(f"{values.mean():5.1f} +- {values.std():4.1f}")
        lines.append(f"| {method:8s} | " + " | ".join(cells) + f" | {len(runs)} |")
    return "\n".join(lines)


def _build(cls: type, data: Any, section: str, source: str) -> Any:
    """Dataclass ``cls`` from a mapping: unknown keys are errors naming ``section.key`` and ``source``."""
    import dataclasses
    import typing

    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: section {section!r} must be a mapping, got {data!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
                          f"known: {', '.join(known)}")
    hints = typing.get_type_hints(cls)
    values = {key: _build(hints[key], value, f"{section}.{key}", source) if dataclasses.is_dataclass(hints[key])
              else value for key, value in data.items()}
    try:
        return cls(**values)
    except (ConfigError, TypeError) as err:
        raise ConfigError(f"{source}: section {section!r}: {err}") from None


def load_cluster_recipe(path: str | Path, overrides: list[str] | None = None) -> ClusterRecipe:
    """A clustering recipe (YAML with sections data, mlc, methods, seeds, ...) with ``a.b=value`` overrides."""
    import yaml

    source = str(path)
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (data, mlc, methods, seeds...), got "
                          f"{type(raw).__name__}")
    if raw.pop("task", "cluster") != "cluster":  # recipes say 'task: cluster' for readers
        raise ConfigError(f"{source}: key 'task' is not 'cluster'; mmtune cluster reads clustering recipes "
                          "(configs/eo/cluster.yaml); other tasks run with mmtune train")
    for text in overrides or []:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {text!r}: expected section.key=value")
        node = raw
        *parents, last = key.split(".")
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {'.'.join(parents[: depth + 1])} is not a section")
        try:
            node[last] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {text!r}: the value is not valid YAML ({' '.join(str(err).split())})") from None
    recipe = _build(ClusterRecipe, raw, "recipe", source)
    unknown = sorted(set(recipe.methods) - set(METHODS))
    if unknown:
        raise ConfigError(f"{source}: key 'methods' has unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    if recipe.data.source == "m3leo":
        _build(EODataConfig, recipe.data.m3leo, "data.m3leo", source)
    return recipe
