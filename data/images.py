"""Reading one image file as 8-bit RGB, whatever its bit depth or mode, without clipping.

Pillow opens 16-bit RGB(A) and grey+alpha PNGs as 8-bit modes already scaled (it keeps the high byte), but
it opens 16-bit grey PNGs as ``I;16`` and some formats as ``I`` (32-bit integers) or ``F`` (32-bit floats),
and ``convert("RGB")`` clips those to 0..255 (a 16-bit grey PNG turns white). Here:

- ``I;16*`` and ``I``: 16-bit levels, scaled by 255/65535 (values outside 0..65535 are an error: a 32-bit
  integer image has no agreed white level);
- ``F``: values in [0, 1] are scaled by 255; values in [0, 255] are kept as levels; anything else, or a
  NaN/inf, is an error naming the file and the range found;
- palette images with transparency go through RGBA (so Pillow does not warn), every other mode (1, L, LA,
  P, CMYK, YCbCr, RGBA...) through Pillow's own conversion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mm.errors import MMTuneError

SIXTEEN_BIT_WHITE = 65535.0


class ImageReadError(MMTuneError, ValueError):
    """An image file is missing or cannot be decoded; the message names the file."""


def read_image(path: str | Path) -> Any:
    """The image at ``path`` as an 8-bit RGB ``PIL.Image``, fully decoded; errors name the file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image, path)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: image file not found") from None
    except IsADirectoryError:
        raise ImageReadError(f"{path}: is a folder, not an image file") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        if isinstance(err, ImageReadError):
            raise
        raise ImageReadError(f"{path}: cannot read image ({type(err).__name__}: {err})") from None


def to_rgb(image: Any, path: str | Path = "<image>") -> Any:
    """``image`` (any Pillow mode) as 8-bit RGB, scaled as the module docstring says."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        return _levels_to_rgb(np.asarray(image, dtype=np.float64), SIXTEEN_BIT_WHITE, path, mode)
    if mode == "F":
        levels = np.asarray(image, dtype=np.float64)
        finite = levels[np.isfinite(levels)]
        white = 1.0 if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0 else 255.0
        return _levels_to_rgb(levels, white, path, mode)
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def _levels_to_rgb(levels: np.ndarray, white: float, path: str | Path, mode: str) -> Any:
    from PIL import Image

    if not np.isfinite(levels).all():
        raise ImageReadError(f"{path}: mode {mode} image holds NaN or infinite values")
    low, high = float(levels.min()), float(levels.max())
    if low < 0.0 or high > white:
        expected = "0..65535 (16-bit)" if white == SIXTEEN_BIT_WHITE else "[0, 1] or [0, 255]"
        raise ImageReadError(f"{path}: mode {mode} image has values in [{low:g}, {high:g}]; expected {expected}")
    grey = np.rint(levels * (255.0 / white)).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")
