"""MLC: Unsupervised Manifold Linearizing and Clustering (Ding et al., ICCV 2023).

MLC learns features ``Z`` (feature head) and a doubly stochastic membership ``Gamma`` (cluster head) that
together maximise the coding rate reduction, in minimisation form per mini-batch of n samples:

    loss = -R(Z; eps) + R_c(Z, Gamma; eps) + gamma * (1/n) sum_ij Gamma_ij log Gamma_ij
    R_c(Z, Gamma; eps) = 1/(2n) sum_i logdet(I + d/eps^2 Z^T diag(Gamma_i) Z)     (each row sums to 1)

(eps is the papers' epsilon, ``MLCConfig.epsilon``; see heads/mcr2.py for the authors' ``eps`` = eps^2.)
    Gamma = P_{Omega,eta}(C C^T):  argmin_{Gamma >= 0, Gamma 1 = 1, Gamma^T 1 = 1} -<C C^T, Gamma> + eta <Gamma, log Gamma>

``C`` are the unit-norm cluster-head outputs; the projection is Sinkhorn's algorithm (log domain) and is
differentiated through. The entropy term keeps ``Gamma`` from collapsing to the identity (every sample its
own group, which minimises R_c). Because ``Gamma`` is a function of each batch's ``C``, training is
mini-batched with no n x n variable for the whole data set.

One-shot initialisation, as the paper describes: the feature head is first trained self-supervised (total
coding rate of augmented views plus their agreement), then the cluster head is set equal to the feature
head, so the first ``Gamma`` already reflects feature similarity; no alternating or k-means step.
Cluster labels: spectral clustering on the symmetrised ``Gamma`` of the data to label.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from heads.mcr2 import coding_rate, compress_rate, one_hot_membership, rate_reduction


def sinkhorn(scores: torch.Tensor, eta: float, iters: int = 5) -> torch.Tensor:
    """The entropic projection of ``scores`` (n, n) onto doubly stochastic matrices (rows, cols sum to 1).

    Solves argmin -<scores, G> + eta <G, log G> over the Birkhoff polytope by alternating row and column
    scaling of exp(scores / eta) in the log domain; the last step scales columns, so columns sum to 1
    exactly and rows to within the tolerance the iterations reach.
    """
    log_kernel = scores / eta
    log_u = torch.zeros(scores.shape[0], dtype=scores.dtype, device=scores.device)
    log_v = torch.zeros(scores.shape[1], dtype=scores.dtype, device=scores.device)
    for _ in range(max(1, iters)):
        log_u = -torch.logsumexp(log_kernel + log_v[None, :], dim=1)
        log_v = -torch.logsumexp(log_kernel + log_u[:, None], dim=0)
    return torch.exp(log_kernel + log_u[:, None] + log_v[None, :])


@dataclass
class MLCConfig:
    """Manifold Linearizing and Clustering: heads, objective and schedule."""

    num_clusters: int = field(default=10, metadata={"help": "Clusters to report (spectral clustering on Gamma)."})
    z_dim: int = field(default=32, metadata={"help": "Feature (and cluster-head) dimension d."})
    hidden_dim: int = field(default=512, metadata={"help": "Width of the shared MLP before the two heads."})
    epsilon: float = field(default=0.5, metadata={
        "help": "The papers' distortion epsilon of the coding rates (squared inside; the authors' code calls "
                "epsilon^2 'eps')."})
    gamma: float = field(default=0.1, metadata={"help": "Weight of the membership entropy regulariser."})
    eta: float = field(default=0.15, metadata={"help": "Entropic strength of the Sinkhorn projection."})
    sinkhorn_iters: int = field(default=5, metadata={"help": "Sinkhorn iterations per training step."})
    predict_iters: int = field(default=50, metadata={"help": "Sinkhorn iterations for the final Gamma."})
    batch_size: int = field(default=512, metadata={"help": "Mini-batch size n."})
    init_epochs: int = field(default=20, metadata={"help": "Self-supervised epochs of the one-shot init."})
    epochs: int = field(default=30, metadata={"help": "MLC epochs after the init."})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate."})
    weight_decay: float = field(default=1e-4, metadata={"help": "Adam weight decay."})
    agreement: float = field(default=1.0, metadata={"help": "Init: weight of augmented-view cosine agreement."})
    noise: float = field(default=0.1, metadata={"help": "Default augmentation: Gaussian noise (x feature std)."})
    drop: float = field(default=0.1, metadata={"help": "Default augmentation: feature dropout probability."})
    absolute: bool = field(default=True, metadata={"help": "Project |C C^T| (as the authors' follow-up code "
                                                           "does) instead of C C^T."})
    seed: int = field(default=0, metadata={"help": "Seed of weights, batches and augmentations."})

    def __post_init__(self) -> None:
        from mm.config import ConfigError

        for key in ("num_clusters", "z_dim", "hidden_dim", "batch_size", "sinkhorn_iters", "predict_iters"):
            if getattr(self, key) < 1:
                raise ConfigError(f"mlc: key {key!r} must be >= 1, got {getattr(self, key)}")
        for key in ("epsilon", "eta", "lr"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"mlc: key {key!r} must be > 0, got {getattr(self, key)}")


class MLCNet(nn.Module):
    """Shared MLP -> feature head ``Z`` and cluster head ``C``, both unit-normalised rows."""

    def __init__(self, input_dim: int, hidden_dim: int, z_dim: int) -> None:
        super().__init__()
        self.pre_feature = nn.Sequential(
            nn.Linear(input_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
        )
        self.feature_head = nn.Linear(hidden_dim, z_dim)
        self.cluster_head = nn.Linear(hidden_dim, z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.pre_feature(x)
        return F.normalize(self.feature_head(h), dim=-1), F.normalize(self.cluster_head(h), dim=-1)


def similarity(c: torch.Tensor, config: MLCConfig) -> torch.Tensor:
    """C C^T, or |C C^T| (sign-invariant: a subspace holds both z and -z), the scores Sinkhorn projects."""
    scores = c @ c.T
    return scores.abs() if config.absolute else scores


def mlc_loss(z: torch.Tensor, c: torch.Tensor, config: MLCConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The MLC objective on one mini-batch (minimise), and its parts for logging."""
    gamma = sinkhorn(similarity(c, config), config.eta, config.sinkhorn_iters)
    expand = coding_rate(z, config.epsilon)
    compress = compress_rate(z, gamma, config.epsilon)
    neg_entropy = (gamma * torch.log(gamma.clamp_min(1e-30))).sum() / z.shape[0]
    loss = -expand + compress + config.gamma * neg_entropy
    return loss, {"R": expand.item(), "Rc": compress.item(), "neg_entropy": neg_entropy.item()}


