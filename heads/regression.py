"""Scalar regression targets (built-up fraction, biomass, elevation): a linear head on standardised targets,
a masked MSE loss and per-target RMSE in physical units."""

from __future__ import annotations

import torch
from torch import nn


class RegressionHead(nn.Module):
    """Features (B, F) -> standardised predictions (B, T). ``target_mean`` / ``target_std`` (set from the
    training targets with ``fit_scaling``) map them back to physical units in ``predict``."""

    def __init__(self, in_features: int, num_targets: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, num_targets)
        self.register_buffer("target_mean", torch.zeros(num_targets))
        self.register_buffer("target_std", torch.ones(num_targets))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)

    @torch.no_grad()
    def fit_scaling(self, targets: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Set the standardisation from training targets (N, T), counting valid entries only."""
        valid = torch.ones_like(targets, dtype=torch.bool) if valid is None else valid.bool()
        weight = valid.to(targets.dtype)
        count = weight.sum(0).clamp_min(1.0)
        mean = (targets * weight).sum(0) / count
        std = (((targets - mean) ** 2 * weight).sum(0) / count).sqrt()
        self.target_mean.copy_(mean)
        self.target_std.copy_(torch.where(std > 0, std, torch.ones_like(std)))

    def standardize(self, targets: torch.Tensor) -> torch.Tensor:
        return (targets - self.target_mean) / self.target_std

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self(features) * self.target_std + self.target_mean


def masked_mse(predictions: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the valid entries; invalid ones (NaN targets included) never reach the sum."""
    valid = torch.isfinite(targets) if valid is None else valid.bool() & torch.isfinite(targets)
    diff = torch.where(valid, predictions.float() - torch.nan_to_num(targets.float()), 0.0)
    return (diff**2).sum() / valid.sum().clamp_min(1)


def rmse(predictions: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-target RMSE (T,) over valid entries of (N, T) predictions and targets."""
    valid = torch.isfinite(targets) if valid is None else valid.bool() & torch.isfinite(targets)
    diff = torch.where(valid, predictions.double() - torch.nan_to_num(targets.double()), 0.0)
    return ((diff**2).sum(0) / valid.sum(0).clamp_min(1)).sqrt()
