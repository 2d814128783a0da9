"""The M3LEO product catalogue: band names in file order, storage types, nodata values, label products.

Mirrors M3LEO's public framework (see ``data/m3leo.py`` for the folder layout and what each product means).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mm.errors import MMTuneError

SEASONS = ("winter", "spring", "summer", "fall")
S1GRD_BANDS = tuple(f"{s}_{p}{d}" for s in SEASONS for p in ("vv", "vh") for d in ("asc", "des"))
GSSIC_BANDS = tuple(f"{s}_coh{days}" for s in SEASONS for days in (12, 24, 36, 48))
GUNW_DATEPAIRS = ("20200212_20200131", "20200519_20200507", "20200904_20200823")
GUNW_BANDS = tuple(f"{pair}_{v}" for pair in GUNW_DATEPAIRS for v in ("unwrappedPhase", "coherence"))
MONTHS = tuple(f"{m:02d}" for m in range(1, 13))
S2RGBM_BANDS = tuple(f"{m}_{c}" for m in MONTHS for c in ("red", "green", "blue"))
S2MSI_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")

#: ESA WorldCover 2020/2021 class codes and names (index in this tuple = position in the presence vector).
WORLDCOVER_CLASSES = (
    (10, "tree cover"), (20, "shrubland"), (30, "grassland"), (40, "cropland"), (50, "built-up"),
    (60, "bare / sparse vegetation"), (70, "snow and ice"), (80, "permanent water bodies"),
    (90, "herbaceous wetland"), (95, "mangroves"), (100, "moss and lichen"),
)
WORLDCOVER_CODES = tuple(code for code, _ in WORLDCOVER_CLASSES)


class M3LEOError(MMTuneError, ValueError):
    """A chip or split file is unreadable or malformed; the message names the file (``path``)."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = str(path), problem


@dataclass(frozen=True)
class Product:
    """One M3LEO product: its folder, band names in file order, storage type, nodata and scaling."""

    name: str
    folder: str  # '{year}' is filled in from the config
    bands: tuple[str, ...]
    dtype: str
    nodata: float | None
    scale: float = 1.0
    sar_power: bool = False  # linear radar power: sar_db applies
    role: Literal["input", "label"] = "input"

    def folder_name(self, year: int) -> str:
        return self.folder.format(year=year)


PRODUCTS: dict[str, Product] = {p.name: p for p in (
    Product("s1grd", "s1grd-{year}", S1GRD_BANDS, "float32", float("nan"), sar_power=True),
    Product("gssic", "gssic-{year}", GSSIC_BANDS, "float32", float("nan")),
    Product("gunw", "gunw-{year}", GUNW_BANDS, "float32", float("nan")),
    Product("s2rgbm", "s2rgbm-{year}", S2RGBM_BANDS, "uint8", None, scale=1 / 255),
    Product("s2msi", "s2msi-{year}", S2MSI_BANDS, "uint16", 0, scale=1e-4),
    Product("esaworldcover", "esaworldcover-{year}", ("map",), "uint8", 0, role="label"),
    Product("ghsbuilts", "ghsbuilts-{year}", ("built_surface",), "float32", float("nan"), role="label"),
    Product("biomass", "biomass-{year}", ("agb", "agb_se"), "float32", float("nan"), role="label"),
    Product("srtmdem", "srtmdem", ("elevation",), "int16", -32768, role="label"),
)}

#: Label name -> the product it is computed from.
LABELS = {"landcover": "esaworldcover", "builtup": "ghsbuilts", "biomass": "biomass", "elevation": "srtmdem"}
#: The scalar regression targets among LABELS.
REGRESSION_LABELS = ("builtup", "biomass", "elevation")
