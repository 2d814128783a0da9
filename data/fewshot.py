"""Few-shot image classification data: image folders, CSV lists and CoOp-style split JSON files; seeded
N-way K-shot sampling; base/novel class splits.

Layouts ``load_fewshot_data(path)`` reads (``classes.txt``, one class name per line, fixes the class list
and its order where given; otherwise folder names / CSV labels are sorted):

- CoOp split JSON: ``path`` is the JSON file or a folder holding exactly one ``split*.json``, with
  ``{"train": [[image_path, label, classname], ...], "val": [...], "test": [...]}``; image paths are
  relative to the image folder CoOp uses beside the JSON (``images/``, ``101_ObjectCategories/``, ``jpg/``,
  ``SUN397/``, ``2750/`` or ``UCF-101-midframes/``) if there is one, else to the JSON's folder.
- CSV lists: ``train.csv`` and ``test.csv`` (optional ``val.csv``) with a header ``path,label``; the label
  is a class name; paths are relative to the CSV's folder.
- Image folders: ``train/<class>/*.png`` and ``test/<class>/*.png`` (optional ``val/``).

Samples are dicts ``{"image": ..., "label": int, "path": str}``. Images are read when used
(``data.images.read_image``: any bit depth or mode, scaled to 8-bit RGB, never clipped); a file that cannot
be decoded raises ``ImageReadError`` naming it; a label outside the class list raises ``FewShotDataError``
naming the file (and line) that holds it.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data.images import ImageReadError, read_image  # noqa: F401  (re-exported: callers import them here)
from mm.errors import MMTuneError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})
SPLITS = ("train", "val", "test")
# The image folder beside a CoOp split file, as CoOp's dataset readers name it (images/: OxfordPets, Food101,
# DTD; 101_ObjectCategories/: Caltech101; jpg/: Flowers102; SUN397/; 2750/: EuroSAT; UCF-101-midframes/:
# UCF101); StanfordCars' paths start at the JSON's folder.
COOP_IMAGE_FOLDERS = ("images", "101_ObjectCategories", "jpg", "SUN397", "2750", "UCF-101-midframes")


class FewShotDataError(MMTuneError, ValueError):
    """A listing, label or image of a few-shot dataset is wrong; the message names the file."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


@dataclass
class FewShotData:
    """Class names (index = label) and the samples of each split found."""

    classes: list[str]
    splits: dict[str, list[Sample]]
    source: Path
    layout: str = ""
    notes: list[str] = field(default_factory=list)

    def split(self, name: str) -> list[Sample]:
        if name not in self.splits:
            raise FewShotDataError(f"{self.source}: no {name!r} split (found {sorted(self.splits)})")
        return self.splits[name]


class ImageDataset:
    """A map-style dataset over ``samples``: ``{"image": transform(PIL image), "label": int, "path": str}``."""

    def __init__(self, samples: Sequence[Sample], transform: Callable[[Any], Any] | None = None) -> None:
        self.samples, self.transform = list(samples), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        image = read_image(sample.path)
        return {"image": self.transform(image) if self.transform else image, "label": sample.label,
                "path": str(sample.path)}


def read_classes_file(path: Path) -> list[str]:
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if not names or duplicates:
        raise FewShotDataError(f"{path}: expected one distinct class name per line "
                               f"({'empty' if not names else f'duplicates: {duplicates}'})")
    return names


def scan_image_folder(split_dir: Path, classes: list[str] | None = None) -> tuple[list[Sample], list[str]]:
    """Samples of ``split_dir/<class>/<image>``; ``classes`` None takes the sorted folder names."""
    if not split_dir.is_dir():
        raise FewShotDataError(f"{split_dir}: no such folder")
    folders = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = [p.name for p in folders]
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for folder in folders:
        if folder.name not in index:
            raise FewShotDataError(f"{folder}: class folder {folder.name!r} is not in the class list "
                                   f"({', '.join(classes)})")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        samples.extend(Sample(p, index[folder.name]) for p in files)
    if not samples:
        raise FewShotDataError(f"{split_dir}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in class folders")
    return samples, classes


def read_csv_list(csv_path: Path, classes: list[str] | None = None) -> tuple[list[Sample], list[str]]:
    """Samples of a ``path,label`` CSV; ``classes`` None takes its sorted labels."""
    try:
        with csv_path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
            header = rows[0].keys() if rows else []
    except FileNotFoundError:
        raise FewShotDataError(f"{csv_path}: no such CSV file") from None
    if not rows or not {"path", "label"} <= set(header):
        raise FewShotDataError(f"{csv_path}: expected a header 'path,label' and at least one row")
    if classes is None:
        classes = sorted({row["label"] for row in rows})
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for line, row in enumerate(rows, start=2):
        if row["label"] not in index:
            raise FewShotDataError(f"{csv_path}:{line}: label {row['label']!r} is not in the class list "
                                   f"({', '.join(classes)})")
        samples.append(Sample(csv_path.parent / row["path"], index[row["label"]]))
    return samples, classes


