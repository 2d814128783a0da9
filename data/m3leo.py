"""M3LEO-style Earth-observation chips (GeoTIFF, read with rasterio) as dict samples.

Layout, as in M3LEO's public framework: a split CSV ``<root>/<region>/<name>_splits....csv`` with columns
``identifier, split`` names the chips; each product lives in the folder the CSV's name leads to
(``<root>/<region>/<name>/<product folder>/<identifier>.tif``). Products and band order mirror M3LEO:

- ``s1grd``: Sentinel-1 GRD seasonal composites, 16 bands ``{season}_{vv|vh}{asc|des}`` (linear power here;
  ``sar_db`` converts to decibels).
- ``gssic``: seasonal interferometric coherence ``{season}_coh{12|24|36|48}`` (repeat interval in days).
- ``gunw``: interferograms, ``{end}_{start}_{unwrappedPhase|coherence}`` per date pair.
- ``s2rgbm``: monthly Sentinel-2 RGB ``{month}_{red|green|blue}`` (uint8, scaled by 1/255 as M3LEO does).
- ``s2msi``: Sentinel-2 L2A multispectral ``B01 ... B12`` (reflectance x 10,000; nodata 0). M3LEO v2 adds
  multispectral data; the folder name ``s2msi-<year>`` is this project's.
- labels: ``esaworldcover`` (ESA WorldCover codes 10 ... 100, nodata 0) -> an 11-class presence vector;
  ``ghsbuilts`` (GHS-BUILT-S built-up m2 per 10 m pixel) -> built-up fraction; ``biomass`` (ESA CCI AGB,
  bands ``agb, agb_se``, Mg/ha) -> mean AGB; ``srtmdem`` (metres) -> mean elevation.

Nodata values and NaNs become a boolean mask (``<modality>_mask``) and a 0 in the normalised tensor, so no
NaN reaches a loss. Per-band mean/std come from one streaming pass over the training split and are cached
in a JSON file. A chip whose file is unreadable, has the wrong band count or a CRS that differs from the
chip's other modalities is an ``M3LEOError`` naming the file, or is skipped and counted (``on_error: skip``).
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from data.m3leo_products import (  # noqa: F401  (re-exported: callers import them from data.m3leo)
    GSSIC_BANDS,
    GUNW_BANDS,
    GUNW_DATEPAIRS,
    LABELS,
    MONTHS,
    PRODUCTS,
    REGRESSION_LABELS,
    S1GRD_BANDS,
    S2MSI_BANDS,
    S2RGBM_BANDS,
    SEASONS,
    WORLDCOVER_CLASSES,
    WORLDCOVER_CODES,
    M3LEOError,
    Product,
)
from mm.config import ConfigError


@dataclass
class M3LEODataConfig:
    """Where the chips are and what a sample holds."""

    split_file: str = field(default="", metadata={"help": "M3LEO split CSV (columns identifier, split); the "
                                                          "product folders sit beside it (see data/m3leo.py)."})
    year: int = field(default=2020, metadata={"help": "Product year in the folder names (s1grd-2020, ...)."})
    modalities: dict[str, Any] = field(
        default_factory=lambda: {"s1grd": None},
        metadata={"help": "Input product -> band names or fnmatch patterns ('*_vvasc'); null takes all bands."})
    labels: list[str] = field(default_factory=lambda: ["landcover"],
                              metadata={"help": "Targets: landcover, builtup, biomass, elevation."})
    sar_db: bool = field(default=True, metadata={"help": "Convert linear SAR power (s1grd) to decibels."})
    normalize: bool = field(default=True, metadata={"help": "Standardise each band by train-split mean/std."})
    stats_dir: str | None = field(default=None, metadata={"help": "Cache folder of normalisation statistics "
                                                                  "(default: .stats beside the split CSV)."})
    on_error: Literal["raise", "skip"] = field(
        default="raise", metadata={"help": "A bad chip (unreadable, wrong band count, CRS mismatch): raise an "
                                           "error naming the file, or skip the chip and count it."})
    presence_threshold: float = field(
        default=0.01, metadata={"help": "A land-cover class is present when it covers at least this fraction "
                                        "of the chip's valid pixels."})

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
            select_bands(PRODUCTS[name], bands)
        for label in self.labels:
            if label not in LABELS:
                raise ConfigError(f"data: key 'labels' has unknown label {label!r}; known: {', '.join(LABELS)}")
        if not 0.0 <= self.presence_threshold < 1.0:
            raise ConfigError(f"data: key 'presence_threshold' must be in [0, 1), got {self.presence_threshold}")


def select_bands(product: Product, patterns: list[str] | None) -> list[int]:
    """Indices (file order) of the bands ``patterns`` names; each pattern must match at least one band."""
    if patterns is None:
        return list(range(len(product.bands)))
    chosen: list[int] = []
    for pattern in patterns:
        hits = [i for i, band in enumerate(product.bands) if fnmatch.fnmatchcase(band, pattern)]
        if not hits:
            raise ConfigError(f"data: band {pattern!r} matches no band of {product.name}; "
                              f"bands: {', '.join(product.bands)}")
        chosen.extend(i for i in hits if i not in chosen)
    return chosen


# ---------------------------------------------------------------------------- layout


def dataset_folder(split_file: str | Path) -> Path:
    """M3LEO's rule: the product folders live under the split CSV's path up to ``_splits``."""
    split_file = Path(split_file)
    stem = split_file.name.split("_splits")[0]
    if stem == split_file.name:
        raise M3LEOError(split_file, "a split file's name must contain '_splits' (M3LEO layout)")
    return split_file.parent / stem


def chip_path(split_file: str | Path, product: str, identifier: str, year: int = 2020) -> Path:
    return dataset_folder(split_file) / PRODUCTS[product].folder_name(year) / f"{identifier}.tif"


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


# ---------------------------------------------------------------------------- reading chips


def _open_checked(path: Path, product: Product) -> Any:
    import rasterio

    try:
        src = rasterio.open(path)
    except Exception as err:  # rasterio raises RasterioIOError and others for bad files
        raise M3LEOError(path, f"unreadable {product.name} chip ({err})") from None
    if src.count != len(product.bands):
        src.close()
        raise M3LEOError(path, f"{product.name} chip has {src.count} bands, expected {len(product.bands)} "
                         f"({', '.join(product.bands[:4])}{', ...' if len(product.bands) > 4 else ''})")
    return src


def read_chip(path: Path, product: Product, band_index: list[int]) -> tuple[np.ndarray, np.ndarray, Any]:
    """(values float32 (C, H, W) in physical units, valid mask (C, H, W), CRS) of the chosen bands."""
    src = _open_checked(path, product)
    with src:
        try:
            raw = src.read([i + 1 for i in band_index])
        except Exception as err:
            raise M3LEOError(path, f"cannot read {product.name} bands ({err})") from None
        crs = src.crs
        nodata = src.nodata if src.nodata is not None else product.nodata
    values = raw.astype(np.float32)
    valid = np.isfinite(values)
    if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
        valid &= raw != nodata
    values = np.where(valid, values * np.float32(product.scale), np.float32(0.0))
    return values, valid, crs


def to_db(values: np.ndarray, valid: np.ndarray, floor: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """10 log10 of linear power; non-positive power is invalid (masked), not -inf."""
    valid = valid & (values > 0)
    return np.where(valid, 10.0 * np.log10(np.maximum(values, floor)), 0.0).astype(np.float32), valid


def landcover_presence(codes: np.ndarray, valid: np.ndarray, threshold: float) -> tuple[np.ndarray, bool]:
    """Multi-hot (11,) of WorldCover classes covering >= ``threshold`` of the valid pixels; False if none valid."""
    n_valid = int(valid.sum())
    if n_valid == 0:
        return np.zeros(len(WORLDCOVER_CODES), np.float32), False
    fractions = np.array([((codes == c) & valid).sum() / n_valid for c in WORLDCOVER_CODES])
    present = (fractions > 0) & (fractions >= threshold)
    return present.astype(np.float32), True


def dominant_landcover(codes: np.ndarray, valid: np.ndarray) -> int:
    """Index (into WORLDCOVER_CODES) of the class covering most valid pixels; -1 when none are valid."""
    counts = [int(((codes == c) & valid).sum()) for c in WORLDCOVER_CODES]
    return int(np.argmax(counts)) if max(counts) > 0 else -1


# ---------------------------------------------------------------------------- normalisation statistics


def _merge_moments(acc: np.ndarray, values: np.ndarray, valid: np.ndarray) -> None:
    """Fold one chip into per-band (count, mean, M2) rows of ``acc`` (Chan et al.'s pairwise update)."""
    for b in range(values.shape[0]):
        x = values[b][valid[b]].astype(np.float64)
        if x.size == 0:
            continue
        n_a, mean_a, m2_a = acc[b]
        n_b, mean_b = float(x.size), float(x.mean())
        m2_b = float(((x - mean_b) ** 2).sum())
        n = n_a + n_b
        delta = mean_b - mean_a
        acc[b] = (n, mean_a + delta * n_b / n, m2_a + m2_b + delta * delta * n_a * n_b / n)


@dataclass
class BandStats:
    product: str
    bands: list[str]
    mean: list[float]
    std: list[float]
    count: list[float]
    chips: int

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.mean, np.float32)[:, None, None], np.asarray(self.std, np.float32)[:, None, None]


