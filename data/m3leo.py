"""The M3LEO release (and M3LEO-miniset) as dict samples: GeoTIFF and NetCDF products of each chip.

Layout, as in the release and the authors' ``BaseDataset``: a split CSV
``<root>/<region>/<region>_partitions_aschips_<hash>_splits_....csv`` with columns ``identifier, split``
names the chips; each product lives in the folder the CSV's name leads to, i.e. everything before
``_splits`` (``<root>/<region>/<region>_partitions_aschips_<hash>/<product folder>/<identifier>.<tif|nc>``).
The products, their formats, bands/variables, units and normalisation are in ``data/m3leo_products.py``
and docs/eo.md.

Labels: ``landcover`` (an 11-class ESA WorldCover presence vector), ``landcover_map`` (per-pixel class
index 0-10, -1 where unmapped: the M3LEO segmentation baseline), ``builtup`` (fraction), ``biomass``
(ESA CCI AGB, Mg/ha, NetCDF variable ``agb``) and ``elevation`` (SRTM, m) as chip means.

Nodata and NaN become a boolean mask (``<modality>_mask``) and a 0 in the normalised tensor (the rule is in
``data/raster.py``), so no NaN reaches a loss. Per-band mean/std come from one streaming pass over the
training split, cached as JSON. A chip whose file is missing or malformed, or whose products do not share
overlapping bounds (compared in one CRS), is an ``M3LEOError`` naming the file, or is skipped and counted
(``on_error: skip``). Samples carry ``crs``, ``transform`` and ``bounds`` of their first modality.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from data.band_stats import BandStats, merge_moments, write_json
from data.m3leo_io import GunwSelection, match_bands, read_product
from data.m3leo_products import (  # noqa: F401  (re-exported: callers import them from data.m3leo)
    GSSIC_BANDS,
    LABELS,
    MONTHS,
    PRODUCTS,
    REGRESSION_LABELS,
    S1GRD_BANDS,
    S2RGBM_BANDS,
    S2SRM_BANDS,
    SEASONS,
    WORLDCOVER_CLASSES,
    WORLDCOVER_CODES,
    M3LEOError,
    Product,
)
from data.raster import Raster, resize_masked
from mm.config import ConfigError

LABELS = {**LABELS, "landcover_map": "esaworldcover"}


@dataclass
class M3LEODataConfig:
    """Where the chips are and what a sample holds."""

    split_file: str = field(default="", metadata={"help": "M3LEO split CSV (columns identifier, split); the "
                                                          "product folders sit beside it (see data/m3leo.py)."})
    more_split_files: list[str] = field(default_factory=list, metadata={
        "help": "Split CSVs of further regions trained together (the authors' baselines use five); one "
                "normalisation over all their training chips."})
    year: int = field(default=2020, metadata={"help": "Product year in the folder names (s1grd-2020, ...)."})
    gunw_period: str = field(default="2020-01-01_2020-03-31", metadata={
        "help": "The gunw folder's period: gunw-<period> (M3LEO) or gunw_<period> (miniset)."})
    gunw_min_days: int = field(default=0, metadata={"help": "gunw: shortest date-pair span used (days)."})
    gunw_max_days: int = field(default=9999, metadata={"help": "gunw: longest date-pair span used (days)."})
    gunw_rule: Literal["mean", "shortest", "longest"] = field(
        default="mean", metadata={"help": "gunw: mean of the selected pairs, or the shortest / longest one."})
    modalities: dict[str, Any] = field(
        default_factory=lambda: {"s1grd": None},
        metadata={"help": "Input product -> band names or fnmatch patterns ('*_vvasc'); null takes all bands."})
    labels: list[str] = field(default_factory=lambda: ["landcover"], metadata={
        "help": "Targets: landcover (presence), landcover_map (segmentation), builtup, biomass, elevation."})
    sar_db: bool = field(default=False, metadata={
        "help": "Convert s1grd from linear power to dB. The M3LEO release stores dB already: leave false."})
    normalize: bool = field(default=True, metadata={"help": "Standardise each band by train-split mean/std."})
    stats_dir: str | None = field(default=None, metadata={"help": "Cache folder of normalisation statistics "
                                                                  "(default: .stats beside the split CSV)."})
    on_error: Literal["raise", "skip"] = field(
        default="raise", metadata={"help": "A bad chip (missing or unreadable file, missing variable, bounds "
                                           "that do not overlap): raise an error naming the file, or skip and count."})
    presence_threshold: float = field(
        default=0.01, metadata={"help": "A land-cover class is present when it covers at least this fraction "
                                        "of the chip's valid pixels."})
    resize: dict[str, int] = field(default_factory=dict, metadata={
        "help": "Input product -> chip size in pixels to resample to (e.g. {gssic: 48}: the 90 m grids may differ "
                "by a cell between chips); masked, antialiased bilinear."})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.modalities, dict) or not self.modalities:
            raise ConfigError("data: key 'modalities' must map at least one product to its bands")
        for name, bands in self.modalities.items():
            if name not in PRODUCTS or PRODUCTS[name].role != "input":
                inputs = [p for p, spec in PRODUCTS.items() if spec.role == "input"]
                raise ConfigError(f"data: key 'modalities.{name}' is not an input product; known: {', '.join(inputs)}")
            if bands is not None and not (isinstance(bands, list) and all(isinstance(b, str) for b in bands)):
                raise ConfigError(f"data: key 'modalities.{name}' must be a list of band names or null, got {bands!r}")
            try:
                match_bands(PRODUCTS[name].bands, bands, name)
            except M3LEOError as err:
                raise ConfigError(f"data: key 'modalities.{name}': {err.problem}") from None
        for label in self.labels:
            if label not in LABELS:
                raise ConfigError(f"data: key 'labels' has unknown label {label!r}; known: {', '.join(LABELS)}")
        if not 0.0 <= self.presence_threshold < 1.0:
            raise ConfigError(f"data: key 'presence_threshold' must be in [0, 1), got {self.presence_threshold}")
        unknown = sorted(set(self.resize) - set(self.modalities))
        if unknown or any(not isinstance(v, int) or v < 2 for v in self.resize.values()):
            raise ConfigError(f"data: key 'resize' maps input products to a size >= 2, got {self.resize!r}")
        if self.gunw_min_days > self.gunw_max_days:
            raise ConfigError("data: key 'gunw_min_days' is larger than 'gunw_max_days'")


# ---------------------------------------------------------------------------- layout


def dataset_folder(split_file: str | Path) -> Path:
    """The authors' rule: the product folders live under the split CSV's path up to ``_splits``."""
    split_file = Path(split_file)
    stem = split_file.name.split("_splits")[0]
    if stem == split_file.name:
        raise M3LEOError(split_file, "a split file's name must contain '_splits' (M3LEO layout)")
    return split_file.parent / stem


def chip_path(split_file: str | Path, product: str, identifier: str, year: int = 2020,
              period: str = "2020-01-01_2020-03-31") -> Path:
    """The chip's file; of gunw's two folder spellings, the one that exists (else the first)."""
    spec = PRODUCTS[product]
    folders = [dataset_folder(split_file) / name for name in spec.folder_names(year, period)]
    folder = next((f for f in folders if f.is_dir()), folders[0])
    return folder / f"{identifier}.{spec.fmt}"


def read_split(split_file: str | Path, split: str) -> list[str]:
    """Chip identifiers of ``split`` in file order."""
    path = Path(split_file)
    if not path.is_file():
        raise M3LEOError(path, "split file not found")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"identifier", "split"} <= set(reader.fieldnames):
            raise M3LEOError(path, f"a split CSV needs columns 'identifier' and 'split', has {reader.fieldnames}")
        ids = [row["identifier"] for row in reader if row["split"] == split]
    if not ids:
        raise M3LEOError(path, f"no chips in split {split!r}")
    return ids


# ---------------------------------------------------------------------------- label maths


def to_db(values: np.ndarray, valid: np.ndarray, floor: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """10 log10 of linear power; non-positive power is invalid (masked), not -inf."""
    valid = valid & (values > 0)
    return np.where(valid, 10.0 * np.log10(np.maximum(values, floor)), 0.0).astype(np.float32), valid


def landcover_classes(codes: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(H, W) int64 class index into WORLDCOVER_CODES; -1 where unmapped or not a WorldCover code."""
    index = np.full(codes.shape, -1, np.int64)
    for k, code in enumerate(WORLDCOVER_CODES):
        index[(codes == code) & valid] = k
    return index


