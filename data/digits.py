"""scikit-learn's bundled 8x8 digits (1,797 images, no download) as dict samples, with domain shifts.

A *domain* is a fixed transform of the images: the demo pretrains on ``original`` and adapts to a
shifted domain where the frozen base does poorly.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mm.config import ConfigError
from mm.errors import MMTuneError


class DigitsDataError(MMTuneError, KeyError):
    """An unknown domain or split of the digits data."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


DOMAINS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "original": lambda images: images,
    "inverted": lambda images: 1.0 - images,
    "rotated": lambda images: np.rot90(images, k=1, axes=(-2, -1)).copy(),
    "inverted_rotated": lambda images: 1.0 - np.rot90(images, k=1, axes=(-2, -1)),
}


def load_digits_arrays(domain: str = "original") -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 (N, 1, 8, 8) in [0, 1] and int64 labels, transformed into ``domain``."""
    if domain not in DOMAINS:
        raise DigitsDataError(f"unknown digits domain {domain!r}; known: {', '.join(DOMAINS)}")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]
    return DOMAINS[domain](images).astype(np.float32), bunch.target.astype(np.int64)


def split_indices(n: int, test_fraction: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random train/test split of ``range(n)``."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return order[n_test:], order[:n_test]


class DigitsDataset:
    """``{"image": float tensor (1, 8, 8), "label": int}`` samples of one split and domain."""

    def __init__(self, split: str = "train", domain: str = "original", seed: int = 0) -> None:
        if split not in ("train", "test"):
            raise ConfigError(f"digits: split must be 'train' or 'test', got {split!r}")
        import torch

        images, labels = load_digits_arrays(domain)
        train, test = split_indices(len(labels), seed=seed)
        index = train if split == "train" else test
        self.images = torch.from_numpy(images[index])
        self.labels = torch.from_numpy(labels[index])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i])}
