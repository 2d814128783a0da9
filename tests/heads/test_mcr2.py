"""MCR2 coding rates against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from heads.mcr2 import MCR2Loss, coding_rate, compress_rate, one_hot_membership, rate_reduction


def test_rates_of_two_orthogonal_unit_vectors_by_hand():
    # n = d = 2, epsilon = 1: R = 1/2 logdet(I + 2/2 * I) = log 2.
    z = torch.eye(2, dtype=torch.float64)
    assert coding_rate(z, epsilon=1.0).item() == pytest.approx(math.log(2))
    # Each vector its own group (tr = 1): R_c = 2 * 1/(2*2) * log(1 + 2/1 * 1) = log(3) / 2.
    apart = one_hot_membership(torch.tensor([0, 1])).double()
    assert compress_rate(z, apart, epsilon=1.0).item() == pytest.approx(0.5 * math.log(3))
    # One group of both (tr = 2): R_c = 2/4 * logdet(I + 2/2 * I) = log 2, so Delta R = 0.
    together = one_hot_membership(torch.tensor([0, 0])).double()
    assert rate_reduction(z, together, epsilon=1.0).item() == pytest.approx(0.0, abs=1e-12)
    assert rate_reduction(z, apart, epsilon=1.0).item() == pytest.approx(math.log(2) - 0.5 * math.log(3))


def test_rate_with_eps_and_general_gram_by_hand():
    z = torch.tensor([[3.0, 4.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    n, d, eps = 3, 2, 0.5
    gram = z.T @ z  # [[10, 12], [12, 17]]
    a = d / (n * eps**2)
    det = (1 + a * 10) * (1 + a * 17) - (a * 12) ** 2
    assert coding_rate(z, eps).item() == pytest.approx(0.5 * math.log(det))
    assert torch.allclose(gram, torch.tensor([[10.0, 12.0], [12.0, 17.0]], dtype=torch.float64))


def test_soft_membership_weights_samples_and_empty_groups_add_nothing():
    z = torch.nn.functional.normalize(torch.randn(6, 3, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    hard = one_hot_membership(labels, num_classes=4).double()  # group 3 is empty
    assert compress_rate(z, hard).item() == pytest.approx(compress_rate(z, hard[:3]).item())
    unlabelled = one_hot_membership(torch.tensor([0, 0, 1, 1, 2, -1])).double()
    assert unlabelled[:, 5].sum() == 0


def test_mcr2_loss_prefers_the_true_partition_of_orthogonal_subspaces():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(12, 12))[0]
    z = torch.cat([torch.randn(40, 3) @ basis[:, 3 * k : 3 * k + 3].T for k in range(3)])
    labels = torch.arange(3).repeat_interleave(40)
    loss = MCR2Loss(epsilon=0.5)
    assert loss(z, labels) < loss(z, labels[torch.randperm(120)]) - 1.0


def test_rate_gradients_match_autograd_through_torch_logdet():
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(20, 5, dtype=torch.float64), dim=1).requires_grad_()
    membership = torch.rand(4, 20, dtype=torch.float64)
    ours = torch.autograd.grad(rate_reduction(z, membership, 0.5), z)[0]

    def reference(z):
        n, d = z.shape
        eye = torch.eye(d, dtype=z.dtype)
        expand = 0.5 * torch.logdet(eye + d / (n * 0.25) * z.T @ z)
        compress = 0
        for row in membership:
            cov = z.T @ torch.diag(row) @ z
            compress = compress + row.sum() / (2 * n) * torch.logdet(eye + d / (row.sum() * 0.25) * cov)
        return expand - compress

    assert torch.allclose(rate_reduction(z, membership, 0.5), reference(z))
    assert torch.allclose(ours, torch.autograd.grad(reference(z), z)[0], atol=1e-10)


def test_epsilon_is_the_papers_and_the_reference_codes_eps_is_its_square():
    """The MCR2 code computes logdet(I + p / (m * eps) Z^T Z) / 2: its eps is epsilon squared, so its default
    eps=0.5 is epsilon = sqrt(0.5) here."""
    z = torch.nn.functional.normalize(torch.randn(30, 6, dtype=torch.float64), dim=1)
    m, p, reference_eps = 30, 6, 0.5
    reference = 0.5 * torch.logdet(torch.eye(p, dtype=z.dtype) + p / (m * reference_eps) * z.T @ z)
    assert coding_rate(z, epsilon=math.sqrt(reference_eps)).item() == pytest.approx(reference.item())
    assert coding_rate(z, epsilon=reference_eps).item() != pytest.approx(reference.item())