# ---------------------------------------------------------------------------- the dataset


class M3LEODataset:
    """Dict samples of one split: ``{"id", <modality>: (C, H, W), <modality>_mask, <label>, <label>_valid}``.

    ``landcover`` is an (11,) multi-hot of ESA WorldCover classes (``landcover_dominant``: the majority
    class index); ``builtup`` (fraction), ``biomass`` (Mg/ha) and ``elevation`` (m) are scalars.
    ``skipped`` maps each skipped chip file to the reason (``on_error: skip``).
    """

    def __init__(self, config: M3LEODataConfig, split: str = "train") -> None:
        self.config, self.split = config, split
        self.band_index = {name: select_bands(PRODUCTS[name], pats) for name, pats in config.modalities.items()}
        self.label_products = list(dict.fromkeys(LABELS[label] for label in config.labels))
        self.skipped: dict[str, str] = {}
        self.ids = self._usable(read_split(config.split_file, split))
        if not self.ids:
            raise M3LEOError(config.split_file, f"every chip of split {split!r} was skipped: "
                             f"{_preview(self.skipped)}")
        self.stats = self._statistics() if config.normalize else {}

    def __len__(self) -> int:
        return len(self.ids)

    def path(self, product: str, identifier: str) -> Path:
        return chip_path(self.config.split_file, product, identifier, self.config.year)

    def _usable(self, ids: list[str]) -> list[str]:
        """The chips whose every file opens with the right band count and one shared CRS."""
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
        first: tuple[Path, Any] | None = None
        for product in [*self.band_index, *self.label_products]:
            path = self.path(product, identifier)
            with _open_checked(path, PRODUCTS[product]) as src:
                crs = src.crs
            if first is None:
                first = (path, crs)
            elif crs != first[1]:
                raise M3LEOError(path, f"CRS {crs} differs from {first[1]} of {first[0]} (same chip, other "
                                 f"modality)")

    def _read_input(self, product: str, identifier: str) -> tuple[np.ndarray, np.ndarray]:
        spec = PRODUCTS[product]
        values, valid, _ = read_chip(self.path(product, identifier), spec, self.band_index[product])
        if spec.sar_power and self.config.sar_db:
            values, valid = to_db(values, valid)
        return values, valid

    def _statistics(self) -> dict[str, BandStats]:
        """Per-band mean/std of the training split, computed once by streaming and cached as JSON."""
        train = self if self.split == "train" else M3LEODataset(_replace(self.config, normalize=False), "train")
        folder = Path(self.config.stats_dir) if self.config.stats_dir else Path(self.config.split_file).parent / ".stats"
        out = {}
        for product, index in self.band_index.items():
            bands = [PRODUCTS[product].bands[i] for i in index]
            key = json.dumps({"product": product, "bands": bands, "db": self.config.sar_db and PRODUCTS[product].sar_power,
                              "split_file": str(Path(self.config.split_file).resolve()), "year": self.config.year,
                              "chips": train.ids}, sort_keys=True)
            path = folder / f"{product}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
            if path.is_file():
                out[product] = BandStats(**json.loads(path.read_text()))
                continue
            acc = np.zeros((len(index), 3), np.float64)
            for identifier in train.ids:
                _merge_moments(acc, *train._read_input(product, identifier))
            std = np.sqrt(acc[:, 2] / np.maximum(acc[:, 0], 1.0))
            stats = BandStats(product, bands, acc[:, 1].tolist(), np.where(std > 0, std, 1.0).tolist(),
                              acc[:, 0].tolist(), len(train.ids))
            _write_json(path, asdict(stats))
            out[product] = stats
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        identifier = self.ids[i]
        sample: dict[str, Any] = {"id": identifier}
        for product in self.band_index:
            values, valid = self._read_input(product, identifier)
            if product in self.stats:
                mean, std = self.stats[product].arrays()
                values = np.where(valid, (values - mean) / std, 0.0).astype(np.float32)
            sample[product] = torch.from_numpy(values)
            sample[f"{product}_mask"] = torch.from_numpy(valid)
        for label in self.config.labels:
            sample.update(self._label(label, identifier))
        return sample

    def _label(self, label: str, identifier: str) -> dict[str, Any]:
        import torch

        spec = PRODUCTS[LABELS[label]]
        values, valid, _ = read_chip(self.path(spec.name, identifier), spec, [0])
        values, valid = values[0], valid[0]
        if label == "landcover":
            present, ok = landcover_presence(values, valid, self.config.presence_threshold)
            return {"landcover": torch.from_numpy(present), "landcover_valid": torch.tensor(ok),
                    "landcover_dominant": dominant_landcover(values, valid)}
        ok = bool(valid.any())
        mean = float(values[valid].mean()) if ok else 0.0
        if label == "builtup":
            mean /= 100.0  # GHS-BUILT-S: built-up m2 in a 10 m (100 m2) pixel
        return {label: torch.tensor(mean, dtype=torch.float32), f"{label}_valid": torch.tensor(ok)}


def _replace(config: M3LEODataConfig, **changes: Any) -> M3LEODataConfig:
    values = asdict(config)
    values.update(changes)
    return M3LEODataConfig(**values)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from mm.state import atomic_write

    def write(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(data, indent=1))

    atomic_write(path, write)


def _preview(skipped: dict[str, str], limit: int = 3) -> str:
    items = [f"{path} ({reason})" for path, reason in list(skipped.items())[:limit]]
    return "; ".join(items) + (f"; and {len(skipped) - limit} more" if len(skipped) > limit else "")
