"""Any GeoTIFFs, not only M3LEO: declared products (``data/geotiff_config.py``), windowed chipping of large
scenes, labels aligned to the scene grid by CRS and bounds, dict samples with ``crs``/``transform``/``bounds``.

- Chips: windows of ``chip_size`` every ``stride`` pixels over each scene of the first input. A chip whose
  first input has more than ``max_nodata`` invalid pixels, or whose labels have no valid pixel, is dropped;
  ``dropped`` counts the reasons and they are logged.
- Alignment (as torchgeo does): every other input and every label is read through a ``WarpedVRT`` onto the
  scene's grid when its CRS, transform or size differ (nearest for categorical labels, bilinear otherwise),
  from whichever of its files overlaps the scene most. A product none of whose files overlaps a scene is an
  error naming the files and the scene.
- Nodata: the rule of ``data/raster.py`` (the file's tag, else the declared ``nodata``, else only NaN).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data.band_stats import BandStats, merge_moments
from data.geotiff_config import GeoTIFFDataConfig, RasterProduct
from data.m3leo_products import M3LEOError
from data.raster import Raster, open_geotiff, physical, valid_mask

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Grid:
    """A scene's pixel grid: the frame every other product is warped onto."""

    path: Path
    crs: Any
    transform: Any
    width: int
    height: int

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        from rasterio.transform import array_bounds

        return array_bounds(self.height, self.width, self.transform)  # (left, bottom, right, top)


@dataclass(frozen=True)
class Target:
    """What the task learns from a label key: ``segmentation`` / ``presence`` over ``classes``, or ``regression``."""

    key: str
    kind: str
    classes: int = 1
    names: tuple[str, ...] = ()  # class names for per-class metrics (default: the class index)


def band_index(src: Any, bands: list[Any] | None, path: Path, where: str) -> tuple[list[int], list[str]]:
    """0-based indices and names of declared bands (1-based indices or descriptions) in an open file."""
    names = [d or f"band{i + 1}" for i, d in enumerate(src.descriptions or [None] * src.count)]
    if bands is None:
        return list(range(src.count)), names
    out = []
    for band in bands:
        if isinstance(band, int):
            if not 1 <= band <= src.count:
                raise M3LEOError(path, f"{where}: band index {band} out of range; the file has {src.count} "
                                 f"band(s), 1-{src.count}")
            out.append(band - 1)
        elif band in names:
            out.append(names.index(band))
        else:
            raise M3LEOError(path, f"{where}: no band described {band!r}; descriptions: {names}")
    return out, [names[i] for i in out]


