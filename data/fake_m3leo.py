"""A generated M3LEO miniset in the release's own formats: GeoTIFF products (s1grd, s2rgbm, s2srm,
esaworldcover, ghsbuilts, srtmdem) and NetCDF products (gssic with coherence / amplitude / decaymodel /
geometry on a coarser grid, gunw with a variable number of date pairs in group ``/science/grids/data``,
biomass with ``agb`` and ``agb_se``), a split CSV, and the folder layout the authors' loaders expect.

    split_file = make_fake_m3leo(tmp_path, n_chips=12, size=16)
    M3LEODataset(M3LEODataConfig(split_file=str(split_file), modalities={"s1grd": None}))
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.fake_geotiff import (
    AGB,
    COHERENCE,
    CRS,
    PIXEL_M,
    VV_DB,
    add_nodata,
    landcover_map,
    render,
    smooth_field,
    write_geotiff,
)
from data.m3leo import M3LEODataConfig
from data.m3leo_products import GSSIC_DIMS, PRODUCTS, SEASONS, M3LEOError
from mm.config import ConfigError

#: The release's gssic and gunw grids are 90 m against 10 m; the fake coarsens by 4 so tiny chips keep cells.
COARSE = 4


def _coords(transform: tuple[float, ...], height: int, width: int) -> dict[str, np.ndarray]:
    a, _, c, _, e, f = transform
    return {"x": c + a * (np.arange(width) + 0.5), "y": f + e * (np.arange(height) + 0.5)}


def write_netcdf(path: Path, variables: dict[str, tuple[tuple[str, ...], np.ndarray]], transform: tuple[float, ...],
                 coords: dict[str, list] | None = None, group: str | None = None, crs: str = CRS) -> None:
    """A CF-style NetCDF-4 file: data variables over (..., y, x), x/y cell centres, a ``spatial_ref`` CRS."""
    import xarray as xr
    from rasterio.crs import CRS as RioCRS

    height, width = next(iter(variables.values()))[1].shape[-2:]
    ds = xr.Dataset({name: (dims, data) for name, (dims, data) in variables.items()},
                    coords={**_coords(transform, height, width), **(coords or {})})
    ds["spatial_ref"] = xr.DataArray(0, attrs={"crs_wkt": RioCRS.from_user_input(crs).to_wkt()})
    for name in variables:
        ds[name].attrs["grid_mapping"] = "spatial_ref"
        if ds[name].dtype.kind == "f":
            ds[name].encoding["_FillValue"] = np.float32(np.nan)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_netcdf(path, engine="netcdf4", group=group, mode="w")


def _gssic(lc: np.ndarray, rng: np.random.Generator) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
    size = lc.shape[0]
    days = np.array(GSSIC_DIMS["deltadays"], np.float32)
    tau = np.where(np.isin(lc, [4, 5]), 120.0, 30.0)
    season_factor = np.array([0.8, 1.0, 0.9, 0.85], np.float32)[:, None, None, None]
    coh = COHERENCE[lc][None, None] * season_factor * np.exp(-(days[None, :, None, None] - 12) / tau[None, None])
    coh = np.clip(coh + rng.normal(0, 0.03, coh.shape), 0, 1).astype(np.float32)
    amp = np.stack([np.stack([VV_DB[lc], VV_DB[lc] - 6]) for _ in SEASONS]) + rng.normal(0, 0.5, (4, 2, size, size))
    rho = COHERENCE[lc][None] + rng.normal(0, 0.02, (4, size, size))
    decay = np.stack([rho, np.broadcast_to(tau, rho.shape), np.abs(rng.normal(0.05, 0.01, rho.shape))], 1)
    geometry = np.stack([35 + 5 * smooth_field(rng, size), np.zeros((size, size))])
    return {"coherence": (("season", "deltadays", "y", "x"), coh),
            "amplitude": (("season", "polarimetry", "y", "x"), amp.astype(np.float32)),
            "decaymodel": (("season", "param", "y", "x"), decay.astype(np.float32)),
            "geometry": (("feature", "y", "x"), geometry.astype(np.float32))}


def _gunw(lc: np.ndarray, rng: np.random.Generator, period: str) -> tuple[dict, dict]:
    """1-4 interferograms whose date pairs ``{end}_{start}`` fall in ``period``, phase NaN on water."""
    first = dt.date.fromisoformat(period.split("_")[0])
    pairs, phases, cohs = [], [], []
    for _ in range(int(rng.integers(1, 5))):
        start = first + dt.timedelta(days=int(rng.integers(0, 30)))
        end = start + dt.timedelta(days=12 * int(rng.integers(1, 5)))
        pairs.append(f"{end:%Y%m%d}_{start:%Y%m%d}")
        coh = np.clip(COHERENCE[lc] + rng.normal(0, 0.05, lc.shape), 0, 1)
        phase = 3.0 * smooth_field(rng, lc.shape[0]) + rng.normal(0, 1.0, lc.shape) * (1 - coh)
        phase[lc == 7] = np.nan  # water decorrelates: no unwrapped phase
        phases.append(phase)
        cohs.append(coh)
    variables = {"unwrappedPhase": (("datepair", "y", "x"), np.stack(phases).astype(np.float32)),
                 "coherence": (("datepair", "y", "x"), np.stack(cohs).astype(np.float32))}
    return variables, {"datepair": pairs}


def _biomass(lc: np.ndarray, rng: np.random.Generator, holes: bool) -> dict:
    agb = (AGB[lc] * rng.lognormal(0, 0.2, lc.shape)).astype(np.float32)
    if holes:
        agb[: max(1, lc.shape[0] // 8)] = np.nan
    return {"agb": (("y", "x"), agb), "agb_se": (("y", "x"), (0.25 * agb + 5).astype(np.float32))}


def write_chip(folder: Path, identifier: str, products: list[str], lc: np.ndarray, origin: tuple[float, float],
               rng: np.random.Generator, holes: bool, year: int, period: str) -> None:
    """Every product of one chip, in its release format, under ``folder`` (the dataset folder)."""
    from affine import Affine

    fine = Affine(PIXEL_M, 0.0, origin[0], 0.0, -PIXEL_M, origin[1])  # north-up, 10 m pixels
    coarse = Affine(PIXEL_M * COARSE, 0.0, origin[0], 0.0, -PIXEL_M * COARSE, origin[1])
    lc_coarse = lc[COARSE // 2::COARSE, COARSE // 2::COARSE]
    for name in products:
        product = PRODUCTS[name]
        path = folder / product.folder_names(year, period)[0] / f"{identifier}.{product.fmt}"
        if name == "gssic":
            write_netcdf(path, _gssic(lc_coarse, rng), tuple(coarse)[:6], {
                "season": list(SEASONS), "deltadays": list(GSSIC_DIMS["deltadays"]),
                "polarimetry": list(GSSIC_DIMS["polarimetry"]), "param": list(GSSIC_DIMS["param"]),
                "feature": list(GSSIC_DIMS["feature"])})
        elif name == "gunw":
            variables, coords = _gunw(lc_coarse, rng, period)
            write_netcdf(path, variables, tuple(coarse)[:6], coords, group=product.group)
        elif name == "biomass":
            write_netcdf(path, _biomass(lc, rng, holes), tuple(fine)[:6])
        else:
            bands = render(name, lc, rng)
            write_geotiff(path, add_nodata(product, bands, rng) if holes else bands, product, fine)


def make_fake_m3leo(root: str | Path, n_chips: int = 24, size: int = 32, region: str = "conus",
                    seed: int = 0, products: list[str] | None = None, nodata_fraction: float = 0.25,
                    year: int = 2020, period: str = "2020-01-01_2020-03-31",
                    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> Path:
    """Write ``n_chips`` chips of every product (or ``products``) and a 60-20-20 split CSV; returns its path."""
    rng = np.random.default_rng(seed)
    region_dir = Path(root) / region
    name = f"{region}_partitions_aschips_fake{seed}n{n_chips}s{size}"  # a differently sized miniset is not reused
    split_file = region_dir / f"{name}_splits_60bands_angle09_{'-'.join(str(round(f * 100)) for f in fractions)}.csv"
    order = rng.permutation(n_chips)
    n_train, n_val = int(round(fractions[0] * n_chips)), int(round(fractions[1] * n_chips))
    split_of = {int(c): "train" if r < n_train else "val" if r < n_train + n_val else "test"
                for r, c in enumerate(order)}
    per_row = int(np.ceil(np.sqrt(n_chips)))
    rows = []
    for chip in range(n_chips):
        origin = (500_000 + (chip % per_row) * size * PIXEL_M, 4_500_000 - (chip // per_row) * size * PIXEL_M)
        identifier = hashlib.sha1(f"{region}:{origin}".encode()).hexdigest()[:13]  # the release: a location hash
        write_chip(region_dir / name, identifier, products or list(PRODUCTS), landcover_map(rng, size), origin,
                   rng, rng.random() < nodata_fraction, year, period)
        rows.append({"identifier": identifier, "split": split_of[chip]})
    region_dir.mkdir(parents=True, exist_ok=True)
    with open(split_file, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["identifier", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return split_file


@dataclass
class EODataConfig(M3LEODataConfig):
    synthetic: bool = field(default=False, metadata={
        "help": "Generate a fake miniset (real formats) under fake_root and train on it. Only this key makes "
                "generated data; a split_file that does not exist is an error, never a reason to generate."})
    fake_root: str = field(default="runs/fake_m3leo", metadata={"help": "Folder of the generated miniset."})
    fake_chips: int = field(default=120, metadata={"help": "Generated chips (synthetic: true)."})
    fake_size: int = field(default=32, metadata={"help": "Generated chip size in pixels."})
    fake_seed: int = field(default=0, metadata={"help": "Seed of the generated chips."})

    def validate(self) -> None:
        super().validate()
        if self.synthetic and (self.split_file or self.more_split_files):
            raise ConfigError("data: keys 'split_file' and 'synthetic: true' both given; train on the split file "
                              "(synthetic: false) or on generated chips, not a guess between them")


def ensure_chips(data: EODataConfig) -> M3LEODataConfig:
    """The M3LEO config to read: the recipe's split file, or (``synthetic: true``) a generated miniset."""
    split_file = data.split_file
    if data.synthetic:
        root = Path(data.fake_root)
        pattern = f"*/*_fake{data.fake_seed}n{data.fake_chips}s{data.fake_size}_splits_60bands_*.csv"
        existing = sorted(root.glob(pattern))
        split_file = str(existing[0]) if existing else str(make_fake_m3leo(
            root, n_chips=data.fake_chips, size=data.fake_size, seed=data.fake_seed, year=data.year,
            period=data.gunw_period))
    elif not split_file:
        raise M3LEOError("data.split_file", "is empty; give the M3LEO split CSV (or data.synthetic: true)")
    elif not Path(split_file).is_file():
        raise M3LEOError(split_file, "split file not found (data.split_file); generated chips are used only "
                         "with data.synthetic: true")
    values = {f.name: getattr(data, f.name) for f in dataclasses.fields(M3LEODataConfig)}
    values["split_file"] = split_file
    return M3LEODataConfig(**values)
