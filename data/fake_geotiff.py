"""Generated M3LEO-style chips: real GeoTIFFs (CRS, transform, nodata, band names) in M3LEO's layout.

Each chip gets a land-cover map (warped Voronoi regions of 1-4 ESA WorldCover classes), and every product
is rendered from that map, so the labels follow from the pixels: SAR backscatter, coherence, interferograms
and Sentinel-2 spectra have class signatures plus noise; built-up surface, biomass and elevation come from
the same map. Some chips get a nodata swath (SAR), cloud holes (optical) or decorrelated water (NaN phase).

    split_file = make_fake_m3leo(tmp_path, n_chips=12, size=16)
    M3LEODataset(M3LEODataConfig(split_file=str(split_file), modalities={"s1grd": None}))
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.m3leo import (
    GSSIC_BANDS,
    GUNW_DATEPAIRS,
    PRODUCTS,
    S1GRD_BANDS,
    SEASONS,
    WORLDCOVER_CODES,
    M3LEODataConfig,
    Product,
)

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
    """The product's bands (file dtype, nodata filled) for land-cover map ``lc``."""
    size = lc.shape[0]
    noise = lambda scale, n=1: rng.normal(0, scale, (n, size, size)).astype(np.float32)  # noqa: E731
    if product == "s1grd":
        bands = []
        for s in range(len(SEASONS)):
            crop_cycle = np.where(lc == 3, 3.0 * np.sin(np.pi * s / 2), 0.0)
            for pol in ("vv", "vh"):
                for direction in ("asc", "des"):
                    db = VV_DB[lc] + crop_cycle + (VH_MINUS_VV[lc] if pol == "vh" else 0)
                    db = db + (0.6 * (lc == 4) if direction == "des" else 0) + noise(0.5)[0]
                    speckle = rng.gamma(4.0, 1 / 4.0, lc.shape)  # 4-look intensity speckle
                    bands.append(10 ** (db / 10) * speckle)
        assert len(bands) == len(S1GRD_BANDS)
        return np.stack(bands).astype(np.float32)
    if product == "gssic":
        days = np.array([int(b.split("coh")[1]) for b in GSSIC_BANDS], np.float32)
        tau = np.where(np.isin(lc, [4, 5]), 120.0, 30.0)
        coh = COHERENCE[lc][None] * np.exp(-(days[:, None, None] - 12) / tau[None]) + noise(0.03, len(days))
        return np.clip(coh, 0, 1).astype(np.float32)
    if product == "gunw":
        bands = []
        for _ in GUNW_DATEPAIRS:
            coh = np.clip(COHERENCE[lc] + noise(0.05)[0], 0, 1)
            phase = 3.0 * smooth_field(rng, size) + noise(1.0)[0] * (1 - coh)
            phase[lc == 7] = np.nan  # water decorrelates: no unwrapped phase
            bands += [phase, coh]
        return np.stack(bands).astype(np.float32)
    if product == "s2rgbm":
        months = np.arange(12)
        green_up = np.sin(np.pi * months / 11)[:, None, None] * VEGETATION[lc][None] * 25.0
        rgb = RGB[lc].transpose(2, 0, 1)[None] + np.stack([-green_up, green_up, -green_up], 1)
        return np.clip(rgb + rng.normal(0, 6, rgb.shape), 0, 255).reshape(36, size, size).astype(np.uint8)
    if product == "s2msi":
        blue, green, red, nir, swir1, swir2 = SPECTRA[lc].transpose(2, 0, 1)
        bands = [blue * 1.05, blue, green, red, red + (nir - red) * .35, red + (nir - red) * .75, nir * .95, nir,
                 nir * 1.02, nir * .3, swir1, swir2]
        refl = np.stack(bands) * (1 + noise(0.05, 12))
        return np.clip(refl * 10000, 1, 10000).astype(np.uint16)  # 0 is nodata
    if product == "esaworldcover":
        return np.asarray(WORLDCOVER_CODES, np.uint8)[lc][None]
    if product == "ghsbuilts":
        return np.where(lc == 4, rng.uniform(40, 100, lc.shape), 0.0)[None].astype(np.float32)
    if product == "biomass":
        agb = AGB[lc] * rng.lognormal(0, 0.2, lc.shape)
        return np.stack([agb, 0.25 * agb + 5]).astype(np.float32)
    if product == "srtmdem":
        dem = ELEVATION[lc] + 80 * smooth_field(rng, size) + noise(5)[0]
        return np.clip(dem, -100, 8000)[None].astype(np.int16)
    raise KeyError(f"no renderer for product {product!r}")


