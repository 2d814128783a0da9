"""Per-band normalisation statistics: a streaming (count, mean, M2) fold over training chips, kept as JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class BandStats:
    product: str
    bands: list[str]
    mean: list[float]
    std: list[float]
    count: list[float]
    chips: int

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.mean, np.float32)[:, None, None], np.asarray(self.std, np.float32)[:, None, None]


def merge_moments(acc: np.ndarray, values: np.ndarray, valid: np.ndarray) -> None:
    """Fold one chip into per-band (count, mean, M2) rows of ``acc`` (Chan et al.'s pairwise update)."""
    for b in range(values.shape[0]):
        x = values[b][valid[b]].astype(np.float64)
        if x.size == 0:
            continue
        n_a, mean_a, m2_a = acc[b]
        n_b, mean_b = float(x.size), float(x.mean())
        m2_b = float(((x - mean_b) ** 2).sum())
        n = n_a + n_b
        delta = mean_b - mean_a
        acc[b] = (n, mean_a + delta * n_b / n, m2_a + m2_b + delta * delta * n_a * n_b / n)


def write_json(path: Path, data: dict[str, Any]) -> None:
    from mm.state import atomic_write

    def write(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(data, indent=1))

    atomic_write(path, write)