def _overlap_area(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _bounds_in(src: Any, crs: Any) -> tuple[float, float, float, float]:
    from rasterio.warp import transform_bounds

    if src.crs is None or crs is None or src.crs == crs:
        return tuple(src.bounds)
    return transform_bounds(src.crs, crs, *src.bounds)


class AlignedReader:
    """Reads one declared product on a scene's grid (warped when the grids differ)."""

    def __init__(self, product: RasterProduct, paths: list[Path], grid: Grid, where: str) -> None:
        self.product, self.grid, self.where = product, grid, where
        overlaps = []
        for path in paths:
            with open_geotiff(path, where) as src:
                overlaps.append(_overlap_area(_bounds_in(src, grid.crs), grid.bounds))
        if max(overlaps) <= 0:
            raise M3LEOError(paths[0], f"{where}: no file of {[str(p) for p in paths][:3]} overlaps scene "
                             f"{grid.path} (bounds {tuple(round(v) for v in grid.bounds)} in {grid.crs})")
        self.path = paths[int(np.argmax(overlaps))]
        with open_geotiff(self.path, where) as src:
            self.index, self.names = band_index(src, product.bands, self.path, where)
            self.dtype = np.dtype(src.dtypes[0])
            self.tag = src.nodata
            self.same_grid = (src.crs == grid.crs and src.transform == grid.transform
                              and (src.width, src.height) == (grid.width, grid.height))
        if product.kind == "categorical" and self.dtype.kind not in "iu":
            raise M3LEOError(self.path, f"{where}: dtype {self.dtype}; a categorical label needs integer class codes")

    def read(self, window: Any) -> Raster:
        import rasterio
        from rasterio.enums import Resampling
        from rasterio.vrt import WarpedVRT

        nodata = self.tag if self.tag is not None else self.product.nodata
        outside = None
        with rasterio.open(self.path) as src:
            if self.same_grid:
                raw = src.read([i + 1 for i in self.index], window=window)
            else:
                resampling = Resampling.nearest if self.product.kind == "categorical" else Resampling.bilinear
                # Without a nodata value the footprint comes from an alpha band, so genuine zeros stay valid.
                extra = {"src_nodata": nodata, "nodata": nodata} if nodata is not None else {"add_alpha": True}
                with WarpedVRT(src, crs=self.grid.crs, transform=self.grid.transform, width=self.grid.width,
                               height=self.grid.height, resampling=resampling, **extra) as vrt:
                    raw = vrt.read([i + 1 for i in self.index], window=window)
                    if nodata is None:  # the alpha band (the last) is 0 beyond the source's footprint
                        outside = vrt.read(vrt.count, window=window) == 0
        valid = valid_mask(raw, nodata)
        if outside is not None:
            valid &= ~outside[None]
        values = physical(raw, valid, self.product.scale, self.product.offset)
        return Raster(values, valid, self.names, str(self.grid.crs), tuple(self.grid.transform)[:6])


class GeoTIFFChips:
    """Chips of a user's GeoTIFF scenes, split into train and val: ``dataset(split)`` -> a sample sequence."""

    def __init__(self, config: GeoTIFFDataConfig) -> None:
        import rasterio

        self.config = config
        first_name = next(iter(config.inputs))
        self.readers: list[dict[str, AlignedReader]] = []
        self.chips: list[tuple[int, Any]] = []
        self.dropped: Counter[str] = Counter()
        size, stride = config.chip_size, config.stride or config.chip_size
        paths = {name: p.paths(f"geotiff.inputs.{name}") for name, p in config.inputs.items()}
        label_paths = {name: p.paths(f"geotiff.labels.{name}") for name, p in config.labels.items()}
        for scene in paths[first_name]:
            with open_geotiff(scene, first_name) as src:
                grid = Grid(scene, src.crs, src.transform, src.width, src.height)
            readers = {n: AlignedReader(p, paths[n] if n != first_name else [scene], grid, f"geotiff.inputs.{n}")
                       for n, p in config.inputs.items()}
            readers.update({f"label:{n}": AlignedReader(p, label_paths[n], grid, f"geotiff.labels.{n}")
                            for n, p in config.labels.items()})
            self.readers.append(readers)
            if grid.width < size or grid.height < size:
                self.dropped["scene smaller than a chip"] += 1
                continue
            for row in range(0, grid.height - size + 1, stride):
                for col in range(0, grid.width - size + 1, stride):
                    window = rasterio.windows.Window(col, row, size, size)
                    reason = self._drop_reason(readers, first_name, window)
                    if reason:
                        self.dropped[reason] += 1
                    else:
                        self.chips.append((len(self.readers) - 1, window))
        if not self.chips:
            raise M3LEOError(paths[first_name][0], f"every chip was dropped: {dict(self.dropped)} (chip_size "
                             f"{size}, max_nodata {config.max_nodata})")
        total = len(self.chips) + sum(self.dropped.values())
        for reason, count in self.dropped.items():
            log.warning("geotiff chips: dropped %d of %d (%s)", count, total, reason)
        self.split_index = self._split(len(paths[first_name]))
        if not self.split_index["train"]:
            raise M3LEOError(paths[first_name][0], f"only {len(self.chips)} chip(s) in {len(paths[first_name])} "
                             f"scene(s): none left for training (split_by {config.split_by})")
        self.targets = [Target(f"{n}_map" if p.target == "segmentation" else n, p.target, len(p.classes or []),
                               tuple(str(c) for c in p.classes or [])) if p.kind == "categorical"
                        else Target(n, "regression") for n, p in config.labels.items()]
        self.band_names = {n: r.names for n, r in self.readers[0].items() if not n.startswith("label:")}
        for readers in self.readers[1:]:
            for name, bands in self.band_names.items():
                if len(readers[name].names) != len(bands):
                    raise M3LEOError(readers[name].path, f"geotiff.inputs.{name}: {len(readers[name].names)} bands "
                                     f"where {self.readers[0][name].path} gives {len(bands)}; declare the bands")
        self.stats = self._statistics() if config.normalize else {}

    def _split(self, n_scenes: int) -> dict[str, list[int]]:
        """Chip indices of train and val: random chips, or (split_by: scene) every chip of held-out scenes."""
        rng = np.random.default_rng(self.config.split_seed)
        if self.config.split_by == "scene":
            if n_scenes < 2:
                raise M3LEOError(self.readers[0][next(iter(self.readers[0]))].grid.path,
                                 "split_by: scene needs 2 or more scenes (this is the only one); use split_by: chip")
            held = set(rng.permutation(n_scenes)[: max(1, round(self.config.val_fraction * n_scenes))].tolist())
            val = [i for i, (scene, _) in enumerate(self.chips) if scene in held and n_scenes > 1]
        else:
            n_val = max(1, int(round(self.config.val_fraction * len(self.chips)))) if len(self.chips) > 1 else 0
            val = rng.permutation(len(self.chips))[:n_val].tolist()
        return {"val": sorted(val), "train": sorted(set(range(len(self.chips))) - set(val))}

    def _drop_reason(self, readers: dict[str, AlignedReader], first: str, window: Any) -> str:
        raster = readers[first].read(window)
        if 1.0 - raster.valid.mean() > self.config.max_nodata:
            return f"more than {self.config.max_nodata:.0%} nodata"
        for name, reader in readers.items():
            if name.startswith("label:") and not reader.read(window).valid.any():
                return f"label {name[6:]} all nodata"
        return ""

    def _statistics(self) -> dict[str, BandStats]:
        acc = {n: np.zeros((len(b), 3), np.float64) for n, b in self.band_names.items()}
        for i in self.split_index["train"]:
            scene, window = self.chips[i]
            for name in acc:
                raster = self.readers[scene][name].read(window)
                merge_moments(acc[name], raster.values, raster.valid)
        out = {}
        for name, a in acc.items():
            std = np.sqrt(a[:, 2] / np.maximum(a[:, 0], 1.0))
            out[name] = BandStats(name, self.band_names[name], a[:, 1].tolist(),
                                  np.where(std > 0, std, 1.0).tolist(), a[:, 0].tolist(), len(self.split_index["train"]))
        return out

    def sample(self, i: int) -> dict[str, Any]:
        import torch

        from data.m3leo import georef

        scene, window = self.chips[i]
        readers = self.readers[scene]
        sample: dict[str, Any] = {"id": f"{readers[next(iter(readers))].grid.path.name}:{window.row_off}:{window.col_off}"}
        for name in self.config.inputs:
            raster = readers[name].read(window)
            values = raster.values
            if name in self.stats:
                mean, std = self.stats[name].arrays()
                values = np.where(raster.valid, (values - mean) / std, 0.0).astype(np.float32)
            sample[name], sample[f"{name}_mask"] = torch.from_numpy(values), torch.from_numpy(raster.valid)
            if "crs" not in sample:
                import rasterio

                grid = readers[name].grid
                raster.transform = tuple(rasterio.windows.transform(window, grid.transform))[:6]
                sample.update(georef(raster))
        for name, product in self.config.labels.items():
            sample.update(_label(name, product, readers[f"label:{name}"].read(window)))
        return sample

    def labels(self, i: int) -> dict[str, Any]:
        """The label entries of chip ``i`` alone (no input is read)."""
        scene, window = self.chips[i]
        out: dict[str, Any] = {}
        for name, product in self.config.labels.items():
            out.update(_label(name, product, self.readers[scene][f"label:{name}"].read(window)))
        return out

    def dataset(self, split: str) -> ChipSplit:
        return ChipSplit(self, self.split_index[split])


def _label(name: str, product: RasterProduct, raster: Raster) -> dict[str, Any]:
    import torch

    values, valid = raster.values[0], raster.valid[0]
    if product.kind == "continuous":
        ok = bool(valid.any())
        return {name: torch.tensor(float(values[valid].mean()) if ok else 0.0), f"{name}_valid": torch.tensor(ok)}
    classes = np.full(values.shape, -1, np.int64)
    for k, code in enumerate(product.classes or []):
        classes[valid & (values == code)] = k
    mapped = classes[classes >= 0]
    ok = mapped.size > 0
    presence = np.bincount(mapped, minlength=len(product.classes or [])) > 0
    return {f"{name}_map": torch.from_numpy(classes), f"{name}_map_valid": torch.tensor(ok),
            name: torch.from_numpy(presence.astype(np.float32)), f"{name}_valid": torch.tensor(ok)}


class ChipSplit:
    """One split of a ``GeoTIFFChips``: a sequence of dict samples."""

    def __init__(self, chips: GeoTIFFChips, index: list[int]) -> None:
        self.chips, self.index = chips, index
        self.band_names, self.targets, self.dropped = chips.band_names, chips.targets, chips.dropped

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.chips.sample(self.index[i])

    def labels(self, i: int) -> dict[str, Any]:
        return self.chips.labels(self.index[i])
