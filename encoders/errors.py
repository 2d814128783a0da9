"""Typed errors of the encoders, and the one reader of a local encoder checkpoint (safetensors) that turns
every way a file can be wrong into an error naming it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mm.errors import MMTuneError


class EncoderError(MMTuneError, ValueError):
    """An encoder cannot be built or loaded as configured; the message names the file or key."""


class EncoderLoadError(MMTuneError, OSError):
    """A named model (hub name or local folder) cannot be loaded; the message names it."""


def load_encoder_state(path: str | Path, what: str) -> dict[str, Any]:
    """The tensors of the safetensors file ``path`` (a checkpoint of ``what``, e.g. 'the audio encoder')."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise EncoderError(f"{path}: no such checkpoint file for {what}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise EncoderError(f"{path}: not a readable safetensors checkpoint of {what} ({err})") from None