def read_coop_split(json_path: Path) -> tuple[dict[str, list[Sample]], list[str]]:
    """Splits and class names of a CoOp split file (``[image_path, label, classname]`` entries)."""
    try:
        raw = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise FewShotDataError(f"{json_path}: not a readable JSON file ({err})") from None
    if not isinstance(raw, dict) or "train" not in raw or "test" not in raw:
        raise FewShotDataError(f"{json_path}: expected an object with 'train' and 'test' lists")
    folders = [json_path.parent / name for name in COOP_IMAGE_FOLDERS if (json_path.parent / name).is_dir()]
    root = folders[0] if folders else json_path.parent
    names: dict[int, str] = {}
    for split in ("train", *[s for s in SPLITS if s != "train" and s in raw]):
        for i, entry in enumerate(raw[split]):
            where = f"{json_path}: {split}[{i}]"
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[1], int)):
                raise FewShotDataError(f"{where}: expected [image_path, label, classname], got {entry!r}")
            label, name = entry[1], entry[2]
            if split != "train" and label not in names:
                raise FewShotDataError(f"{where}: label {label} ({name!r}) is not among the train classes")
            if names.setdefault(label, name) != name:
                raise FewShotDataError(f"{where}: label {label} is named {name!r} here, {names[label]!r} before")
    if sorted(names) != list(range(len(names))):
        raise FewShotDataError(f"{json_path}: train labels must be 0..{len(names) - 1}, got {sorted(names)}")
    splits = {s: [Sample(root / e[0], e[1]) for e in raw[s]] for s in SPLITS if s in raw}
    return splits, [names[i] for i in range(len(names))]


def load_fewshot_data(path: str | Path) -> FewShotData:
    """Read a dataset in any of the layouts of the module docstring; errors name what is missing."""
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        splits, classes = read_coop_split(path)
        return FewShotData(classes, splits, path, "coop")
    if not path.is_dir():
        raise FewShotDataError(f"{path}: no such dataset folder or split JSON file")
    classes_file = path / "classes.txt"
    classes = read_classes_file(classes_file) if classes_file.is_file() else None
    jsons = sorted(path.glob("split*.json"))
    if len(jsons) > 1:
        raise FewShotDataError(f"{path}: several split JSON files {[p.name for p in jsons]}; pass one of them")
    if jsons:
        splits, classes = read_coop_split(jsons[0])
        return FewShotData(classes, splits, jsons[0], "coop")
    if (path / "train.csv").is_file():
        train, classes = read_csv_list(path / "train.csv", classes)
        splits = {"train": train}
        for split in ("val", "test"):
            if (path / f"{split}.csv").is_file():
                splits[split] = read_csv_list(path / f"{split}.csv", classes)[0]
        return FewShotData(classes, splits, path, "csv")
    if (path / "train").is_dir():
        train, classes = scan_image_folder(path / "train", classes)
        splits = {"train": train}
        for split in ("val", "test"):
            if (path / split).is_dir():
                splits[split] = scan_image_folder(path / split, classes)[0]
        return FewShotData(classes, splits, path, "folder")
    raise FewShotDataError(f"{path}: found no split*.json, train.csv or train/ folder "
                           "(see data/fewshot.py for the layouts)")


def sample_k_shot(samples: Sequence[Sample], shots: int, seed: int, classes: Sequence[str] | None = None,
                  ) -> list[Sample]:
    """Exactly ``shots`` samples of every label present, chosen by ``seed`` (independent of input order)."""
    if shots < 1:
        raise FewShotDataError(f"shots must be >= 1, got {shots}")
    by_label: dict[int, list[Sample]] = {}
    for sample in samples:
        by_label.setdefault(sample.label, []).append(sample)
    rng = np.random.default_rng(seed)
    chosen = []
    for label in sorted(by_label):
        pool = sorted(by_label[label], key=lambda s: str(s.path))
        if len(pool) < shots:
            name = classes[label] if classes is not None else str(label)
            raise FewShotDataError(f"class {name!r} has {len(pool)} training images, fewer than {shots} shots "
                                   f"(e.g. {pool[0].path})")
        chosen.extend(pool[i] for i in sorted(rng.choice(len(pool), size=shots, replace=False)))
    return chosen


def base_novel_classes(classes: Sequence[str]) -> tuple[list[str], list[str]]:
    """CoOp / CoCoOp convention: the first ceil(n/2) labels are base, the rest novel."""
    half = math.ceil(len(classes) / 2)
    return list(classes[:half]), list(classes[half:])


def restrict_classes(data: FewShotData, keep: Sequence[str]) -> FewShotData:
    """Only the samples of ``keep``, relabelled 0..len(keep)-1 in ``keep``'s order."""
    unknown = sorted(set(keep) - set(data.classes))
    if unknown:
        raise FewShotDataError(f"{data.source}: classes {unknown} are not in the dataset ({data.classes})")
    new_label = {data.classes.index(name): i for i, name in enumerate(keep)}
    splits = {name: [Sample(s.path, new_label[s.label]) for s in samples if s.label in new_label]
              for name, samples in data.splits.items()}
    return FewShotData(list(keep), splits, data.source, data.layout, [*data.notes, f"classes {list(keep)}"])


def select_classes(data: FewShotData, which: str) -> FewShotData:
    """``which``: 'all', 'base' or 'novel' (see ``base_novel_classes``)."""
    if which == "all":
        return data
    base, novel = base_novel_classes(data.classes)
    if which not in ("base", "novel"):
        raise FewShotDataError(f"classes must be 'all', 'base' or 'novel', got {which!r}")
    return restrict_classes(data, base if which == "base" else novel)