def landcover_presence(classes: np.ndarray, threshold: float) -> tuple[np.ndarray, bool]:
    """Multi-hot (11,) of classes covering >= ``threshold`` of the mapped pixels; False if none is mapped."""
    n_valid = int((classes >= 0).sum())
    if n_valid == 0:
        return np.zeros(len(WORLDCOVER_CODES), np.float32), False
    fractions = np.bincount(classes[classes >= 0], minlength=len(WORLDCOVER_CODES)) / n_valid
    return ((fractions > 0) & (fractions >= threshold)).astype(np.float32), True


def dominant_landcover(classes: np.ndarray) -> int:
    """The class index covering most mapped pixels; -1 when none is mapped."""
    counts = np.bincount(classes[classes >= 0], minlength=len(WORLDCOVER_CODES))
    return int(np.argmax(counts)) if counts.max() > 0 else -1


# ---------------------------------------------------------------------------- the dataset


class M3LEODataset:
    """Dict samples of one split: ``{"id", <modality>: (C, H, W), <modality>_mask, <label>, <label>_valid,
    "crs", "transform", "bounds"}``. ``skipped`` maps each skipped chip file to the reason."""

    def __init__(self, config: M3LEODataConfig, split: str = "train") -> None:
        self.config, self.split = config, split
        self.gunw = GunwSelection(config.gunw_min_days, config.gunw_max_days, config.gunw_rule)
        self.label_products = list(dict.fromkeys(LABELS[label] for label in config.labels))
        self.skipped: dict[str, str] = {}
        self.band_names: dict[str, list[str]] = {}
        self.grids: dict[str, tuple[int, ...]] = {}
        self.split_file_of: dict[str, str] = {}
        for split_file in [config.split_file, *config.more_split_files]:
            for identifier in read_split(split_file, split):
                if self.split_file_of.setdefault(identifier, split_file) != split_file:
                    raise M3LEOError(split_file, f"chip {identifier!r} is also in {self.split_file_of[identifier]}")
        self.ids = self._usable(list(self.split_file_of))
        if self.skipped:
            logging.getLogger(__name__).warning("m3leo %s: skipped %d chip(s): %s", split, len(self.skipped),
                                                _preview(self.skipped))
        if not self.ids:
            raise M3LEOError(config.split_file, f"every chip of split {split!r} was skipped: "
                             f"{_preview(self.skipped)}")
        self.band_index = {name: list(range(len(bands))) for name, bands in self.band_names.items()}
        self.stats = self._statistics() if config.normalize else {}

    def __len__(self) -> int:
        return len(self.ids)

    def path(self, product: str, identifier: str) -> Path:
        return chip_path(self.split_file_of[identifier], product, identifier, self.config.year,
                         self.config.gunw_period)

    def read(self, product: str, identifier: str, header_only: bool = False) -> Raster:
        patterns = self.config.modalities.get(product) if product in self.config.modalities else None
        return read_product(self.path(product, identifier), PRODUCTS[product], patterns, self.gunw, header_only)

    def _usable(self, ids: list[str]) -> list[str]:
        keep = []
        for identifier in ids:
            try:
                self._check_chip(identifier)
            except M3LEOError as err:
                if self.config.on_error == "raise":
                    raise
                self.skipped[err.path] = err.problem
                continue
            keep.append(identifier)
        return keep

    def _check_chip(self, identifier: str) -> None:
        """Every product's file opens with the variables, bands and date pairs asked for, the inputs keep their
        band names, and the bounds overlap (in one CRS). Headers only: no pixel is read here."""
        first: tuple[Path, Raster] | None = None
        for product in [*self.config.modalities, *self.label_products]:
            path = self.path(product, identifier)
            raster = self.read(product, identifier, header_only=True)
            if product in self.config.modalities:
                known = self.band_names.setdefault(product, raster.bands)
                if raster.bands != known:
                    raise M3LEOError(path, f"bands {raster.bands[:4]}... differ from {known[:4]}... of other chips")
            grid = self.grids.setdefault(product, raster.values.shape[-2:])
            if raster.values.shape[-2:] != grid and product not in self.config.resize:
                raise M3LEOError(path, f"{product} grid {raster.values.shape[-2:]} differs from {grid} of other "
                                 f"chips; set data.resize.{product} to resample")
            if first is None:
                first = (path, raster)
                continue
            if not _overlap(bounds_in(raster, first[1].crs), first[1].bounds):
                raise M3LEOError(path, f"bounds {_fmt(raster.bounds)} do not overlap {_fmt(first[1].bounds)} of "
                                 f"{first[0]} (same chip, other product)")

    def _read_input(self, product: str, identifier: str) -> Raster:
        raster = self.read(product, identifier)
        if product == "s1grd" and self.config.sar_db:
            raster.values, raster.valid = to_db(raster.values, raster.valid)
        if product in self.config.resize:
            raster.values, raster.valid = resize_masked(raster.values, raster.valid, self.config.resize[product])
        return raster

    def _statistics(self) -> dict[str, BandStats]:
        """Per-band mean/std of the training split, computed once by streaming and cached as JSON."""
        train = self if self.split == "train" else M3LEODataset(_replace(self.config, normalize=False), "train")
        folder = Path(self.config.stats_dir) if self.config.stats_dir else Path(self.config.split_file).parent / ".stats"
        out = {}
        for product, bands in self.band_names.items():
            key = json.dumps({"product": product, "bands": bands, "db": self.config.sar_db, "gunw": asdict(self.gunw),
                              "split_files": [str(Path(f).resolve()) for f in [self.config.split_file,
                                                                               *self.config.more_split_files]],
                              "year": self.config.year, "resize": self.config.resize.get(product),
                              "chips": train.ids}, sort_keys=True)
            path = folder / f"{product}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
            if path.is_file():
                out[product] = BandStats(**json.loads(path.read_text()))
                continue
            acc = np.zeros((len(bands), 3), np.float64)
            for identifier in train.ids:
                raster = train._read_input(product, identifier)
                merge_moments(acc, raster.values, raster.valid)
            std = np.sqrt(acc[:, 2] / np.maximum(acc[:, 0], 1.0))
            stats = BandStats(product, bands, acc[:, 1].tolist(), np.where(std > 0, std, 1.0).tolist(),
                              acc[:, 0].tolist(), len(train.ids))
            write_json(path, asdict(stats))
            out[product] = stats
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        identifier = self.ids[i]
        sample: dict[str, Any] = {"id": identifier}
        for product in self.config.modalities:
            raster = self._read_input(product, identifier)
            values = raster.values
            if product in self.stats:
                mean, std = self.stats[product].arrays()
                values = np.where(raster.valid, (values - mean) / std, 0.0).astype(np.float32)
            sample[product] = torch.from_numpy(values)
            sample[f"{product}_mask"] = torch.from_numpy(raster.valid)
            if "crs" not in sample:
                sample.update(georef(raster))
        for product in self.label_products:
            sample.update(self._labels(product, identifier))
        return sample

    def labels(self, i: int) -> dict[str, Any]:
        """The label entries of sample ``i`` alone (no input is read): fitting target scalings is cheap."""
        out: dict[str, Any] = {}
        for product in self.label_products:
            out.update(self._labels(product, self.ids[i]))
        return out

    def _labels(self, product: str, identifier: str) -> dict[str, Any]:
        import torch

        raster = self.read(product, identifier)
        values, valid = raster.values[0], raster.valid[0]
        out: dict[str, Any] = {}
        if product == "esaworldcover":
            classes = landcover_classes(values, valid)
            present, ok = landcover_presence(classes, self.config.presence_threshold)
            out = {"landcover": torch.from_numpy(present), "landcover_valid": torch.tensor(ok),
                   "landcover_dominant": dominant_landcover(classes), "landcover_map": torch.from_numpy(classes),
                   "landcover_map_valid": torch.tensor(ok)}
            return out
        label = next(name for name, p in LABELS.items() if p == product)
        ok = bool(valid.any())
        mean = float(values[valid].mean()) if ok else 0.0
        if label == "builtup":
            mean /= 100.0  # GHS-BUILT-S: built-up m2 in a 10 m (100 m2) pixel
        return {label: torch.tensor(mean, dtype=torch.float32), f"{label}_valid": torch.tensor(ok)}


