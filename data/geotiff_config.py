"""Recipe keys of a user's own GeoTIFF products (``data.source: geotiff``): inputs and labels declared as
files or a glob, bands by 1-based index or by band description, scale / offset / nodata, and a kind.

    geotiff:
      inputs:
        landsat: {files: "scenes/LC08_*.tif", bands: [2, 3, 4], scale: 2.75e-5, offset: -0.2, nodata: 0}
      labels:
        cover: {files: "labels/cover.tif", kind: categorical, classes: [10, 20, 30], target: segmentation}
        canopy: {files: "labels/canopy_height.tif", kind: continuous}
      chip_size: 64
      stride: 64
      max_nodata: 0.5
"""

from __future__ import annotations

import dataclasses
import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mm.config import ConfigError


@dataclass
class RasterProduct:
    files: Any = field(default=None, metadata={"help": "A path, a glob ('scenes/*.tif') or a list of paths."})
    bands: list[Any] | None = field(default=None, metadata={
        "help": "Bands to read: 1-based indices (GDAL order) or band descriptions; null: every band."})
    scale: float = field(default=1.0, metadata={"help": "Physical value = stored * scale + offset "
                                                        "(Landsat C2 L2 reflectance: 2.75e-5, -0.2)."})
    offset: float = field(default=0.0, metadata={"help": "See scale."})
    nodata: float | None = field(default=None, metadata={
        "help": "Nodata value used when the file has no nodata tag (a tag in the file wins); null: none, so "
                "zeros stay valid."})
    kind: Literal["image", "categorical", "continuous"] = field(default="image", metadata={
        "help": "image (an input), categorical (class codes) or continuous (a regression label)."})
    classes: list[int] | None = field(default=None, metadata={
        "help": "categorical: the class codes in class-index order; other codes are ignored pixels."})
    target: Literal["segmentation", "presence"] = field(default="segmentation", metadata={
        "help": "categorical: per-pixel segmentation or a per-chip presence (multi-label) vector."})

    def paths(self, where: str) -> list[Path]:
        """The files, globs expanded and sorted; none found is an error naming the key and pattern."""
        patterns = self.files if isinstance(self.files, list) else [self.files]
        found: list[Path] = []
        for pattern in patterns:
            hits = sorted(glob.glob(str(pattern))) if glob.has_magic(str(pattern)) else [str(pattern)]
            missing = [h for h in hits if not Path(h).is_file()]
            if not hits or missing:
                raise ConfigError(f"data: key '{where}.files': no file matches {missing[0] if missing else pattern!r}")
            found.extend(Path(h) for h in hits)
        return found


def _product(raw: Any, where: str, role: str) -> RasterProduct:
    if not isinstance(raw, dict):
        raise ConfigError(f"data: key {where!r} must be a mapping (files, bands, scale, ...), got {raw!r}")
    known = [f.name for f in dataclasses.fields(RasterProduct)]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"data: unknown key(s) {', '.join(f'{where}.{k}' for k in unknown)}; known: {', '.join(known)}")
    product = RasterProduct(**raw)
    if not product.files or not isinstance(product.files, str | list):
        raise ConfigError(f"data: key '{where}.files' must be a path, a glob or a list of paths")
    for band in product.bands or []:
        if isinstance(band, bool) or not isinstance(band, int | str) or (isinstance(band, int) and band < 1):
            raise ConfigError(f"data: key '{where}.bands' takes 1-based indices or band descriptions, got {band!r}")
    if role == "input" and product.kind != "image":
        raise ConfigError(f"data: key '{where}.kind' must be image for an input, got {product.kind!r}")
    if role == "label" and product.kind == "image":
        raise ConfigError(f"data: key '{where}.kind' must be categorical or continuous for a label")
    if role == "label" and product.bands is not None and len(product.bands) != 1:
        raise ConfigError(f"data: key '{where}.bands' must name one band for a label, got {product.bands!r}")
    if product.kind == "categorical" and not product.classes:
        raise ConfigError(f"data: key '{where}.classes' must list the class codes of a categorical label")
    return product


@dataclass
class GeoTIFFDataConfig:
    inputs: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Input name -> {files, bands, scale, offset, nodata}; the first input's scenes set the chip grid."})
    labels: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Label name -> {files, bands, kind: categorical|continuous, classes, target, nodata, scale, offset}."})
    chip_size: int = field(default=64, metadata={"help": "Chip height and width in pixels of the first input."})
    stride: int | None = field(default=None, metadata={"help": "Step between chips (null: chip_size, no overlap)."})
    max_nodata: float = field(default=0.5, metadata={
        "help": "Drop a chip whose first input has more than this fraction of nodata pixels (counted, logged)."})
    val_fraction: float = field(default=0.2, metadata={"help": "Fraction of chips held out for evaluation."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the train/val assignment of chips."})
    split_by: Literal["chip", "scene"] = field(default="chip", metadata={
        "help": "Hold out random chips, or whole scenes (no neighbouring chips on both sides; needs 2+ scenes)."})
    normalize: bool = field(default=True, metadata={"help": "Standardise each band by train-chip mean/std."})

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError("data: key 'geotiff.inputs' must declare at least one input product")
        if not self.labels:
            raise ConfigError("data: key 'geotiff.labels' must declare at least one label product")
        self.inputs = {k: v if isinstance(v, RasterProduct) else _product(v, f"geotiff.inputs.{k}", "input")
                       for k, v in self.inputs.items()}
        self.labels = {k: v if isinstance(v, RasterProduct) else _product(v, f"geotiff.labels.{k}", "label")
                       for k, v in self.labels.items()}
        if self.chip_size < 4:
            raise ConfigError(f"data: key 'geotiff.chip_size' must be at least 4, got {self.chip_size}")
        if self.stride is not None and self.stride < 1:
            raise ConfigError(f"data: key 'geotiff.stride' must be positive, got {self.stride}")
        if not 0.0 <= self.max_nodata <= 1.0:
            raise ConfigError(f"data: key 'geotiff.max_nodata' must be in [0, 1], got {self.max_nodata}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data: key 'geotiff.val_fraction' must be in (0, 1), got {self.val_fraction}")
