"""``mmtune cluster``: cluster one data set's features with MLC, k-means and spectral clustering in one run.

Scores against the true labels: ACC (best one-to-one cluster -> class map, Hungarian algorithm via
scipy's ``linear_sum_assignment``), NMI and ARI (scikit-learn). Sources: scikit-learn's digits, Fashion-MNIST
from the Debian package ``dataset-fashion-mnist``, M3LEO chips (per-chip band statistics, labelled by the
dominant ESA WorldCover class) or an ``.npz`` with ``features`` and ``labels``.
"""

from __future__ import annotations

import gzip
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from data.fake_m3leo import EODataConfig
from heads.mlc import MLCConfig
from mm.config import ConfigError
from mm.errors import MMTuneError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
METHODS = ("mlc", "kmeans", "spectral")
SOURCES = ("digits", "fashion_mnist", "m3leo", "npz")


class ClusterDataError(MMTuneError, ValueError):
    """A feature file cannot be used (wrong format, missing arrays, bad values); the message names it."""


@dataclass
class ClusterDataConfig:
    source: Literal["digits", "fashion_mnist", "m3leo", "npz"] = field(
        default="digits", metadata={"help": "Where the features come from."})
    path: str = field(default="", metadata={"help": "npz file (source npz) or Fashion-MNIST folder (default "
                                                    f"{FASHION_MNIST_DIR})."})
    split: str = field(default="test", metadata={"help": "Fashion-MNIST (train/test) or M3LEO split."})
    limit: int | None = field(default=None, metadata={"help": "Use this many samples (class-stratified)."})
    max_shift: int = field(default=1, metadata={"help": "Images: MLC's init augmentation shifts up to this many px."})
    flip: bool = field(default=False, metadata={"help": "Images: the augmentation also mirrors left-right "
                                                      "(clothes: yes; digits: no)."})
    m3leo: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "M3LEO data keys (data.fake_m3leo.EODataConfig: split_file or synthetic, modalities, ...)."})

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"key 'data.source': unknown source {self.source!r}; expected one of "
                              f"{', '.join(SOURCES)}")
        if self.source == "npz" and not self.path:
            raise ConfigError("key 'data.path': source npz needs the path of an .npz file with arrays "
                              "'features' (n, D) and 'labels' (n,)")
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int)
                                       or self.limit < 2):
            raise ConfigError(f"key 'data.limit': expected null or an integer >= 2, got {self.limit!r}")


@dataclass
class ClusterRecipe:
    data: ClusterDataConfig = field(default_factory=ClusterDataConfig)
    mlc: MLCConfig = field(default_factory=MLCConfig)
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: list[int] = field(default_factory=lambda: [0])
    spectral_neighbors: int = 10
    standardize: bool = False
    threads: int = 1  # torch CPU threads: MLC's ops are small, extra threads mostly spin

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


# ---------------------------------------------------------------------------- feature sources


def read_idx(path: Path) -> np.ndarray:
    """An IDX (MNIST format) array from a .gz file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (key 'data.path'); Fashion-MNIST comes from the Debian "
                                "package 'dataset-fashion-mnist' (apt-get install dataset-fashion-mnist)")
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as err:  # not gzip, or cut short
        raise ClusterDataError(f"{path}: not a readable gzip-compressed IDX file ({err})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise ClusterDataError(f"{path}: not an unsigned-byte IDX file (expected the magic 00 00 08 <ndim>)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ClusterDataError(f"{path}: IDX header cut short ({len(raw)} bytes for {ndim} dimensions)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ClusterDataError(f"{path}: IDX header says {shape}, file holds {data.size} values")
    return data.reshape(shape)


def read_feature_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``features`` (n, D) finite numbers and ``labels`` (n,) of an ``.npz``; anything else names the file."""
    import zipfile

    path = Path(path)
    expected = "an .npz archive (numpy.savez) with arrays 'features' (n, D) and 'labels' (n,)"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such feature file (key 'data.path'); expected {expected}")
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ClusterDataError(f"{path}: a single .npy array; expected {expected}")
        with archive:
            missing = sorted({"features", "labels"} - set(archive.files))
            if missing:
                raise ClusterDataError(f"{path}: no array(s) {missing} (found {archive.files}); expected {expected}")
            x, y = archive["features"], archive["labels"]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        if isinstance(err, MMTuneError):
            raise
        # numpy's ValueError here advises allow_pickle=True (unsafe, and wrong for a CSV): not repeated
        detail = "" if isinstance(err, ValueError) else f" ({type(err).__name__}: {err})"
        raise ClusterDataError(f"{path}: not readable as {expected}{detail}") from None
    if x.dtype.kind not in "biuf" or y.dtype.kind not in "biuU":
        raise ClusterDataError(f"{path}: 'features' must be numbers and 'labels' numbers or strings, got "
                               f"dtypes {x.dtype} and {y.dtype}")
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(y) < 2:
        raise ClusterDataError(f"{path}: expected 'features' (n, D) and 'labels' (n,) with n >= 2, got shapes "
                               f"{x.shape} and {y.shape}")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise ClusterDataError(f"{path}: 'features' has NaN or infinite values in {bad} row(s)")
    return x, y


