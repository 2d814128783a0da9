"""Reading rasters, GeoTIFF (rasterio) or NetCDF (xarray + netCDF4), into one shape: a ``Raster`` of named
bands in physical units with a validity mask, a CRS, an affine transform and bounds.

The nodata rule (the same for M3LEO and for a user's GeoTIFFs): a pixel is invalid when it is NaN or
infinite, or equals the file's nodata tag; when the file has no tag, the value the product declares
(``nodata`` in the catalogue or the recipe) takes its place; when neither exists nothing else is masked,
so genuine zeros stay valid. Invalid pixels become 0 in ``values`` and False in ``valid``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data.m3leo_products import M3LEOError


@dataclass
class Raster:
    values: np.ndarray  # (C, H, W) float32, physical units, 0 where invalid
    valid: np.ndarray  # (C, H, W) bool
    bands: list[str]
    crs: str | None  # WKT or "EPSG:n"; None when the file states none
    transform: tuple[float, ...]  # affine (a, b, c, d, e, f): x = a*col + b*row + c, y = d*col + e*row + f

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) of a north-up grid."""
        a, _, c, _, e, f = self.transform
        h, w = self.values.shape[-2:]
        xs, ys = (c, c + a * w), (f, f + e * h)
        return min(xs), min(ys), max(xs), max(ys)


def valid_mask(raw: np.ndarray, nodata: float | None) -> np.ndarray:
    """Finite and not the nodata value (a NaN nodata adds nothing to the finiteness test)."""
    valid = np.isfinite(raw) if raw.dtype.kind == "f" else np.ones(raw.shape, bool)
    if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
        valid &= raw != np.asarray(nodata).astype(raw.dtype)
    return valid


def physical(raw: np.ndarray, valid: np.ndarray, scale: float = 1.0, offset: float = 0.0) -> np.ndarray:
    """``raw * scale + offset`` where valid, 0 elsewhere, float32 (no NaN can leave here)."""
    out = raw.astype(np.float64) * scale + offset
    return np.where(valid, out, 0.0).astype(np.float32)


def geotiff_band_names(src: Any, fallback: tuple[str, ...] | None = None) -> list[str]:
    """The file's band descriptions when every band has one, else ``fallback`` (or ``band1`` ...)."""
    described = list(src.descriptions or ())
    if described and all(described):
        return described
    if fallback is not None and len(fallback) == src.count:
        return list(fallback)
    return [f"band{i}" for i in range(1, src.count + 1)]


def open_geotiff(path: str | Path, what: str) -> Any:
    import rasterio

    if not Path(path).is_file():
        raise M3LEOError(path, f"{what} file not found")
    try:
        return rasterio.open(path)
    except Exception as err:  # rasterio raises RasterioIOError and others for bad files
        raise M3LEOError(path, f"unreadable {what} GeoTIFF ({err})") from None


def read_geotiff(path: str | Path, index: list[int], names: list[str], *, what: str, nodata: float | None = None,
                 scale: float = 1.0, offset: float = 0.0, window: Any = None) -> Raster:
    """Bands ``index`` (0-based) of a GeoTIFF, or one ``window`` of them, as a Raster."""
    with open_geotiff(path, what) as src:
        out_of_range = [i for i in index if not 0 <= i < src.count]
        if out_of_range:
            raise M3LEOError(path, f"{what}: band index {out_of_range[0]} out of range; the file has {src.count} "
                             f"bands (0-{src.count - 1})")
        try:
            raw = src.read([i + 1 for i in index], window=window)
        except Exception as err:
            raise M3LEOError(path, f"cannot read {what} bands ({err})") from None
        tag = src.nodata
        transform = src.window_transform(window) if window is not None else src.transform
        crs = src.crs.to_string() if src.crs else None
    valid = valid_mask(raw, tag if tag is not None else nodata)
    return Raster(physical(raw, valid, scale, offset), valid, names, crs, tuple(transform)[:6])


# ---------------------------------------------------------------------------- NetCDF


def open_netcdf(path: str | Path, what: str, group: str | None = None) -> Any:
    import xarray as xr

    if not Path(path).is_file():
        raise M3LEOError(path, f"{what} file not found")
    try:
        return xr.open_dataset(path, engine="netcdf4", group=group, mask_and_scale=True)
    except OSError as err:
        if group is not None and "group" in str(err).lower():
            raise M3LEOError(path, f"{what} NetCDF has no group '/{group}'") from None
        raise M3LEOError(path, f"unreadable {what} NetCDF ({err})") from None
    except Exception as err:  # xarray raises ValueError/KeyError for files it cannot decode
        raise M3LEOError(path, f"unreadable {what} NetCDF ({err})") from None


def netcdf_variable(ds: Any, name: str, path: str | Path, what: str) -> Any:
    if name not in ds.data_vars:
        raise M3LEOError(path, f"{what} NetCDF has no variable {name!r} (has: {', '.join(map(str, ds.data_vars))})")
    var = ds[name]
    if var.dtype.kind not in "fiu":
        raise M3LEOError(path, f"{what} variable {name!r} has dtype {var.dtype}, expected a number type")
    if var.dims[-2:] != ("y", "x"):
        raise M3LEOError(path, f"{what} variable {name!r} has dims {var.dims}, expected (..., y, x)")
    return var


def netcdf_georef(ds: Any, path: str | Path) -> tuple[str | None, tuple[float, ...]]:
    """CRS (CF ``spatial_ref``/``crs_wkt``) and the affine transform of the cell centres in ``x``/``y``."""
    if "x" not in ds.coords or "y" not in ds.coords or ds.sizes["x"] < 2 or ds.sizes["y"] < 2:
        raise M3LEOError(path, "NetCDF needs 1-D 'x' and 'y' coordinates (cell centres) of 2 or more cells")
    x, y = ds["x"].values.astype(np.float64), ds["y"].values.astype(np.float64)
    dx, dy = float(x[1] - x[0]), float(y[1] - y[0])
    crs = None
    for name in ("spatial_ref", "crs"):
        if name in ds.variables:
            crs = ds[name].attrs.get("crs_wkt") or ds[name].attrs.get("spatial_ref")
            break
    return crs, (dx, 0.0, float(x[0]) - dx / 2, 0.0, dy, float(y[0]) - dy / 2)


def resize_masked(values: np.ndarray, valid: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(C, H, W) values and mask resampled to (C, size, size): an antialiased bilinear mean of the valid
    pixels only (invalid zeros do not bleed in); a pixel is valid where over half its support was."""
    import torch
    import torch.nn.functional as F

    mask = torch.from_numpy(valid).float()[None]
    weighted = torch.from_numpy(values * valid)[None]
    kwargs = {"size": (size, size), "mode": "bilinear", "align_corners": False, "antialias": True}
    num, den = F.interpolate(weighted, **kwargs)[0], F.interpolate(mask, **kwargs)[0]
    out = torch.where(den > 1e-3, num / den.clamp_min(1e-3), torch.zeros(()))
    keep = den > 0.5
    return torch.where(keep, out, torch.zeros(())).numpy().astype(np.float32), keep.numpy()