def add_nodata(product: Product, bands: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A swath edge of nodata (SAR), a cloud hole (optical) or an unmapped corner (labels)."""
    size = bands.shape[-1]
    if product.name in ("s1grd", "gssic"):
        bands[:, :, : max(1, size // 6)] = np.nan
    elif product.name in ("s2msi", "s2rgbm") and product.nodata is not None:
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


def make_fake_m3leo(root: str | Path, n_chips: int = 24, size: int = 32, region: str = "conus",
                    seed: int = 0, products: list[str] | None = None, nodata_fraction: float = 0.25,
                    year: int = 2020, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> Path:
    """Write ``n_chips`` chips of every product (or ``products``) and a 60-20-20 split CSV; returns its path."""
    from affine import Affine

    rng = np.random.default_rng(seed)
    region_dir = Path(root) / region
    name = f"{region}_partitions_aschips_fake{seed}"
    split_file = region_dir / f"{name}_splits_{'-'.join(str(round(f * 100)) for f in fractions)}.csv"
    order = rng.permutation(n_chips)
    n_train, n_val = int(round(fractions[0] * n_chips)), int(round(fractions[1] * n_chips))
    split_of = {int(c): "train" if r < n_train else "val" if r < n_train + n_val else "test"
                for r, c in enumerate(order)}
    per_row = int(np.ceil(np.sqrt(n_chips)))
    rows = []
    for chip in range(n_chips):
        identifier = f"{region}_{chip:05d}"
        lc = landcover_map(rng, size)
        origin_x = 500_000 + (chip % per_row) * size * PIXEL_M
        origin_y = 4_500_000 - (chip // per_row) * size * PIXEL_M
        transform = Affine(PIXEL_M, 0.0, origin_x, 0.0, -PIXEL_M, origin_y)  # north-up, 10 m pixels
        holes = rng.random() < nodata_fraction
        for product_name in products or list(PRODUCTS):
            product = PRODUCTS[product_name]
            bands = render(product_name, lc, rng)
            if holes:
                bands = add_nodata(product, bands, rng)
            write_geotiff(region_dir / name / product.folder_name(year) / f"{identifier}.tif", bands, product,
                          transform)
        rows.append({"identifier": identifier, "split": split_of[chip]})
    region_dir.mkdir(parents=True, exist_ok=True)
    with open(split_file, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["identifier", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return split_file


@dataclass
class EODataConfig(M3LEODataConfig):
    fake_root: str = field(default="", metadata={"help": "Folder for generated chips (used when split_file "
                                                         "is empty or missing and fake_chips > 0)."})
    fake_chips: int = field(default=0, metadata={"help": "Generated chips to write if there is no split file."})
    fake_size: int = field(default=32, metadata={"help": "Generated chip size in pixels."})
    fake_seed: int = field(default=0, metadata={"help": "Seed of the generated chips."})


def ensure_chips(data: EODataConfig) -> M3LEODataConfig:
    """The M3LEO config to read; generates fake chips first when asked and none exist."""
    import dataclasses

    split_file = data.split_file
    if data.fake_chips > 0 and (not split_file or not Path(split_file).is_file()):
        root = Path(data.fake_root or "runs/fake_m3leo")
        existing = sorted(root.glob(f"*/*_fake{data.fake_seed}_splits_*.csv"))
        split_file = str(existing[0]) if existing else str(
            make_fake_m3leo(root, n_chips=data.fake_chips, size=data.fake_size, seed=data.fake_seed))
    values = {f.name: getattr(data, f.name) for f in dataclasses.fields(M3LEODataConfig)}
    values["split_file"] = split_file
    return M3LEODataConfig(**values)
