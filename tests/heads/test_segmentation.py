"""Segmentation head: logits at the label's size from maps of any grid, a loss that ignores unlabelled
pixels (0, not NaN, when none is labelled), and IoU / mIoU from a confusion matrix."""

from __future__ import annotations

import pytest
import torch

from heads.segmentation import SegmentationHead, confusion_matrix, iou_metrics, segmentation_loss


def test_head_merges_maps_of_several_grids_into_label_sized_logits():
    head = SegmentationHead([8, 16, 4], num_classes=5, width=8)
    maps = [torch.randn(2, 8, 4, 4), torch.randn(2, 16, 2, 2), torch.randn(2, 4, 8, 8)]
    logits = head(maps, (32, 32))
    assert logits.shape == (2, 5, 32, 32)
    logits.sum().backward()
    assert all(p.grad is not None for p in head.parameters())
    with pytest.raises(ValueError, match="got 2 feature maps, built for 3"):
        head(maps[:2], (32, 32))


def test_loss_ignores_unlabelled_pixels_and_is_zero_not_nan_without_any():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    target = torch.tensor([[[0, -1], [2, -1]]])
    expected = torch.nn.functional.cross_entropy(logits[0].permute(1, 2, 0)[target[0] >= 0], target[target >= 0])
    assert torch.allclose(segmentation_loss(logits, target), expected)
    empty = segmentation_loss(logits, torch.full((1, 2, 2), -1))
    assert empty.item() == 0.0
    empty.backward()
    assert torch.isfinite(logits.grad).all()


def test_iou_per_class_and_miou_from_the_confusion_matrix():
    target = torch.tensor([0, 0, 1, 1, 2, -1])
    predicted = torch.tensor([0, 1, 1, 1, 1, 0])
    confusion = confusion_matrix(predicted, target, num_classes=4)
    assert confusion.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    metrics = iou_metrics(confusion, ["a", "b", "c", "d"])
    # a: 1 / (2 + 1 - 1); b: 2 / (4 + 2 - 2); c: 0 / 1; d never occurs: no IoU.
    assert metrics["iou_a"] == pytest.approx(0.5) and metrics["iou_b"] == pytest.approx(0.5)
    assert metrics["iou_c"] == 0.0 and "iou_d" not in metrics
    assert metrics["mIoU"] == pytest.approx(1 / 3) and metrics["pixel_acc"] == pytest.approx(3 / 5)
