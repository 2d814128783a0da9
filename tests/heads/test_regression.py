"""Regression head: masked MSE and RMSE by hand, standardisation round trip, NaN targets never leak."""

from __future__ import annotations

import math

import pytest
import torch

from heads.regression import RegressionHead, masked_mse, rmse


def test_rmse_and_mse_by_hand_with_a_mask():
    predictions = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 0.0]])
    targets = torch.tensor([[0.0, 13.0], [2.0, float("nan")], [5.0, 16.0]])
    valid = torch.tensor([[True, True], [True, False], [True, False]])
    # column 0: errors 1, 0, -2 -> RMSE sqrt(5/3); column 1: only the first entry, error -3 -> 3.
    assert rmse(predictions, targets, valid).tolist() == pytest.approx([math.sqrt(5 / 3), 3.0])
    assert masked_mse(predictions, targets, valid).item() == pytest.approx((1 + 0 + 4 + 9) / 4)
    assert masked_mse(predictions, targets).item() == pytest.approx((1 + 0 + 4 + 9 + 256) / 5)  # NaN skipped


def test_standardisation_round_trip_and_finite_gradients():
    head = RegressionHead(3, 2)
    targets = torch.tensor([[0.1, 100.0], [0.3, 300.0], [0.2, float("nan")]])
    valid = torch.isfinite(targets)
    head.fit_scaling(torch.nan_to_num(targets), valid)
    assert head.target_mean.tolist() == pytest.approx([0.2, 200.0])
    features = torch.randn(3, 3)
    assert torch.allclose(head.predict(features), head(features) * head.target_std + head.target_mean)
    loss = masked_mse(head(features), head.standardize(targets), valid)
    loss.backward()
    assert torch.isfinite(head.proj.weight.grad).all()
