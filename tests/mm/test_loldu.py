"""LoLDU: frozen LDU factors of W, only the diagonal z and the scale sigma train; exactly the base at init."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from toys import TinyMLP

import mm
from mm.adapters.loldu import ldu_factors


def _seeded_mlp(seed: int = 0, **kwargs) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP(**kwargs)


@pytest.mark.parametrize("shape", [(24, 12), (12, 24), (16, 16)])
def test_full_rank_ldu_reconstructs_w_and_factors_have_their_shape(shape):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    k = min(shape)
    lower, diagonal, upper = ldu_factors(weight, k)
    torch.testing.assert_close(lower @ torch.diag(diagonal) @ upper, weight, rtol=1e-10, atol=1e-10)
    # U' is unit upper-triangular; P^T (P L) = L is unit lower-triangular (P a permutation: rows of one 1).
    assert torch.equal(torch.diagonal(upper), torch.ones(k, dtype=weight.dtype))
    assert torch.equal(upper[:, :k].tril(-1), torch.zeros(k, k, dtype=weight.dtype))
    p, _, _ = torch.linalg.lu(weight)
    unit_lower = p.T @ lower
    assert torch.equal(unit_lower[:k, :k].triu(1), torch.zeros(k, k, dtype=weight.dtype))
    torch.testing.assert_close(torch.diagonal(unit_lower[:k, :k]), torch.ones(k, dtype=weight.dtype))


def test_same_function_as_the_papers_residual_formulation():
    """W_res + sigma P L_r diag(z) U'_r (the paper) == W + P L_r diag(sigma z - sigma0 D_r) U'_r (ours)."""
    model = _seeded_mlp()
    mm.attach(model, mm.AdapterConfig.from_dict({"method": "loldu", "targets": ["fc2"], "r": 5, "alpha": 10.0}))
    adapter, weight = model.fc2.adapters["default"], model.fc2.base.weight.detach()
    lower, d_r, upper = ldu_factors(weight, 5)
    sigma0 = 10.0 / 5
    residual = weight - sigma0 * lower @ torch.diag(d_r) @ upper
    with torch.no_grad():
        adapter.diagonal.add_(torch.randn(5, generator=torch.Generator().manual_seed(1)))
        adapter.scale.mul_(1.7)
    papers = residual + adapter.scale * lower @ torch.diag(adapter.diagonal) @ upper
    torch.testing.assert_close(weight + adapter.delta_weight(model.fc2.base), papers, rtol=1e-5, atol=1e-5)
    x = torch.randn(6, 24)
    torch.testing.assert_close(model.fc2(x), x @ papers.T + model.fc2.base.bias, rtol=1e-5, atol=1e-5)


def test_exactly_the_base_output_at_init_and_base_weight_untouched():
    base, model = _seeded_mlp(), _seeded_mlp()
    before = {n: p.clone() for n, p in model.named_parameters()}
    mm.attach(model, mm.AdapterConfig.from_dict({"method": "loldu", "targets": ["fc1", "fc2"], "r": 6}))
    x = torch.randn(5, 12)
    assert torch.equal(model(x), base(x))
    assert torch.equal(model.fc1.base.weight, before["fc1.weight"])
    assert model.fc1.adapters["default"].coefficients().abs().max() == 0


@pytest.mark.parametrize(("train_scale", "per_layer"), [(True, 7), (False, 6)])
def test_trainable_count_is_r_plus_one_per_layer(train_scale, per_layer):
    model = _seeded_mlp()
    mm.attach(model, mm.AdapterConfig.from_dict({"method": "loldu", "targets": ["fc1", "fc2"], "r": 6,
                                                  "train_scale": train_scale}))
    assert mm.trainable_report(model).trainable == 2 * per_layer
    model(torch.randn(3, 12)).pow(2).sum().backward()
    adapter = model.fc1.adapters["default"]
    assert adapter.diagonal.grad is not None and adapter.diagonal.grad.abs().sum() > 0
    assert (adapter.scale.grad is not None) == train_scale


def test_full_rank_uses_every_component_of_each_layer():
    model = _seeded_mlp()  # fc1 12 -> 24 (k = 12), head 24 -> 5 (k = 5)
    mm.attach(model, mm.AdapterConfig.from_dict({"method": "loldu", "targets": ["fc1", "head"], "r": 4,
                                                  "alpha": 4.0, "full_rank": True}))
    assert mm.trainable_report(model).trainable == (12 + 1) + (5 + 1)
    adapter = model.fc1.adapters["default"]
    with torch.no_grad():  # with all components and sigma0 = 1, z = 0 removes W entirely
        adapter.diagonal.zero_()
    torch.testing.assert_close(model.fc1(torch.eye(12)), model.fc1.base.bias.expand(12, 24), rtol=0, atol=1e-5)


def test_checkpoint_holds_only_diagonal_and_scale(tmp_path):
    model, x = _seeded_mlp(), torch.randn(4, 12)
    mm.attach(model, mm.AdapterConfig.from_dict({"method": "loldu", "targets": ["fc1", "fc2"], "r": 3}))
    with torch.no_grad():
        for _, layer in mm.adapted_layers(model):
            layer.adapters["default"].diagonal.mul_(1.5)
    path = mm.save_adapters(model, tmp_path / "loldu.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    assert shapes == {"default/fc1.diagonal": (3,), "default/fc1.scale": (), "default/fc2.diagonal": (3,),
                      "default/fc2.scale": ()}
    fresh = _seeded_mlp()
    mm.load_adapters(fresh, path)
    assert torch.equal(fresh(x), model(x))


def test_trains_towards_a_reachable_target():
    config = mm.AdapterConfig.from_dict({"method": "loldu", "targets": ["fc1", "fc2"], "r": 8})
    teacher, model = _seeded_mlp(), _seeded_mlp()
    x = torch.randn(32, 12, generator=torch.Generator().manual_seed(1))
    for m in (teacher, model):
        mm.attach(m, config)
    with torch.no_grad():
        for _, layer in mm.adapted_layers(teacher):
            layer.adapters["default"].diagonal.mul_(1.5)
        target = teacher(x)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    first = None
    for _ in range(40):
        loss = (model(x) - target).pow(2).mean()
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05 * first, f"LoLDU does not learn: {first:.2e} -> {loss.item():.2e}"


def test_bad_rank_is_refused():
    with pytest.raises(mm.ConfigError, match="key 'r' is 13"):
        mm.attach(_seeded_mlp(), mm.AdapterConfig.from_dict({"method": "loldu", "targets": ["fc1"], "r": 13}))
    weight = torch.zeros(4, 4)
    with pytest.raises(mm.ConfigError, match="zero pivot"):
        ldu_factors(weight, 2)
