"""A user's own GeoTIFFs, generated: Landsat-like Collection-2 Level-2 scenes (3 bands, uint16 DN with
reflectance = DN x 2.75e-5 - 0.2, nodata tag 0 on a no-data corner) and label rasters that do not share
the scene grid: a land-cover map in geographic coordinates (EPSG:4326, so it must be reprojected) and a
canopy-height map at another resolution in the scene's CRS. ``shifted_km`` moves a label away, for the
non-overlap error.

    scenes = make_fake_scenes(tmp_path, n_scenes=2, size=96)
    # scenes["inputs"], scenes["landcover"], scenes["canopy"]: lists of paths
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data.fake_geotiff import SPECTRA, landcover_map

SCENE_CRS = "EPSG:32618"
SCENE_PIXEL_M = 30.0
CLASSES = (10, 20, 30, 40)  # tree, shrub, grass, crop codes (ESA WorldCover numbering)
CANOPY_M = np.array([20.0, 3.0, 0.5, 1.0])


def _write(path: Path, bands: np.ndarray, crs: str, transform, nodata: float | None,
           descriptions: list[str] | None = None) -> Path:
    import rasterio

    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "GTiff", "height": bands.shape[1], "width": bands.shape[2], "count": bands.shape[0],
               "dtype": bands.dtype.name, "crs": crs, "transform": transform}
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(bands)
        for i, text in enumerate(descriptions or [], start=1):
            dst.set_band_description(i, text)
    return path


def make_fake_scenes(root: str | Path, n_scenes: int = 2, size: int = 96, seed: int = 0,
                     shifted_km: float = 0.0) -> dict[str, list[Path]]:
    """Scenes and their labels; returns {"inputs": [...], "landcover": [...], "canopy": [...]}."""
    from affine import Affine
    from rasterio.crs import CRS
    from rasterio.transform import array_bounds
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    rng = np.random.default_rng(seed)
    root = Path(root)
    out: dict[str, list[Path]] = {"inputs": [], "landcover": [], "canopy": []}
    for i in range(n_scenes):
        classes = np.asarray(landcover_map(rng, size)) % len(CLASSES)
        transform = Affine(SCENE_PIXEL_M, 0, 400_000 + i * size * SCENE_PIXEL_M, 0, -SCENE_PIXEL_M, 4_400_000)
        red, green, blue = (SPECTRA[classes][..., k] for k in (2, 1, 0))
        reflectance = np.stack([blue, green, red]) * (1 + rng.normal(0, 0.03, (3, size, size)))
        dn = np.clip((reflectance + 0.2) / 2.75e-5, 1, 65535).astype(np.uint16)
        dn[:, : size // 4, : size // 4] = 0  # outside the swath: nodata
        out["inputs"].append(_write(root / "scenes" / f"LC08_scene{i}.tif", dn, SCENE_CRS, transform, 0,
                                    ["SR_B2", "SR_B3", "SR_B4"]))
        label_transform = transform
        if shifted_km:
            label_transform = Affine.translation(shifted_km * 1000, 0) @ transform
        codes = np.asarray(CLASSES, np.uint8)[classes][None]
        dst_crs = CRS.from_epsg(4326)
        left, bottom, right, top = array_bounds(size, size, label_transform)
        geo_transform, w, h = calculate_default_transform(SCENE_CRS, dst_crs, size, size, left, bottom, right, top)
        geo = np.zeros((1, h, w), np.uint8)
        reproject(codes, geo, src_transform=label_transform, src_crs=SCENE_CRS, dst_transform=geo_transform,
                  dst_crs=dst_crs, resampling=Resampling.nearest, src_nodata=0, dst_nodata=0)
        out["landcover"].append(_write(root / "labels" / f"landcover{i}.tif", geo, "EPSG:4326", geo_transform, 0))
        height = (CANOPY_M[classes] * rng.lognormal(0, 0.1, classes.shape)).astype(np.float32)
        coarse = height.reshape(size // 2, 2, size // 2, 2).mean((1, 3))[None]  # 60 m, same CRS
        out["canopy"].append(_write(root / "labels" / f"canopy{i}.tif", coarse, SCENE_CRS,
                                    label_transform @ Affine.scale(2), None))
    return out


if __name__ == "__main__":  # python -m data.fake_scenes runs/fake_scenes
    import sys

    written = make_fake_scenes(sys.argv[1] if len(sys.argv) > 1 else "runs/fake_scenes", size=160)
    print("\n".join(str(p) for paths in written.values() for p in paths))
