"""Maximal Coding Rate Reduction (MCR2; Yu et al. 2020), the objective MLC optimises.

For features ``Z`` (n samples x d, rows unit-norm in practice) and a membership ``Pi`` (k x n, row j the
non-negative weights of the samples in group j):

    R(Z; eps)       = 1/2 logdet(I_d + d / (n eps^2) Z^T Z)                               (expansion)
    R_c(Z, Pi; eps) = sum_j tr(Pi_j) / (2n) logdet(I_d + d / (tr(Pi_j) eps^2) Z^T diag(Pi_j) Z)  (compression)
    Delta R         = R - R_c

With one-hot labels ``Pi`` is the usual class partition; MLC (heads/mlc.py) uses the n x n doubly stochastic
membership, one group per sample.

``epsilon`` (eps above) is the papers' distortion (Yu et al. 2020; Ding et al. 2023), squared inside the
rates. The authors' code calls eps^2 ``eps`` (``p / (m * eps)``): their ``eps=0.5`` is ``epsilon = 0.707`` here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _LogdetSPD(torch.autograd.Function):
    """log det of SPD matrices (batched); backward is grad * M^-1 from the Cholesky factor, which is much
    cheaper on the CPU than differentiating through the factorisation for many small matrices."""

    @staticmethod
    def forward(ctx, matrix: torch.Tensor) -> torch.Tensor:
        factor = torch.linalg.cholesky(matrix)
        ctx.save_for_backward(factor)
        return 2.0 * factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (factor,) = ctx.saved_tensors
        return grad[..., None, None] * torch.cholesky_inverse(factor)


def _logdet_spd(matrix: torch.Tensor) -> torch.Tensor:
    """log det of symmetric positive-definite matrices (batched), differentiable."""
    return _LogdetSPD.apply(matrix)


def coding_rate(z: torch.Tensor, epsilon: float = 0.5) -> torch.Tensor:
    """R(Z; epsilon): the rate of coding all n rows of ``z`` (n, d) up to distortion ``epsilon``."""
    n, d = z.shape
    gram = z.T @ z
    return 0.5 * _logdet_spd(torch.eye(d, dtype=z.dtype, device=z.device) + (d / (n * epsilon**2)) * gram)


def compress_rate(z: torch.Tensor, membership: torch.Tensor, epsilon: float = 0.5) -> torch.Tensor:
    """R_c(Z, Pi; epsilon): the rate of coding each group of ``membership`` (k, n) separately, summed.

    Empty groups (zero total weight) contribute nothing.
    """
    n, d = z.shape
    if membership.shape[-1] != n:
        raise ValueError(f"membership has {membership.shape[-1]} columns, expected one per sample ({n})")
    weight = membership.sum(1)  # tr(Pi_j)
    # One GEMM of the memberships with the per-sample outer products z z^T, flattened to d*d columns.
    outer = (z[:, :, None] * z[:, None, :]).reshape(n, d * d)
    covariances = (membership.to(z.dtype) @ outer).reshape(-1, d, d)
    scale = d / (weight.clamp_min(1e-12) * epsilon**2)
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    logdets = _logdet_spd(eye + scale[:, None, None] * covariances)
    return (weight / (2.0 * n) * logdets).sum()


def rate_reduction(z: torch.Tensor, membership: torch.Tensor, epsilon: float = 0.5) -> torch.Tensor:
    """Delta R = R(Z) - R_c(Z, Pi): large when groups are compact and mutually incoherent."""
    return coding_rate(z, epsilon) - compress_rate(z, membership, epsilon)


def one_hot_membership(labels: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """(k, n) membership of integer labels (n,); labels < 0 (unlabelled) belong to no group."""
    k = num_classes if num_classes is not None else int(labels.max()) + 1
    valid = labels >= 0
    hot = F.one_hot(labels.clamp_min(0), k).T.to(torch.float32)
    return hot * valid[None].to(hot.dtype)


class MCR2Loss(nn.Module):
    """Supervised MCR2 loss ``-Delta R`` on unit-normalised features (minimise it)."""

    def __init__(self, epsilon: float = 0.5, num_classes: int | None = None) -> None:
        super().__init__()
        self.epsilon, self.num_classes = epsilon, num_classes

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = F.normalize(features.float(), dim=-1)
        membership = one_hot_membership(labels, self.num_classes).to(z.device)
        return -rate_reduction(z, membership, self.epsilon)
