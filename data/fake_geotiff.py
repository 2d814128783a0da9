"""Rendering of generated M3LEO chips, and their GeoTIFF writer (CRS, transform, nodata, band names).

Each chip gets a land-cover map (warped Voronoi regions of 1-4 ESA WorldCover classes), and every product
is rendered from that map, so the labels follow from the pixels: SAR backscatter (dB), coherence,
interferograms and Sentinel-2 spectra have class signatures plus noise; built-up surface, biomass and
elevation come from the same map. ``data/fake_m3leo.py`` writes whole chips (GeoTIFF and NetCDF) in the
release's layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data.m3leo_products import S1GRD_BANDS, SEASONS, WORLDCOVER_CODES, Product

PIXEL_M = 10.0
CRS = "EPSG:32618"  # UTM 18N, as a CONUS region would use
N_CLASSES = len(WORLDCOVER_CODES)
# Order of WORLDCOVER_CODES: tree, shrub, grass, crop, built, bare, snow, water, wetland, mangrove, moss.
CLASS_WEIGHTS = np.array([6, 3, 4, 5, 3, 2, 1, 3, 1, 1, 1], np.float64)
VV_DB = np.array([-7.5, -10, -12, -11, -4, -15, -13, -21, -13, -8, -16], np.float32)
VH_MINUS_VV = np.array([-5.5, -6.5, -7, -7, -8.5, -8, -6, -5, -6, -5, -7], np.float32)
COHERENCE = np.array([0.25, 0.35, 0.45, 0.4, 0.85, 0.7, 0.3, 0.08, 0.3, 0.2, 0.55], np.float32)
RGB = np.array([[34, 70, 30], [110, 110, 60], [120, 160, 70], [180, 170, 90], [150, 150, 150], [190, 170, 140],
                [240, 240, 245], [20, 40, 90], [60, 100, 90], [30, 80, 50], [140, 140, 110]], np.float32)
# Reflectance of blue, green, red, NIR, SWIR1, SWIR2 per class; the 12 L2A bands interpolate these.
SPECTRA = np.array([
    [.03, .06, .04, .35, .17, .08], [.05, .08, .08, .28, .25, .15], [.04, .09, .06, .38, .22, .12],
    [.05, .10, .07, .42, .24, .13], [.12, .13, .14, .20, .22, .20], [.15, .19, .24, .30, .38, .33],
    [.90, .88, .86, .75, .10, .08], [.06, .05, .03, .02, .01, .01], [.04, .07, .05, .20, .10, .05],
    [.03, .05, .03, .30, .12, .06], [.07, .09, .10, .25, .20, .14]], np.float32)
AGB = np.array([180, 40, 5, 3, 2, 1, 0, 0, 20, 220, 2], np.float32)
ELEVATION = np.array([600, 500, 400, 200, 150, 700, 3200, 20, 30, 5, 1800], np.float32)
VEGETATION = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0], bool)


def smooth_field(rng: np.random.Generator, size: int, cells: int = 4) -> np.ndarray:
    """A smooth random field in about [-1, 1]: coarse noise upsampled bilinearly."""
    coarse = rng.uniform(-1, 1, (cells + 1, cells + 1))
    grid = np.linspace(0, cells, size)
    i0 = np.minimum(grid.astype(int), cells - 1)
    t = grid - i0
    rows = coarse[i0] * (1 - t)[:, None] + coarse[i0 + 1] * t[:, None]
    return rows[:, i0] * (1 - t)[None, :] + rows[:, i0 + 1] * t[None, :]


def landcover_map(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size) class indices: warped Voronoi regions over 1-4 classes drawn by CLASS_WEIGHTS."""
    k = int(rng.integers(1, 5))
    classes = rng.choice(N_CLASSES, size=k, replace=False, p=CLASS_WEIGHTS / CLASS_WEIGHTS.sum())
    seeds = rng.uniform(0, size, (k + int(rng.integers(0, 4)), 2))
    owner = np.concatenate([classes, rng.choice(classes, len(seeds) - k)])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    yy = yy + 0.15 * size * smooth_field(rng, size)
    xx = xx + 0.15 * size * smooth_field(rng, size)
    distance = (yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2
    return owner[distance.argmin(0)]


def render(product: str, lc: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The GeoTIFF product's bands (file dtype, no nodata yet) for land-cover map ``lc``."""
    size = lc.shape[0]
    noise = lambda scale, n=1: rng.normal(0, scale, (n, size, size)).astype(np.float32)  # noqa: E731
    if product == "s1grd":  # seasonal median backscatter in dB, as the release stores it
        bands = []
        for s in range(len(SEASONS)):
            crop_cycle = np.where(lc == 3, 3.0 * np.sin(np.pi * s / 2), 0.0)
            for pol in ("vv", "vh"):
                for direction in ("asc", "des"):
                    db = VV_DB[lc] + crop_cycle + (VH_MINUS_VV[lc] if pol == "vh" else 0)
                    db = db + (0.6 * (lc == 4) if direction == "des" else 0) + noise(0.5)[0]
                    speckle = rng.gamma(16.0, 1 / 16.0, lc.shape)  # a median of many looks: mild speckle
                    bands.append(db + 10 * np.log10(speckle))
        assert len(bands) == len(S1GRD_BANDS)
        return np.stack(bands).astype(np.float32)
    if product == "s2rgbm":
        months = np.arange(12)
        green_up = np.sin(np.pi * months / 11)[:, None, None] * VEGETATION[lc][None] * 25.0
        rgb = RGB[lc].transpose(2, 0, 1)[None] + np.stack([-green_up, green_up, -green_up], 1)
        return np.clip(rgb + rng.normal(0, 6, rgb.shape), 0, 255).reshape(36, size, size).astype(np.uint8)
    if product == "s2srm":
        return (np.clip(s2_reflectance(lc, rng), 0, 1) * 10000).clip(1, 10000).astype(np.uint16)  # 0 is nodata
    if product == "esaworldcover":
        return np.asarray(WORLDCOVER_CODES, np.uint8)[lc][None]
    if product == "ghsbuilts":
        return np.where(lc == 4, rng.uniform(40, 100, lc.shape), 0.0)[None].astype(np.float32)
    if product == "srtmdem":
        dem = ELEVATION[lc] + 80 * smooth_field(rng, size) + noise(5)[0]
        return np.clip(dem, -100, 8000)[None].astype(np.int16)
    raise KeyError(f"no GeoTIFF renderer for product {product!r}")


def s2_reflectance(lc: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(12, H, W) L2A surface reflectance (B1 ... B12 without B10) interpolated from per-class spectra."""
    blue, green, red, nir, swir1, swir2 = SPECTRA[lc].transpose(2, 0, 1)
    bands = [blue * 1.05, blue, green, red, red + (nir - red) * .35, red + (nir - red) * .75, nir * .95, nir,
             nir * 1.02, nir * .3, swir1, swir2]
    return np.stack(bands) * (1 + rng.normal(0, 0.05, (12, *lc.shape)))


def add_nodata(product: Product, bands: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A swath edge of nodata (SAR), a cloud hole (optical) or an unmapped corner (labels)."""
    size = bands.shape[-1]
    if product.name == "s1grd":
        bands[:, :, : max(1, size // 6)] = np.nan
    elif product.name == "s2srm":
        yy, xx = np.mgrid[0:size, 0:size]
        cy, cx = rng.uniform(0, size, 2)
        bands[:, (yy - cy) ** 2 + (xx - cx) ** 2 < (size / 5) ** 2] = product.nodata
    elif product.name == "esaworldcover":
        bands[:, : max(1, size // 8), : max(1, size // 8)] = 0
    return bands


def write_geotiff(path: Path, bands: np.ndarray, product: Product, transform, crs: str = CRS) -> None:
    """One chip: (C, H, W) in the product's dtype, with CRS, transform, nodata and band descriptions."""
    import rasterio

    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "GTiff", "height": bands.shape[1], "width": bands.shape[2], "count": bands.shape[0],
               "dtype": product.dtype, "crs": crs, "transform": transform, "compress": "deflate"}
    if product.nodata is not None:
        profile["nodata"] = product.nodata
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(bands.astype(product.dtype))
        for i, name in enumerate(product.bands[: bands.shape[0]], start=1):
            dst.set_band_description(i, name)
