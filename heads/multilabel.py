"""Multi-label classification: a linear head, masked binary cross-entropy and mAP / micro and macro F1.

Used for land-cover presence vectors (ESA WorldCover classes present in a chip). Samples whose label raster
had no valid pixel carry ``valid = False`` and are left out of the loss and the metrics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MultiLabelHead(nn.Module):
    """Features (B, F) -> one logit per class (B, K)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)


def multilabel_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean binary cross-entropy over the valid samples (0 when none is valid, still differentiable)."""
    per_sample = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none").mean(-1)
    if valid is None:
        return per_sample.mean()
    weight = valid.to(per_sample.dtype)
    return (per_sample * weight).sum() / weight.sum().clamp_min(1.0)


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """AP of one class: the mean, over its positives, of the precision at each positive's rank.

    Tied scores form one threshold (all of them enter together), as scikit-learn's
    ``average_precision_score`` does. NaN when the class has no positive.
    """
    positives = int(targets.sum())
    if positives == 0:
        return float("nan")
    order = torch.argsort(scores, descending=True, stable=True)
    s, t = scores[order], targets[order].double()
    last_of_tie = torch.ones_like(s, dtype=torch.bool)
    last_of_tie[:-1] = s[1:] != s[:-1]
    true_pos = torch.cumsum(t, 0)[last_of_tie]
    predicted = (torch.nonzero(last_of_tie).squeeze(1) + 1).double()
    precision = true_pos / predicted
    recall_gain = torch.diff(true_pos, prepend=true_pos.new_zeros(1)) / positives
    return float((precision * recall_gain).sum())


def multilabel_metrics(scores: torch.Tensor, targets: torch.Tensor, threshold: float = 0.5,
                       valid: torch.Tensor | None = None) -> dict[str, float]:
    """mAP (over classes with a positive), micro F1 and macro F1 of ``scores`` (probabilities, (N, K)).

    Macro F1 averages the classes that occur in the targets or the predictions (F1 is undefined for a
    class that is neither true nor predicted anywhere).
    """
    if valid is not None:
        scores, targets = scores[valid.bool()], targets[valid.bool()]
    targets = targets.bool()
    predicted = scores >= threshold
    aps = [average_precision(scores[:, k], targets[:, k]) for k in range(targets.shape[1])]
    aps = [ap for ap in aps if ap == ap]
    tp = (predicted & targets).sum(0).double()
    fp = (predicted & ~targets).sum(0).double()
    fn = (~predicted & targets).sum(0).double()
    micro = 2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()).clamp_min(1.0)
    seen = (tp + fp + fn) > 0
    per_class = 2 * tp / (2 * tp + fp + fn).clamp_min(1.0)
    return {"mAP": float(sum(aps) / len(aps)) if aps else float("nan"), "micro_f1": float(micro),
            "macro_f1": float(per_class[seen].mean()) if seen.any() else float("nan")}