# ---------------------------------------------------------------------------- helpers


def georef(raster: Raster) -> dict[str, Any]:
    """``crs`` (string, '' when unknown), ``transform`` (6,) and ``bounds`` (4,) float64 tensors."""
    import torch

    return {"crs": raster.crs or "", "transform": torch.tensor(raster.transform, dtype=torch.float64),
            "bounds": torch.tensor(raster.bounds, dtype=torch.float64)}


def bounds_in(raster: Raster, crs: str | None) -> tuple[float, float, float, float]:
    """The raster's bounds in ``crs`` (unchanged when either CRS is unknown or they are the same)."""
    if not raster.crs or not crs:
        return raster.bounds
    from rasterio.crs import CRS
    from rasterio.warp import transform_bounds

    if CRS.from_user_input(raster.crs) == CRS.from_user_input(crs):
        return raster.bounds
    return transform_bounds(CRS.from_user_input(raster.crs), CRS.from_user_input(crs), *raster.bounds)


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _fmt(bounds: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.0f}" for v in bounds) + ")"


def _replace(config: M3LEODataConfig, **changes: Any) -> M3LEODataConfig:
    values = asdict(config)
    values.update(changes)
    return M3LEODataConfig(**values)


def _preview(skipped: dict[str, str], limit: int = 3) -> str:
    items = [f"{path} ({reason})" for path, reason in list(skipped.items())[:limit]]
    return "; ".join(items) + (f"; and {len(skipped) - limit} more" if len(skipped) > limit else "")
