"""Per-pixel classification (land cover, any categorical raster): a light FPN-style decoder over an encoder's
feature maps, a masked cross-entropy, and mIoU / per-class IoU from a confusion matrix.

The decoder (after Lin et al.'s FPN, kept small): a 1x1 lateral convolution brings every feature map to
``width`` channels; from the coarsest map down, the running map is upsampled to the next finer one and
added; a 3x3 convolution smooths the finest sum and a 1x1 convolution gives the class logits, upsampled
bilinearly to the label's size. Maps of several towers (fused modalities, possibly on different grids)
enter the same top-down path, ordered by resolution. Pixels labelled ``ignore_index`` (-1: unmapped,
nodata, a code outside the declared classes) never reach the loss or the metrics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -1


class SegmentationHead(nn.Module):
    """Feature maps [(B, C_i, h_i, w_i)] -> logits (B, K, H, W)."""

    def __init__(self, in_channels: list[int], num_classes: int, width: int = 64) -> None:
        super().__init__()
        if not in_channels or num_classes < 2:
            raise ValueError(f"SegmentationHead needs feature maps and >= 2 classes, got {in_channels}, {num_classes}")
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        norm = nn.GroupNorm(8 if width % 8 == 0 else 1, width)  # batch-size independent (a batch may be 1 chip)
        self.smooth = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), norm, nn.ReLU())
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        if len(features) != len(self.lateral):
            raise ValueError(f"SegmentationHead: got {len(features)} feature maps, built for {len(self.lateral)}")
        maps = sorted((lat(f) for lat, f in zip(self.lateral, features, strict=True)),
                      key=lambda m: m.shape[-2] * m.shape[-1])
        x = maps[0]
        for finer in maps[1:]:
            x = F.interpolate(x, size=finer.shape[-2:], mode="bilinear", align_corners=False) + finer
        logits = self.classifier(self.smooth(x))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """Mean cross-entropy over labelled pixels; 0 (still differentiable) when a batch has none, never NaN."""
    per_pixel = F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index, reduction="none")
    count = (target != ignore_index).sum()
    return per_pixel.sum() / count.clamp_min(1)


def confusion_matrix(predicted: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE) -> torch.Tensor:
    """(K, K) counts, rows = true class, columns = predicted class, over labelled pixels."""
    keep = target != ignore_index
    index = target[keep].long() * num_classes + predicted[keep].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_metrics(confusion: torch.Tensor, names: list[str] | None = None) -> dict[str, float]:
    """Per-class IoU = TP / (TP + FP + FN) for classes that occur in the targets or predictions, their mean
    (mIoU) and pixel accuracy. A class neither present nor predicted has no IoU and is left out."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    seen = union > 0
    iou = tp / union.clamp_min(1)
    names = names or [str(k) for k in range(len(tp))]
    out = {f"iou_{names[k]}": float(iou[k]) for k in range(len(tp)) if seen[k]}
    out["mIoU"] = float(iou[seen].mean()) if seen.any() else 0.0
    out["pixel_acc"] = float(tp.sum() / confusion.sum().clamp_min(1))
    return out
