"""What ``mmtune cluster`` clusters: samples as rows of numbers, their labels (or none), and, for images,
the image shape (so MLC's augmentation can shift and mirror them, and an encoder can embed them).

Sources (``data.source``):

- ``digits``: scikit-learn's bundled 8x8 digits.
- ``mnist`` / ``fashion_mnist``: the IDX files by their standard names (``t10k-images-idx3-ubyte`` etc.,
  gzip-compressed or not) in ``data.path`` (Fashion-MNIST default: the Debian package's folder).
- ``image_folder``: image files (PNG, JPEG, TIFF...) in one subfolder per class, or directly in the folder
  (unlabeled). All the same size, or resized to ``data.image_size``. Stored grey if every image is grey.
- ``csv``: a header line, a label column (``data.label_column``; null: unlabeled) and numeric columns; with
  ``data.image_shape`` the numbers are pixels (0-255 are scaled to [0, 1]). ``.csv.gz`` too.
- ``npz``: arrays ``features`` (n, D) and ``labels`` (n,); with ``data.image_shape`` the rows are images.
- ``m3leo``: M3LEO chips (per-chip band statistics, labelled by the dominant ESA WorldCover class).

Image rows are channel-first flattened: (H, W) grey or (C, H, W) colour. Errors name the file and key.
"""

from __future__ import annotations

import gzip
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mm.config import ConfigError
from mm.errors import MMTuneError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
SOURCES = ("digits", "mnist", "fashion_mnist", "image_folder", "csv", "npz", "m3leo")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class ClusterDataError(MMTuneError, ValueError):
    """A feature file cannot be used (wrong format, missing arrays, bad values); the message names it."""


