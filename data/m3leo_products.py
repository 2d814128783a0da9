"""The M3LEO product catalogue, as the release stores it (checked against the dataset cards of M3LEO and
M3LEO-miniset and the authors' loaders, spaceml-org/M3LEO ``src/fdlsar/io/io.py`` and
``src/fdlsar/datamodules/components/*.py``; see docs/eo.md for the table and what was verified where).

A product is either a GeoTIFF whose bands have names (file order; the file's band descriptions win when
it has them, as the authors select s2rgbm bands by ``long_name``) or a NetCDF file whose variables are
flattened into named bands: gssic ``coherence(season, deltadays, y, x)`` becomes ``coherence_winter_12``
... ; gunw's ``unwrappedPhase(datepair, y, x)`` is reduced over the date pairs a recipe selects.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mm.errors import MMTuneError

SEASONS = ("winter", "spring", "summer", "fall")
# io.py S1GRD_BANDS: season-major, then polarisation, then orbit direction.
S1GRD_BANDS = tuple(f"{s}_{p}{d}" for s in SEASONS for p in ("vv", "vh") for d in ("asc", "des"))
MONTHS = tuple(f"{m:02d}" for m in range(1, 13))
S2RGBM_BANDS = tuple(f"{m}_{c}" for m in MONTHS for c in ("red", "green", "blue"))
# Harmonized Sentinel-2 L2A surface reflectance (Earth Engine COPERNICUS/S2_SR_HARMONIZED band names, no B10).
S2SRM_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12")
# gssic variables and their non-spatial dimensions (io.py load_gssic docstring).
GSSIC_DIMS = {"season": SEASONS, "deltadays": (12, 24, 36, 48), "polarimetry": ("vv", "vh"),
              "param": ("rho", "tau", "rmse"), "feature": ("inc", "lsmap")}
GSSIC_VARIABLES = {"coherence": ("season", "deltadays"), "amplitude": ("season", "polarimetry"),
                   "decaymodel": ("season", "param"), "geometry": ("feature",)}
GSSIC_BANDS = tuple(
    "_".join([var, *map(str, combo)])
    for var, dims in GSSIC_VARIABLES.items()
    for combo in itertools.product(*(GSSIC_DIMS[d] for d in dims)))
GUNW_GROUP = "science/grids/data"  # io.py load_gunw: open_dataset(..., group="/science/grids/data")
GUNW_VARIABLES = ("unwrappedPhase", "coherence")

#: ESA WorldCover 2020/2021 class codes and names (index in this tuple = class index / presence position).
WORLDCOVER_CLASSES = (
    (10, "tree cover"), (20, "shrubland"), (30, "grassland"), (40, "cropland"), (50, "built-up"),
    (60, "bare / sparse vegetation"), (70, "snow and ice"), (80, "permanent water bodies"),
    (90, "herbaceous wetland"), (95, "mangroves"), (100, "moss and lichen"),
)
WORLDCOVER_CODES = tuple(code for code, _ in WORLDCOVER_CLASSES)
#: Short names for metric keys (iou_tree, iou_water, ...), in the same order.
WORLDCOVER_SHORT = ("tree", "shrub", "grass", "crop", "built", "bare", "snow", "water", "wetland", "mangrove", "moss")


class M3LEOError(MMTuneError, ValueError):
    """A chip, split file or NetCDF variable is unreadable or malformed; the message names the file (``path``)."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = str(path), problem


@dataclass(frozen=True)
class Product:
    """One M3LEO product: folder, file format, band names (file order), storage type, nodata, scaling, units."""

    name: str
    folder: str  # '{year}' / '{period}' are filled in from the config
    fmt: Literal["tif", "nc"]
    bands: tuple[str, ...]
    dtype: str
    nodata: float | None
    units: str
    scale: float = 1.0
    role: Literal["input", "label"] = "input"
    variables: tuple[str, ...] = field(default=())  # NetCDF data variables read
    group: str | None = None  # NetCDF group holding them

    def folder_names(self, year: int, period: str) -> list[str]:
        """Candidate folder names; gunw is ``gunw-{period}`` on the M3LEO card, ``gunw_{period}`` in the miniset."""
        name = self.folder.format(year=year, period=period)
        return [name, name.replace("gunw-", "gunw_")] if self.name == "gunw" else [name]


PRODUCTS: dict[str, Product] = {p.name: p for p in (
    # s1grd: io.load_s1grd casts to int16 and only subtracts a mean: the stored values are decibels already.
    Product("s1grd", "s1grd-{year}", "tif", S1GRD_BANDS, "float32", float("nan"), "dB"),
    Product("gssic", "gssic", "nc", GSSIC_BANDS, "float32", float("nan"), "coherence 0-1, amplitude dB",
            variables=tuple(GSSIC_VARIABLES)),
    Product("gunw", "gunw-{period}", "nc", GUNW_VARIABLES, "float32", float("nan"), "rad (phase), 0-1 (coherence)",
            variables=GUNW_VARIABLES, group=GUNW_GROUP),
    Product("s2rgbm", "s2rgbm-{year}", "tif", S2RGBM_BANDS, "uint8", None, "0-1 (DN / 255)", scale=1 / 255),
    Product("s2srm", "s2srm-{year}", "tif", S2SRM_BANDS, "uint16", 0, "reflectance (DN x 1e-4)", scale=1e-4),
    Product("esaworldcover", "esaworldcover-{year}", "tif", ("map",), "uint8", 0, "class code", role="label"),
    Product("ghsbuilts", "ghsbuilts-{year}", "tif", ("built_surface",), "float32", float("nan"),
            "m2 built per 10 m pixel", role="label"),
    Product("biomass", "biomass-{year}", "nc", ("agb", "agb_se"), "float32", float("nan"), "Mg/ha",
            role="label", variables=("agb", "agb_se")),
    Product("srtmdem", "srtmdem", "tif", ("elevation",), "int16", -32768, "m", role="label"),
)}

#: Label name -> the product it is computed from.
LABELS = {"landcover": "esaworldcover", "builtup": "ghsbuilts", "biomass": "biomass", "elevation": "srtmdem"}
#: The scalar regression targets among LABELS.
REGRESSION_LABELS = ("builtup", "biomass", "elevation")