def stratified(labels: np.ndarray, limit: int | None, seed: int = 0) -> np.ndarray:
    """Indices of about ``limit`` samples, the same share of every class (all when limit is None)."""
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[: max(1, round(limit * np.mean(labels == c)))]
             for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def load_features(data: ClusterDataConfig) -> tuple[np.ndarray, np.ndarray, tuple[int, int] | None]:
    """(features (n, D) float32, labels (n,), image shape or None)."""
    image_shape = None
    if data.source == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x, y, image_shape = bunch.data / 16.0, bunch.target, (8, 8)
    elif data.source == "fashion_mnist":
        folder = Path(data.path or FASHION_MNIST_DIR)
        prefix = "t10k" if data.split == "test" else "train"
        images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
        y = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
        x, image_shape = images.reshape(len(images), -1) / 255.0, (28, 28)
    elif data.source == "npz":
        x, y = read_feature_npz(data.path)
    else:
        from data.fake_m3leo import ensure_chips

        x, y = m3leo_features(ensure_chips(EODataConfig(**data.m3leo)), data.split)
    index = stratified(np.asarray(y), data.limit)
    return np.asarray(x, np.float32)[index], np.asarray(y)[index], image_shape


def m3leo_features(config: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Per chip: masked mean and std of every normalised band; label: the dominant WorldCover class."""
    from data.m3leo import M3LEODataset

    if "landcover" not in config.labels:
        config.labels = [*config.labels, "landcover"]
    dataset = M3LEODataset(config, split)
    rows, labels = [], []
    for i in range(len(dataset)):
        sample = dataset[i]
        parts = []
        for product in config.modalities:
            values, mask = sample[product].numpy(), sample[f"{product}_mask"].numpy()
            count = np.maximum(mask.sum((1, 2)), 1)
            mean = (values * mask).sum((1, 2)) / count
            parts += [mean, np.sqrt(((values - mean[:, None, None]) ** 2 * mask).sum((1, 2)) / count)]
        rows.append(np.concatenate(parts))
        labels.append(sample["landcover_dominant"])
    return np.stack(rows), np.asarray(labels)


def image_shift_augment(shape: tuple[int, int], max_shift: int = 1, noise: float = 0.05,
                        flip: bool = False) -> Callable:
    """Augment flattened images: a random translation by up to ``max_shift`` pixels, optionally a left-right
    mirror of a random half of the batch, plus Gaussian noise."""
    import torch

    def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        images = x.reshape(len(x), *shape)
        if flip:
            mirror = torch.rand(len(x), generator=generator) < 0.5
            images = torch.where(mirror[:, None, None], images.flip(-1), images)
        padded = torch.nn.functional.pad(images, (max_shift,) * 4)
        dy, dx = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()
        shifted = padded[:, dy : dy + shape[0], dx : dx + shape[1]].reshape(len(x), -1)
        return shifted + noise * torch.randn(shifted.shape, generator=generator)

    return augment


# ---------------------------------------------------------------------------- running


def cluster_once(method: str, x: np.ndarray, k: int, seed: int, recipe: ClusterRecipe,
                 image_shape: tuple[int, int] | None, log: Callable[[str], None]) -> np.ndarray:
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
        model = MLC(x.shape[1], config).fit(torch.from_numpy(x), augment=augment)
        return model.predict(torch.from_numpy(x))
    raise ConfigError(f"cluster: unknown method {method!r}; known: {', '.join(METHODS)}")


def run_clustering(recipe: ClusterRecipe, log: Callable[[str], None] = print) -> dict[str, list[dict[str, float]]]:
    """Every method x seed on the recipe's features; prints and returns the scores."""
    import torch

    torch.set_num_threads(recipe.threads)
    x, y, image_shape = load_features(recipe.data)
    if recipe.standardize:
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        image_shape = None  # standardised pixels are no longer an image to shift
    k = len(np.unique(y))
    log(f"{recipe.data.source}: {len(y)} samples, {x.shape[1]} features, {k} classes")
    results: dict[str, list[dict[str, float]]] = {m: [] for m in recipe.methods}
    for seed in recipe.seeds:
        for method in recipe.methods:
            start = time.perf_counter()
            scores = clustering_scores(y, cluster_once(method, x, k, seed, recipe, image_shape, log))
            scores["seconds"] = time.perf_counter() - start
            results[method].append(scores)
            log(f"seed {seed} {method:9s} " + " ".join(f"{key}={value:.4f}" for key, value in scores.items()))
    log(format_table(results))
    return results


def format_table(results: dict[str, list[dict[str, float]]]) -> str:
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