@dataclass
class ClusterDataConfig:
    source: Literal["digits", "mnist", "fashion_mnist", "image_folder", "csv", "npz", "m3leo"] = field(
        default="digits", metadata={"help": "Where the samples come from (see data/cluster_sources.py)."})
    path: str = field(default="", metadata={"help": "File or folder of the source (Fashion-MNIST default "
                                                    f"{FASHION_MNIST_DIR})."})
    split: str = field(default="test", metadata={"help": "MNIST/Fashion-MNIST (train/test) or M3LEO split."})
    image_shape: list[int] | None = field(default=None, metadata={
        "help": "csv/npz: each row is an image of this shape, [H, W] or [C, H, W] (null: plain features)."})
    image_size: list[int] | None = field(default=None, metadata={
        "help": "image_folder: resize every image to [H, W] (null: they must all be one size)."})
    label_column: str | None = field(default="label", metadata={"help": "csv: the label column (null: unlabeled)."})
    num_clusters: int | None = field(default=None, metadata={
        "help": "How many clusters (null: the number of classes; needed for unlabeled data)."})
    features: Literal["raw", "clip"] = field(default="raw", metadata={
        "help": "raw: the numbers as read; clip: images embedded by a CLIP image tower (data.encoder)."})
    encoder: str = field(default="tiny-test", metadata={"help": "features clip: open_clip model or tiny config."})
    encoder_pretrained: str | None = field(default=None, metadata={
        "help": "features clip: local checkpoint of the tower (null: random init from seed 0)."})
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
        if self.source in ("npz", "csv", "image_folder", "mnist") and not self.path:
            raise ConfigError(f"key 'data.path': source {self.source} needs the path of its "
                              f"{'folder' if self.source in ('image_folder', 'mnist') else 'file'}")
        if self.features not in ("raw", "clip"):
            raise ConfigError(f"key 'data.features': expected raw or clip, got {self.features!r}")
        for key, lengths in (("image_shape", (2, 3)), ("image_size", (2,))):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, list) and len(value) in lengths
                                          and all(_is_int(v) and v > 0 for v in value)):
                raise ConfigError(f"key 'data.{key}': expected null or {' or '.join(map(str, lengths))} positive "
                                  f"integers, got {value!r}")
        for key in ("limit", "num_clusters"):
            value = getattr(self, key)
            if value is not None and (not _is_int(value) or value < 2):
                raise ConfigError(f"key 'data.{key}': expected null or an integer >= 2, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class ClusterSamples:
    """Rows ``x`` (n, D) float32, ``labels`` (n,) or None, ``image_shape`` of a row or None, ``ids`` (n,)
    (file paths, or row numbers) for writing assignments."""

    x: np.ndarray
    labels: np.ndarray | None
    image_shape: tuple[int, ...] | None
    ids: list[str]


def read_idx(path: Path) -> np.ndarray:
    """An IDX (MNIST format) array from a file, gzip-compressed if its name ends with .gz."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (key 'data.path'); Fashion-MNIST comes from the Debian "
                                "package 'dataset-fashion-mnist' (apt-get install dataset-fashion-mnist)")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                raw = handle.read()
        else:
            raw = path.read_bytes()
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


def idx_file(folder: Path, name: str) -> Path:
    """``folder/name.gz`` or ``folder/name`` (MNIST ships both ways); the .gz name if neither exists."""
    plain = folder / name
    return plain if plain.is_file() and not (folder / f"{name}.gz").is_file() else folder / f"{name}.gz"


def read_mnist(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    if split not in ("train", "test"):
        raise ConfigError(f"key 'data.split': MNIST-format data has splits train and test, got {split!r}")
    prefix = "t10k" if split == "test" else "train"
    images = read_idx(idx_file(folder, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(idx_file(folder, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ClusterDataError(f"{folder}: {prefix} images {images.shape} and labels {labels.shape} do not match "
                               "(expected (n, H, W) and (n,))")
    return images, labels


def read_feature_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``features`` (n, D) finite numbers and ``labels`` (n,) of an ``.npz``; anything else names the file."""
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
        hint = " (a CSV file? use data.source: csv)" if path.name.endswith((".csv", ".csv.gz")) else ""
        detail = "" if isinstance(err, ValueError) else f" ({type(err).__name__}: {err})"
        raise ClusterDataError(f"{path}: not readable as {expected}{detail}{hint}") from None
    if x.dtype.kind not in "biuf" or y.dtype.kind not in "biuU":
        raise ClusterDataError(f"{path}: 'features' must be numbers and 'labels' numbers or strings, got "
                               f"dtypes {x.dtype} and {y.dtype}")
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(y) < 2:
        raise ClusterDataError(f"{path}: expected 'features' (n, D) and 'labels' (n,) with n >= 2, got shapes "
                               f"{x.shape} and {y.shape}")
    return x, y


def read_csv(path: Path, label_column: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Numeric columns of a csv (or .csv.gz) with a header line, and its label column if named."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such csv file (key 'data.path')")
    try:
        with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")) as f:
            header = [name.strip() for name in f.readline().strip().split(",")]
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise ClusterDataError(f"{path}: not a readable csv file ({type(err).__name__}: {err})") from None
    if label_column is not None and label_column not in header:
        raise ClusterDataError(f"{path}: no label column {label_column!r} (key 'data.label_column') in the header "
                               f"{header[:8]}; set data.label_column: null for unlabeled rows")
    try:
        table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    except ValueError as err:  # numpy names the row and column of a value it cannot read
        raise ClusterDataError(f"{path}: not numeric csv ({err})") from None
    if table.shape[0] < 2 or table.shape[1] != len(header):
        raise ClusterDataError(f"{path}: expected >= 2 rows of {len(header)} numbers (the header's columns), got "
                               f"{table.shape}")
    if label_column is None:
        return table, None
    at = header.index(label_column)
    return np.delete(table, at, axis=1), table[:, at].astype(np.int64)


def as_images(x: np.ndarray, shape: list[int] | None, path: str) -> tuple[np.ndarray, tuple[int, ...] | None]:
    """Rows checked against the declared image shape; pixels 0-255 scaled to [0, 1]."""
    if shape is None:
        return x, None
    if x.shape[1] != int(np.prod(shape)):
        raise ClusterDataError(f"{path}: rows have {x.shape[1]} values but key 'data.image_shape' {shape} needs "
                               f"{int(np.prod(shape))}")
    return (x / 255.0 if x.max() > 1.0 else x), tuple(shape)


def read_image_folder(folder: Path, size: list[int] | None) -> ClusterSamples:
    """Images in class subfolders (labels: the subfolder's index in sorted order) or loose (unlabeled)."""
    from data.images import read_image

    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such image folder (key 'data.path')")

    def images_in(d: Path) -> list[Path]:
        return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    classes = sorted(d for d in folder.iterdir() if d.is_dir() and images_in(d))
    loose = images_in(folder)
    if classes and loose:
        raise ClusterDataError(f"{folder}: has both images ({loose[0].name}, ...) and class subfolders "
                               f"({classes[0].name}, ...); use one layout")
    files = [p for d in classes for p in images_in(d)] or loose
    if len(files) < 2:
        raise ClusterDataError(f"{folder}: needs >= 2 images ({', '.join(IMAGE_SUFFIXES)}) in it or in one "
                               "subfolder per class")
    arrays, first = [], None
    for path in files:
        image = read_image(path)
        if size is not None:
            from PIL import Image

            image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        if first is not None and pixels.shape != arrays[0].shape:
            raise ClusterDataError(f"{path}: image is {pixels.shape[1]}x{pixels.shape[0]}, {first.name} is "
                                   f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; set data.image_size: [H, W]")
        first = first or path
        arrays.append(pixels)
    stack = np.stack(arrays).transpose(0, 3, 1, 2)  # channel-first: (n, 3, H, W)
    if np.allclose(stack[:, 0], stack[:, 1]) and np.allclose(stack[:, 0], stack[:, 2]):
        stack = stack[:, 0]  # grey images stay one channel
    labels = np.array([classes.index(p.parent) for p in files]) if classes else None
    return ClusterSamples(stack.reshape(len(files), -1), labels, stack.shape[1:], [str(p) for p in files])


def read_samples(data: ClusterDataConfig) -> ClusterSamples:
    """The configured source's rows, labels and image shape (see the module docstring)."""
    ids, y = None, None
    if data.source == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x, y, shape = bunch.data / 16.0, bunch.target, (8, 8)
    elif data.source in ("mnist", "fashion_mnist"):
        images, y = read_mnist(Path(data.path or FASHION_MNIST_DIR), data.split)
        x, shape = images.reshape(len(images), -1) / 255.0, images.shape[1:]
    elif data.source == "image_folder":
        return read_image_folder(Path(data.path), data.image_size)
    elif data.source == "csv":
        x, y = read_csv(Path(data.path), data.label_column)
        x, shape = as_images(x, data.image_shape, data.path)
    elif data.source == "npz":
        x, y = read_feature_npz(data.path)
        x, shape = as_images(x, data.image_shape, data.path)
    elif data.source == "m3leo":
        from data.fake_m3leo import EODataConfig, ensure_chips

        x, y = m3leo_features(ensure_chips(EODataConfig(**data.m3leo)), data.split)
        shape = None
    else:  # __post_init__ rejects others; a hand-built config could still get here
        raise ConfigError(f"key 'data.source': unknown source {data.source!r}; expected one of {', '.join(SOURCES)}")
    x = np.asarray(x, np.float32)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise ClusterDataError(f"{data.path or data.source}: NaN or infinite values in {bad} row(s)")
    labels = None if y is None else np.asarray(y)
    return ClusterSamples(x, labels, tuple(shape) if shape else None, ids or [str(i) for i in range(len(x))])


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


def stratified(labels: np.ndarray | None, limit: int | None, seed: int = 0, count: int | None = None) -> np.ndarray:
    """Indices of about ``limit`` samples, the same share of every class (all when limit is None; a
    random subset of ``count`` rows when there are no labels)."""
    n = len(labels) if labels is not None else int(count or 0)
    if limit is None or limit >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    if labels is None:
        return np.sort(rng.permutation(n)[:limit])
    picks = [rng.permutation(np.flatnonzero(labels == c))[: max(1, round(limit * np.mean(labels == c)))]
             for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))
