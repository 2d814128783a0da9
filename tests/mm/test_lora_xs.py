"""LoRA-XS: frozen SVD factors of W around a trainable r x r core; r^2 trainables per layer; only R saved."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from toys import TOYS, TinyMLP

import mm
from mm.layer import weight_out_in


def _xs_layers(model, name="default"):
    return [(layer_name, layer, layer.adapters[name]) for layer_name, layer in mm.adapted_layers(model)]


@pytest.mark.parametrize("toy_name", ["mlp", "gpt2"])  # gpt2: Conv1D stores its weight (in, out)
def test_outer_factors_give_the_truncated_svd_of_w(toy_name):
    toy = TOYS[toy_name]
    model = toy.build()
    r = 3
    mm.attach(model, mm.AdapterConfig.from_dict({"method": "lora_xs", "targets": toy.targets, "r": r}))
    for layer_name, layer, adapter in _xs_layers(model):
        weight = weight_out_in(layer.base).detach()
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        best_rank_r = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
        # With R = I the update B R A is exactly W's best rank-r approximation.
        torch.testing.assert_close(adapter.lora_B @ adapter.lora_A, best_rank_r, rtol=1e-4, atol=1e-5,
                                   msg=f"{layer_name}: B A is not the rank-{r} SVD of W")
        torch.testing.assert_close(adapter.lora_B.T @ adapter.lora_B, torch.eye(r), rtol=0, atol=1e-5)
        # Canonical signs: each column of B has its largest-magnitude entry positive.
        assert bool((adapter.lora_B.gather(0, adapter.lora_B.abs().argmax(0, keepdim=True)) > 0).all())


def test_trainable_count_is_r_squared_per_layer_whatever_the_layer_size():
    model = TinyMLP(d_in=12, hidden=24, d_out=5)
    for r in (1, 2, 5):
        fresh = TinyMLP(d_in=12, hidden=24, d_out=5)
        fresh.load_state_dict(model.state_dict())
        mm.attach(fresh, mm.AdapterConfig.from_dict({"method": "lora_xs", "targets": ["fc1", "fc2"], "r": r}))
        trainable = [p for p in fresh.parameters() if p.requires_grad]
        assert [tuple(p.shape) for p in trainable] == [(r, r), (r, r)]
        assert mm.trainable_report(fresh).trainable == 2 * r * r


def _seeded_mlp(seed: int = 0) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP()


def test_checkpoint_holds_only_the_core_and_reloads_exactly(tmp_path):
    model, x = _seeded_mlp(), torch.randn(4, 12)
    mm.attach(model, mm.AdapterConfig.from_dict({"method": "lora_xs", "targets": ["fc1", "fc2"], "r": 4}))
    with torch.no_grad():
        for _, _, adapter in _xs_layers(model):
            adapter.lora_R.normal_(std=0.3)
    expected = model(x)
    path = mm.save_adapters(model, tmp_path / "xs.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    assert shapes == {"default/fc1.lora_R": (4, 4), "default/fc2.lora_R": (4, 4)}
    fresh = _seeded_mlp()
    mm.load_adapters(fresh, path)  # B and A are rebuilt from the same base weights
    assert torch.equal(fresh(x), expected)


def test_zero_core_starts_at_the_base_and_still_trains():
    """dL/dR = s B^T G A^T does not vanish at R = 0: a zero core trains to a reachable target."""
    config = mm.AdapterConfig.from_dict({"method": "lora_xs", "targets": ["fc1", "fc2"], "r": 4, "init_std": 0.0})
    base, teacher, model = _seeded_mlp(), _seeded_mlp(), _seeded_mlp()
    x = torch.randn(32, 12, generator=torch.Generator().manual_seed(1))
    mm.attach(model, config)
    assert torch.equal(model(x), base(x))
    mm.attach(teacher, config)
    with torch.no_grad():
        for _, _, adapter in _xs_layers(teacher):
            adapter.lora_R.normal_(std=0.2, generator=torch.Generator().manual_seed(2))
        target = teacher(x)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(60):
        loss = (model(x) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0], f"LoRA-XS does not learn: {losses[0]:.2e} -> {losses[-1]:.2e}"


def test_paper_init_is_a_tiny_gaussian():
    torch.manual_seed(0)
    model = TinyMLP(d_in=64, hidden=64)
    mm.attach(model, mm.AdapterConfig.from_dict({"method": "lora_xs", "targets": ["fc2"], "r": 32}))
    core = model.fc2.adapters["default"].lora_R
    assert 0.8e-5 < core.std().item() < 1.2e-5


def test_rank_above_the_layer_rank_is_refused():
    with pytest.raises(mm.ConfigError, match="key 'r' is 13.*rank at most 12"):
        mm.attach(TinyMLP(), mm.AdapterConfig.from_dict({"method": "lora_xs", "targets": ["fc1"], "r": 13}))
    with pytest.raises(mm.ConfigError, match="init_std"):
        mm.AdapterConfig.from_dict({"method": "lora_xs", "targets": ["fc1"], "init_std": -1.0})
