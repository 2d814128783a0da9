"""One M3LEO product of one chip -> a ``Raster``: GeoTIFF bands chosen by name, NetCDF variables flattened
into named bands (gssic), gunw date pairs chosen by their time span and reduced, biomass ``agb``/``agb_se``.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from data.m3leo_products import M3LEOError, Product
from data.raster import (
    Raster,
    geotiff_band_names,
    netcdf_georef,
    netcdf_variable,
    open_geotiff,
    open_netcdf,
    physical,
    read_geotiff,
    valid_mask,
)


@dataclass(frozen=True)
class GunwSelection:
    """Which interferograms of a gunw file to use: pairs spanning ``min_days``-``max_days`` days, then the
    shortest, the longest, or the mean of them all (the authors' io.load_gunw_extended filters the same way)."""

    min_days: int = 0
    max_days: int = 9999
    rule: Literal["mean", "shortest", "longest"] = "mean"


def match_bands(available: list[str] | tuple[str, ...], patterns: list[str] | None, where: str) -> list[int]:
    """Indices of the bands ``patterns`` (fnmatch) name, in pattern order; each must match one band at least."""
    if patterns is None:
        return list(range(len(available)))
    chosen: list[int] = []
    for pattern in patterns:
        hits = [i for i, band in enumerate(available) if fnmatch.fnmatchcase(band, pattern)]
        if not hits:
            shown = ", ".join(available[:12]) + (", ..." if len(available) > 12 else "")
            raise M3LEOError(where, f"band {pattern!r} matches no band; bands: {shown}")
        chosen.extend(i for i in hits if i not in chosen)
    return chosen


def read_product(path: Path, product: Product, patterns: list[str] | None,
                 gunw: GunwSelection | None = None, header_only: bool = False) -> Raster:
    """The bands ``patterns`` select (all when None) of ``product`` in physical units. ``header_only``
    checks the file (bands, variables, date pairs, georeference) without reading pixels: the Raster then
    has zero channels but the right grid, band names, CRS and bounds."""
    if product.fmt == "tif":
        return _read_tif(path, product, patterns, header_only)
    if product.name == "gunw":
        return _read_gunw(path, product, patterns, gunw or GunwSelection(), header_only)
    return _read_nc(path, product, patterns, header_only)


def _header(names: list[str], crs: str | None, transform: tuple[float, ...], height: int, width: int) -> Raster:
    return Raster(np.zeros((0, height, width), np.float32), np.zeros((0, height, width), bool), names, crs, transform)


def _read_tif(path: Path, product: Product, patterns: list[str] | None, header_only: bool) -> Raster:
    with open_geotiff(path, product.name) as src:
        names = geotiff_band_names(src, product.bands)
        if names[0] == "band1" and src.count != len(product.bands):
            raise M3LEOError(path, f"{product.name} chip has {src.count} bands, expected {len(product.bands)} "
                             f"({', '.join(product.bands[:4])}{', ...' if len(product.bands) > 4 else ''})")
        dtype, crs, transform = src.dtypes[0], src.crs.to_string() if src.crs else None, tuple(src.transform)[:6]
        height, width = src.height, src.width
    if product.role == "label" and product.name == "esaworldcover" and np.dtype(dtype).kind not in "iu":
        raise M3LEOError(path, f"{product.name} has dtype {dtype}, expected integer class codes ({product.dtype})")
    index = match_bands(names, patterns, str(path))
    if header_only:
        return _header([names[i] for i in index], crs, transform, height, width)
    return read_geotiff(path, index, [names[i] for i in index], what=product.name, nodata=product.nodata,
                        scale=product.scale)


def _flat_names(var: Any) -> list[str]:
    """Band names ``{variable}_{coord}_{coord}`` of a variable's leading dimensions (coordinates only are read)."""
    lead = var.dims[:-2]
    labels = [[str(v) for v in var[d].values] if d in var.coords else [str(i) for i in range(var.sizes[d])]
              for d in lead]
    return ["_".join([str(var.name), *combo]) for combo in itertools.product(*labels)] if lead else [str(var.name)]


def _read_nc(path: Path, product: Product, patterns: list[str] | None, header_only: bool) -> Raster:
    wanted = [v for v in product.variables
              if patterns is None or any(fnmatch.fnmatchcase(b, p) for p in patterns
                                         for b in product.bands if b == v or b.startswith(f"{v}_"))]
    with open_netcdf(path, product.name, product.group) as ds:
        crs, transform = netcdf_georef(ds, path)
        variables = [netcdf_variable(ds, v, path, product.name) for v in wanted]
        names = [n for var in variables for n in _flat_names(var)]
        index = match_bands(names, patterns, str(path))
        height, width = ds.sizes["y"], ds.sizes["x"]
        if header_only:
            return _header([names[i] for i in index], crs, transform, height, width)
        raw = np.concatenate([np.asarray(v.values).reshape(-1, height, width) for v in variables])[index]
    valid = valid_mask(raw, None)  # NetCDF: _FillValue is decoded to NaN by xarray
    return Raster(physical(raw, valid, product.scale), valid, [names[i] for i in index], crs, transform)


def pair_days(datepair: str, path: Path) -> int:
    """Days spanned by a gunw date pair ``{end}_{start}`` (YYYYMMDD_YYYYMMDD, as io.load_gunw parses it)."""
    try:
        end, start = (dt.datetime.strptime(part, "%Y%m%d") for part in str(datepair).split("_"))
    except ValueError:
        raise M3LEOError(path, f"gunw date pair {datepair!r} is not 'YYYYMMDD_YYYYMMDD' (end_start)") from None
    return (end - start).days


def _read_gunw(path: Path, product: Product, patterns: list[str] | None, select: GunwSelection,
               header_only: bool) -> Raster:
    index = match_bands(list(product.variables), patterns, str(path))
    names = [product.variables[i] for i in index]
    with open_netcdf(path, product.name, product.group) as ds:
        crs, transform = netcdf_georef(ds, path)
        if "datepair" not in ds.coords:
            raise M3LEOError(path, "gunw NetCDF has no 'datepair' coordinate")
        days = np.array([pair_days(p, path) for p in ds["datepair"].values])
        keep = np.flatnonzero((days >= select.min_days) & (days <= select.max_days))
        if keep.size == 0:
            raise M3LEOError(path, f"no gunw date pair spans {select.min_days}-{select.max_days} days "
                             f"(pairs span {sorted(days.tolist())} days)")
        if select.rule != "mean":
            keep = keep[[int(np.argmin(days[keep]) if select.rule == "shortest" else np.argmax(days[keep]))]]
        variables = [netcdf_variable(ds, n, path, product.name) for n in names]
        if header_only:
            return _header(names, crs, transform, ds.sizes["y"], ds.sizes["x"])
        stacks = [np.asarray(v.values, np.float64)[keep] for v in variables]
    raw = np.stack([_nanmean(s) for s in stacks])
    valid = valid_mask(raw, None)
    return Raster(physical(raw, valid), valid, names, crs, transform)


def _nanmean(stack: np.ndarray) -> np.ndarray:
    """Mean over pairs ignoring NaN; NaN where every pair is NaN (no warning)."""
    count = np.isfinite(stack).sum(0)
    total = np.where(np.isfinite(stack), stack, 0.0).sum(0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)