def feature_noise(noise: float, drop: float) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    """The default augmentation of feature vectors: Gaussian noise scaled by each feature's std, dropout."""

    def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        scale = x.std(0, keepdim=True) * noise
        keep = (torch.rand(x.shape, generator=generator) >= drop).to(x.dtype)
        return (x + scale * torch.randn(x.shape, generator=generator)) * keep

    return augment


class MLC:
    """Fit MLC on a feature matrix (n, D) and label it; ``history`` keeps the per-epoch losses."""

    def __init__(self, input_dim: int, config: MLCConfig | None = None) -> None:
        self.config = config or MLCConfig()
        torch.manual_seed(self.config.seed)
        self.net = MLCNet(input_dim, self.config.hidden_dim, self.config.z_dim)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.history: list[dict[str, float]] = []

    def _batches(self, n: int):
        order = torch.randperm(n, generator=self.generator)
        size = min(self.config.batch_size, n)
        for start in range(0, n - size + 1, size):  # full batches: the rates depend on n
            yield order[start : start + size]

    def _optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.net.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.config.lr, weight_decay=self.config.weight_decay)

    def initialize(self, x: torch.Tensor, augment=None) -> None:
        """One-shot init: self-supervised feature head (TCR of two views + agreement), then C := Z's head."""
        cfg, augment = self.config, augment or feature_noise(self.config.noise, self.config.drop)
        optimizer = self._optimizer()
        self.net.train()
        for epoch in range(cfg.init_epochs):
            losses = []
            for index in self._batches(len(x)):
                z1, _ = self.net(augment(x[index], self.generator))
                z2, _ = self.net(augment(x[index], self.generator))
                rate = 0.5 * (coding_rate(z1, cfg.epsilon) + coding_rate(z2, cfg.epsilon))
                loss = -rate - cfg.agreement * (z1 * z2).sum(-1).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            self.history.append({"phase": 0.0, "epoch": float(epoch), "loss": float(np.mean(losses))})
        self.net.cluster_head.load_state_dict(self.net.feature_head.state_dict())

    def fit(self, x: torch.Tensor, augment=None, log: Callable[[str], None] | None = None) -> MLC:
        x = torch.as_tensor(x, dtype=torch.float32)
        self.initialize(x, augment)
        optimizer = self._optimizer()
        self.net.train()
        for epoch in range(self.config.epochs):
            parts: list[dict[str, float]] = []
            for index in self._batches(len(x)):
                z, c = self.net(x[index])
                loss, logs = mlc_loss(z, c, self.config)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                parts.append({"loss": loss.item(), **logs})
            mean = {k: float(np.mean([p[k] for p in parts])) for k in parts[0]}
            self.history.append({"phase": 1.0, "epoch": float(epoch), **mean})
            if log:
                log(f"mlc epoch {epoch + 1}/{self.config.epochs}: " + " ".join(f"{k}={v:.3f}" for k, v in mean.items()))
        return self

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.net.eval()
        return self.net(torch.as_tensor(x, dtype=torch.float32))

    @torch.no_grad()
    def membership(self, x: torch.Tensor) -> torch.Tensor:
        """Gamma (n, n) of the whole of ``x``: the doubly stochastic membership the clusters come from."""
        _, c = self.embed(x)
        return sinkhorn(similarity(c.double(), self.config), self.config.eta, self.config.predict_iters)

    def predict(self, x: torch.Tensor) -> np.ndarray:
        """Cluster labels (n,): spectral clustering of the symmetrised membership Gamma."""
        from sklearn.cluster import SpectralClustering

        gamma = self.membership(x).numpy()
        affinity = 0.5 * (gamma + gamma.T)
        model = SpectralClustering(self.config.num_clusters, affinity="precomputed",
                                   random_state=self.config.seed, assign_labels="kmeans")
        return model.fit_predict(affinity)

    @torch.no_grad()
    def rate_reduction_of(self, x: torch.Tensor, clusters: np.ndarray) -> float:
        """Delta R(Z, Pi) of the fitted features of ``x`` under the hard partition ``clusters``: the MCR2
        criterion MLC maximises, with no labels, so it can pick MLC's hyperparameters (gamma, eta) without
        the evaluation labels."""
        z, _ = self.embed(x)
        membership = one_hot_membership(torch.as_tensor(np.asarray(clusters), dtype=torch.long))
        return float(rate_reduction(z.double(), membership.double(), self.config.epsilon))
