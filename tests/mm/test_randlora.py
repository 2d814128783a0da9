"""RandLoRA: full-rank updates from diagonal scalings of frozen random bases; parity with PEFT."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import mm
from mm.adapters.randlora import RandLoRAConfig, num_bases


class ThreeLayers(nn.Module):
    """in < out, square and in > out: both orientations of the trainable side (gamma on the smaller dim)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 24), nn.Linear(24, 24), nn.Linear(24, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _three_layers() -> ThreeLayers:
    torch.manual_seed(0)
    return ThreeLayers()


def test_update_is_full_rank_beyond_r():
    r = 4
    model = _three_layers()
    mm.attach(model, RandLoRAConfig(targets=["fc1", "fc2", "fc3"], r=r))
    torch.manual_seed(1)
    for name, layer in mm.adapted_layers(model):
        adapter = layer.adapters["default"]
        with torch.no_grad():
            adapter.randlora_lambda.normal_()
            adapter.randlora_gamma.normal_()
        delta = adapter.delta_weight(layer.base)
        rank = int(torch.linalg.matrix_rank(delta.double()))
        assert rank > r, f"{name}: rank {rank} is not above r={r}"
        assert rank == min(delta.shape), f"{name}: rank {rank}, full rank is {min(delta.shape)}"


def test_trainable_params_formula():
    r = 5
    model = _three_layers()
    mm.attach(model, RandLoRAConfig(targets=["fc1", "fc2", "fc3"], r=r))
    expected = 0
    for i, o in [(12, 24), (24, 24), (24, 8)]:
        n = math.ceil(min(i, o) / r)
        assert n == num_bases(i, o, r)
        expected += r * n + n * min(i, o)  # lambda (r x N) + gamma (N x min dim)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_factorized_and_materialized_paths_agree():
    torch.manual_seed(0)
    base = nn.Linear(24, 8)
    adapter = RandLoRAConfig(targets=["x"], r=4).build(24, 8, base.weight)
    with torch.no_grad():
        adapter.randlora_lambda.normal_()
    few, many = torch.randn(2, 24), torch.randn(400, 24)
    assert not adapter._materialize_cheaper(2) and adapter._materialize_cheaper(400)
    for x in (few, many):
        out = base(x)
        torch.testing.assert_close(adapter(x, out.clone(), base) - out, adapter.delta(x, base), rtol=1e-4, atol=1e-5)


def test_layers_of_one_shape_share_one_copy_of_the_bases():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    mm.attach(model, RandLoRAConfig(targets=["0", "1"], r=4))
    first, second = (model[i].adapters["default"].bases() for i in (0, 1))
    assert first[0] is second[0] and first[1] is second[1]
    assert all(key.rpartition(".")[2] in ("randlora_lambda", "randlora_gamma") for key in model.state_dict()
               if ".adapters." in key)


def test_parity_with_peft_randlora_on_identical_bases():
    """Same outputs as PEFT's ``RandLoraConfig`` when both use PEFT's bases and the same lambda, gamma.

    PEFT draws one shared pair, A (r, 1, largest min-dim) and B (largest max-dim, N_max, r), and slices
    each layer's part: A[:, 0, :min_dim] and B[:max_dim, :N]. Its flattening then pairs column
    b' r + k' of B (basis b', rank k') with row k N + b of the scaled A (rank k, basis b), i.e. PEFT's
    column k N + b plays our basis b, rank k. So our B[:, b, k] = flat_B[:, k N + b], which is
    ``flat_B.reshape(d, r, N).transpose(1, 2)``; A, lambda (r, N) and gamma (N, min-dim) copy as they are.
    Our own bases come from our seed, so this injects PEFT's through ``use_bases``.
    """
    peft = pytest.importorskip("peft")
    r, alpha = 4, 8.0
    reference = peft.get_peft_model(
        _three_layers(), peft.RandLoraConfig(r=r, target_modules=["fc1", "fc2", "fc3"], randlora_alpha=alpha)
    )
    model = _three_layers()
    mm.attach(model, RandLoRAConfig(targets=["fc1", "fc2", "fc3"], r=r, alpha=alpha))
    gen = torch.Generator().manual_seed(5)
    for name in ("fc1", "fc2", "fc3"):
        theirs = getattr(reference.base_model.model, name)
        ours = getattr(model, name).adapters["default"]
        with torch.no_grad():
            theirs.randlora_lambda["default"].copy_(torch.randn(theirs.randlora_lambda["default"].shape, generator=gen))
            theirs.randlora_gamma["default"].mul_(1 + torch.rand(theirs.randlora_gamma["default"].shape, generator=gen))
            ours.randlora_lambda.copy_(theirs.randlora_lambda["default"])
            ours.randlora_gamma.copy_(theirs.randlora_gamma["default"])
        n, d, k = ours.num_bases, ours.max_dim, ours.min_dim
        flat_b = theirs.randlora_B["default"][:d, :n, :].reshape(d, n * r)
        ours.use_bases(theirs.randlora_A["default"][:, 0, :k], flat_b.reshape(d, r, n).transpose(1, 2))
    x = torch.randn(6, 12, generator=gen)
    expected = reference(x)
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    with reference.disable_adapter():
        assert (reference(x) - expected).abs().max() > 1e-3  # the comparison is not between two base models
