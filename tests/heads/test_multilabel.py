"""Multi-label head metrics: AP against scikit-learn, F1 by hand, masked loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score

from heads.multilabel import MultiLabelHead, average_precision, multilabel_loss, multilabel_metrics


@pytest.mark.parametrize("ties", [False, True])
def test_average_precision_matches_scikit_learn(ties):
    rng = np.random.default_rng(0)
    for _ in range(5):
        targets = rng.random(40) < 0.3
        scores = rng.random(40)
        if ties:
            scores = np.round(scores, 1)
        expected = average_precision_score(targets, scores)
        assert average_precision(torch.tensor(scores), torch.tensor(targets)) == pytest.approx(expected)
    assert math.isnan(average_precision(torch.rand(5), torch.zeros(5)))


def test_metrics_by_hand_and_against_scikit_learn():
    targets = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]])
    scores = torch.tensor([[0.9, 0.2, 0.1], [0.4, 0.8, 0.3], [0.6, 0.7, 0.2], [0.1, 0.1, 0.1]])
    metrics = multilabel_metrics(scores, targets)
    # Predicted at 0.5: [1,0,0], [0,1,0], [1,1,0], [0,0,0] -> tp 3, fp 1, fn 1: micro F1 = 6 / 8.
    assert metrics["micro_f1"] == pytest.approx(0.75)
    # Class 0: tp 1, fp 1, fn 1 -> 0.5; class 1: tp 2 -> 1.0; class 2 never true nor predicted: left out.
    assert metrics["macro_f1"] == pytest.approx(0.75)
    assert metrics["micro_f1"] == pytest.approx(f1_score(targets, scores >= 0.5, average="micro"))
    ap0 = average_precision_score(targets[:, 0], scores[:, 0])
    ap1 = average_precision_score(targets[:, 1], scores[:, 1])
    assert metrics["mAP"] == pytest.approx((ap0 + ap1) / 2)


def test_invalid_samples_leave_the_loss_and_metrics():
    head = MultiLabelHead(4, 3)
    features = torch.randn(5, 4)
    targets = torch.randint(0, 2, (5, 3)).float()
    valid = torch.tensor([True, True, False, True, False])
    loss = multilabel_loss(head(features), targets, valid)
    assert loss.item() == pytest.approx(multilabel_loss(head(features[valid]), targets[valid]).item())
    poisoned = targets.clone()
    poisoned[~valid] = float("nan")
    loss = multilabel_loss(head(features), torch.nan_to_num(poisoned), valid)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(head.proj.weight.grad).all()
    scores = torch.sigmoid(head(features)).detach()
    assert multilabel_metrics(scores, targets, valid=valid) == multilabel_metrics(scores[valid], targets[valid])
