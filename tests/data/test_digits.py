from __future__ import annotations

import numpy as np
import pytest

from data.digits import DOMAINS, DigitsDataset, load_digits_arrays, split_indices


def test_domains_transform_the_same_images():
    original, labels = load_digits_arrays("original")
    assert original.shape == (1797, 1, 8, 8) and original.min() >= 0 and original.max() <= 1
    np.testing.assert_allclose(load_digits_arrays("inverted")[0], 1 - original)
    np.testing.assert_allclose(load_digits_arrays("rotated")[0][5, 0], np.rot90(original[5, 0]))
    assert set(labels) == set(range(10))
    assert set(DOMAINS) >= {"original", "inverted", "rotated"}


def test_split_is_disjoint_and_fixed():
    train, test = split_indices(100, 0.25, seed=3)
    assert len(test) == 25 and not set(train) & set(test)
    assert np.array_equal(split_indices(100, 0.25, seed=3)[1], test)


def test_dataset_gives_dict_samples_and_rejects_unknown_names():
    sample = DigitsDataset("test")[0]
    assert sample["image"].shape == (1, 8, 8) and isinstance(sample["label"], int)
    with pytest.raises(KeyError, match="unknown digits domain 'upside'"):
        DigitsDataset("train", "upside")
    with pytest.raises(ValueError, match="split must be"):
        DigitsDataset("val")
