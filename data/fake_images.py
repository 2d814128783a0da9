"""Writers for labelled image datasets in the layouts ``data.fewshot`` reads, and a fake-data maker.

``write_image_dataset`` turns arrays into real PNG files plus the listing of one layout (image folders,
CSV lists, or a CoOp split JSON). ``make_fake_fewshot_dataset`` draws small class-distinct pictures (a
coloured shape per class on a noisy background) so tests and examples have data a model can learn.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

LAYOUTS = ("folder", "csv", "coop")


def _write_file_atomic(path: Path, data: bytes) -> None:
    from mm.state import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_png(path: Path, image: np.ndarray) -> None:
    """``image``: (H, W) or (H, W, 3), float in [0, 1], uint8, or uint16 (a 16-bit PNG; also (H, W, 2|4))."""
    from PIL import Image

    if image.dtype == np.uint16:
        _write_file_atomic(path, png16_bytes(image))
        return
    array = image if image.dtype == np.uint8 else (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    _write_file_atomic(path, buffer.getvalue())


PNG_COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (grey, grey+alpha, RGB, RGBA)


def png16_bytes(image: np.ndarray) -> bytes:
    """A 16-bit PNG of ``image`` (H, W[, 1|2|3|4]) uint16, encoded here: Pillow writes 16-bit grey only."""
    import struct
    import zlib

    pixels = image[..., None] if image.ndim == 2 else image
    height, width, channels = pixels.shape
    if channels not in PNG_COLOUR_TYPES:
        raise ValueError(f"a 16-bit PNG has 1 to 4 channels, got shape {image.shape}")

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, PNG_COLOUR_TYPES[channels], 0, 0, 0)
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))  # filter 0 per row
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def write_image_dataset(
    root: str | Path, images: np.ndarray, labels: Sequence[int], classes: Sequence[str],
    splits: Mapping[str, Sequence[int]], layout: str = "folder", write_classes_file: bool = True,
) -> Path:
    """PNG files for ``images[i]`` (labels index ``classes``) grouped into ``splits`` (name -> indices),
    listed as ``layout``; returns the path ``data.fewshot.load_fewshot_data`` takes."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    listing: dict[str, list] = {}
    for split, indices in splits.items():
        rows = []
        for i in indices:
            name = classes[int(labels[i])]
            relative = Path(split, name, f"{i:05d}.png") if layout == "folder" else Path(split, f"{i:05d}.png")
            write_png(root / ("images" if layout == "coop" else "") / relative, images[i])
            rows.append((relative.as_posix(), int(labels[i]), name))
        listing[split] = rows
    if layout == "coop":
        text = json.dumps({split: [list(r) for r in rows] for split, rows in listing.items()})
        _write_file_atomic(root / "split_fewshot.json", text.encode())
    elif layout == "csv":
        for split, rows in listing.items():
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            writer.writerow(["path", "label"])
            writer.writerows((path, name) for path, _, name in rows)
            _write_file_atomic(root / f"{split}.csv", buffer.getvalue().encode())
    if write_classes_file and layout != "coop":
        _write_file_atomic(root / "classes.txt", ("\n".join(classes) + "\n").encode())
    return root


FAKE_CLASSES = ("red_square", "green_disc", "blue_cross", "yellow_bar")
_COLOURS = ((0.9, 0.1, 0.1), (0.1, 0.8, 0.2), (0.15, 0.2, 0.95), (0.95, 0.9, 0.1))


def _shape_mask(kind: int, size: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    cy, cx = rng.uniform(0.35, 0.65, size=2)
    r = rng.uniform(0.18, 0.28)
    if kind == 0:
        return (abs(y - cy) < r) & (abs(x - cx) < r)
    if kind == 1:
        return (y - cy) ** 2 + (x - cx) ** 2 < r**2
    if kind == 2:
        return ((abs(y - cy) < r / 3) & (abs(x - cx) < r)) | ((abs(x - cx) < r / 3) & (abs(y - cy) < r))
    return (abs(y - cy) < r / 3) & (abs(x - cx) < 1.5 * r)


def fake_images(classes: int, per_class: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size, 3) float images in [0, 1] and their labels: class c is shape c % 4 in colour c % 4."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label in range(classes):
        for _ in range(per_class):
            image = rng.uniform(0.0, 0.25, size=(size, size, 3))
            mask = _shape_mask(label % 4, size, rng)
            colour = np.array(_COLOURS[label % 4]) * rng.uniform(0.8, 1.0)
            image[mask] = colour
            images.append(image)
            labels.append(label)
    return np.stack(images), np.array(labels)


def make_fake_fewshot_dataset(
    root: str | Path, layout: str = "folder", classes: Sequence[str] = FAKE_CLASSES, train_per_class: int = 8,
    test_per_class: int = 4, size: int = 32, seed: int = 0,
) -> Path:
    """A small dataset of real PNG files in ``layout``; returns the path to pass to ``load_fewshot_data``."""
    if len(classes) > len(_COLOURS):
        raise ValueError(f"the fake maker draws at most {len(_COLOURS)} distinct classes, got {len(classes)}")
    per_class = train_per_class + test_per_class
    images, labels = fake_images(len(classes), per_class, size, seed)
    order = np.arange(len(labels)).reshape(len(classes), per_class)
    splits = {"train": order[:, :train_per_class].ravel().tolist(), "test": order[:, train_per_class:].ravel().tolist()}
    return write_image_dataset(root, images, labels, list(classes), splits, layout)
