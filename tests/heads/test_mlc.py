"""MLC: the Sinkhorn membership is doubly stochastic; one-shot init; clusters separated subspaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from heads.mlc import MLC, MLCConfig, mlc_loss, sinkhorn


def test_sinkhorn_membership_is_doubly_stochastic_and_solves_the_entropic_projection():
    torch.manual_seed(0)
    c = torch.nn.functional.normalize(torch.randn(50, 8, dtype=torch.float64), dim=1)
    scores = c @ c.T
    gamma = sinkhorn(scores, eta=0.2, iters=200)
    assert (gamma >= 0).all()
    assert torch.allclose(gamma.sum(0), torch.ones(50, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(gamma.sum(1), torch.ones(50, dtype=torch.float64), atol=1e-8)
    # The optimum of -<S, G> + eta <G, log G> over the polytope has the form diag(u) exp(S / eta) diag(v):
    # log G - S / eta is a sum of a row and a column term, so its double differences vanish.
    residual = torch.log(gamma) - scores / 0.2
    double_difference = residual - residual[:1] - residual[:, :1] + residual[:1, :1]
    assert double_difference.abs().max() < 1e-8
    assert torch.allclose(gamma, gamma.T, atol=1e-8)  # symmetric scores give a symmetric membership


def test_sinkhorn_is_differentiable_and_the_loss_is_finite():
    z = torch.nn.functional.normalize(torch.randn(32, 6), dim=1).requires_grad_()
    c = torch.nn.functional.normalize(torch.randn(32, 6), dim=1).requires_grad_()
    loss, parts = mlc_loss(z, c, MLCConfig(z_dim=6))
    loss.backward()
    assert torch.isfinite(loss) and set(parts) == {"R", "Rc", "neg_entropy"}
    assert c.grad.abs().sum() > 0 and z.grad.abs().sum() > 0


def test_one_shot_init_copies_the_feature_head_into_the_cluster_head():
    x = torch.randn(64, 10)
    model = MLC(10, MLCConfig(z_dim=4, hidden_dim=16, batch_size=32, init_epochs=1, epochs=0))
    model.initialize(x)
    z, c = model.embed(x)
    assert torch.equal(z, c)


def subspace_data(n_per: int = 100, k: int = 3, dim: int = 2, ambient: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    points, labels = [], []
    for j in range(k):
        basis = np.linalg.qr(rng.normal(size=(ambient, dim)))[0]
        points.append(rng.normal(size=(n_per, dim)) @ basis.T)
        labels += [j] * n_per
    x = np.concatenate(points)
    return torch.tensor(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=torch.float32), np.array(labels)


def test_label_free_score_prefers_the_true_partition_to_a_shuffled_one():
    """The score that picks gamma/eta in scripts/repro_mlc.py: Delta R of the learned features under a
    clustering. Labels serve here only to build the two partitions being compared."""
    x, labels = subspace_data(n_per=60)
    model = MLC(16, MLCConfig(num_clusters=3, z_dim=8, hidden_dim=32, batch_size=90, init_epochs=3, epochs=0))
    model.fit(x)
    shuffled = np.random.default_rng(0).permutation(labels)
    assert model.rate_reduction_of(x, labels) > model.rate_reduction_of(x, shuffled) + 0.1
    assert model.rate_reduction_of(x, np.zeros_like(labels)) == pytest.approx(0.0, abs=1e-9)  # one group


@pytest.mark.slow
def test_mlc_clusters_well_separated_subspaces_far_above_chance():
    from sklearn.metrics import adjusted_rand_score

    x, labels = subspace_data()
    config = MLCConfig(num_clusters=3, z_dim=8, hidden_dim=64, batch_size=150, init_epochs=10, epochs=15,
                       lr=3e-3, noise=0.05, drop=0.0, gamma=0.5)
    clusters = MLC(16, config).fit(x).predict(x)
    assert adjusted_rand_score(labels, clusters) > 0.45  # chance is 0; this seeded run gives 0.59


def test_config_errors_name_the_key():
    from mm.config import ConfigError

    with pytest.raises(ConfigError, match="'eta' must be > 0"):
        MLCConfig(eta=0.0)
    with pytest.raises(ConfigError, match="'epsilon' must be > 0"):
        MLCConfig(epsilon=-1.0)
