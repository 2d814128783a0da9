"""LoRA-SB: the init is the best rank-r approximation of the first full fine-tuning step, computed on data."""

from __future__ import annotations

import pytest
import torch
from toys import TOYS, TinyMLP

import mm
from mm.adapters import lora_sb
from mm.layer import weight_out_in


def _seeded_mlp(seed: int = 0) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP()


def _batches(n: int = 3, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 12, generator=gen), torch.randint(0, 5, (8,), generator=gen)) for _ in range(n)]


def _cross_entropy(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def _full_gradients(batches, names=("fc1", "fc2")) -> dict[str, torch.Tensor]:
    """Reference: the summed gradient of the loss w.r.t. the plain model's weights, by ordinary backward."""
    model = _seeded_mlp()
    for batch in batches:
        _cross_entropy(model, batch).backward()
    return {name: model.get_submodule(name).weight.grad.clone() for name in names}


def _best_rank(update: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(update, full_matrices=False)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


@pytest.mark.parametrize("update", ["adam", "sgd"])
def test_init_is_best_rank_r_approximation_of_first_full_step(update):
    batches, r, lr = _batches(), 3, 2e-3
    model = _seeded_mlp()
    config = mm.AdapterConfig.from_dict({"method": "lora_sb", "targets": ["fc1", "fc2"], "r": r, "alpha": 6.0,
                                         "update": update, "init_lr": lr})
    mm.attach(model, config)
    captured = lora_sb.initialize(model, batches, _cross_entropy)
    for name, grad in _full_gradients(batches).items():
        first_step = -lr * (grad.sign() if update == "adam" else grad / len(batches))
        layer = model.get_submodule(name)
        adapter = layer.adapters["default"]
        torch.testing.assert_close(adapter.delta_weight(layer.base), _best_rank(first_step, r), rtol=1e-4,
                                   atol=1e-6)
        # B and A are orthonormal; R is diagonal (the singular values over the scaling s = alpha / r = 2).
        torch.testing.assert_close(adapter.lora_B.T @ adapter.lora_B, torch.eye(r), rtol=0, atol=1e-5)
        torch.testing.assert_close(adapter.lora_A @ adapter.lora_A.T, torch.eye(r), rtol=0, atol=1e-5)
        assert torch.equal(adapter.lora_R, torch.diag(torch.diagonal(adapter.lora_R)))
        assert 0 < captured[name] <= 1.0


def test_model_starts_one_approximate_full_step_from_the_base():
    batches = _batches()
    model = _seeded_mlp()
    mm.attach(model, mm.AdapterConfig.from_dict({"method": "lora_sb", "targets": ["fc1", "fc2"], "r": 4}))
    lora_sb.initialize(model, batches, _cross_entropy)
    stepped = _seeded_mlp()
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            layer = model.get_submodule(name)
            stepped.get_submodule(name).weight.add_(layer.adapters["default"].delta_weight(layer.base))
    x = batches[0][0]
    torch.testing.assert_close(model(x), stepped(x), rtol=1e-5, atol=1e-6)
    assert (model(x) - _seeded_mlp()(x)).abs().max() > 1e-4


def test_a_step_on_r_is_the_full_gradient_projected_onto_the_chosen_subspace():
    """Chain rule through s B R A: the weight-space step of dL/dR is s^2 B B^T G A^T A."""
    batches = _batches()
    model = _seeded_mlp()
    mm.attach(model, mm.AdapterConfig.from_dict({"method": "lora_sb", "targets": ["fc1"], "r": 3, "alpha": 6.0}))
    lora_sb.initialize(model, batches, _cross_entropy)
    layer = model.fc1
    adapter, s = layer.adapters["default"], 2.0
    weight = layer.base.weight
    weight.requires_grad_(True)
    _cross_entropy(model, batches[0]).backward()
    grad_w = weight.grad  # same as the full fine-tuning gradient at the current point (W + s B R A)
    b, a = adapter.lora_B, adapter.lora_A
    torch.testing.assert_close(s * b @ adapter.lora_R.grad @ a, s**2 * b @ b.T @ grad_w @ a.T @ a,
                               rtol=1e-4, atol=1e-7)


def test_trainable_count_is_r_squared_and_factors_are_stored(tmp_path):
    model = _seeded_mlp()
    mm.attach(model, mm.AdapterConfig.from_dict({"method": "lora_sb", "targets": ["fc1", "fc2"], "r": 5}))
    lora_sb.initialize(model, _batches(), _cross_entropy)
    assert mm.trainable_report(model).trainable == 2 * 5 * 5
    path = mm.save_adapters(model, tmp_path / "sb.safetensors")
    fresh = _seeded_mlp()
    mm.load_adapters(fresh, path)  # no data needed: B, A and the init flag come from the file
    x = _batches()[0][0]
    assert torch.equal(fresh(x), model(x))


def test_initialize_leaves_no_trace_on_the_base_weights():
    model = _seeded_mlp()
    mm.attach(model, mm.AdapterConfig.from_dict({"method": "lora_sb", "targets": ["fc1", "fc2"], "r": 2}))
    lora_sb.initialize(model, _batches(), _cross_entropy, max_batches=1)
    for name, param in model.named_parameters():
        assert param.grad is None, f"{name} got a .grad from the initialisation"
        assert param.requires_grad == (".adapters." in name), name
    assert mm.active_adapters(model) == ["default"]


def test_max_batches_limits_the_calibration():
    batches = _batches(4)
    one, two = _seeded_mlp(), _seeded_mlp()
    for model, count in ((one, 1), (two, 4)):
        mm.attach(model, mm.AdapterConfig.from_dict({"method": "lora_sb", "targets": ["fc1"], "r": 2,
                                                      "update": "sgd"}))
        lora_sb.initialize(model, batches, _cross_entropy, max_batches=count)
    grad = _full_gradients(batches[:1], names=("fc1",))["fc1"]
    torch.testing.assert_close(one.fc1.adapters["default"].delta_weight(one.fc1.base),
                               _best_rank(-1e-3 * grad, 2), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(one.fc1.adapters["default"].lora_A, two.fc1.adapters["default"].lora_A)


def test_uninitialised_adapter_says_what_it_needs():
    model = _seeded_mlp()
    mm.attach(model, mm.AdapterConfig.from_dict({"method": "lora_sb", "targets": ["fc1"], "r": 2}))
    with pytest.raises(RuntimeError, match="not initialised.*initialize\\(model, batches, loss_fn"):
        model(torch.randn(2, 12))
    with pytest.raises(ValueError, match="at least one calibration batch"):
        lora_sb.initialize(model, [], _cross_entropy)
    with pytest.raises(ValueError, match="calibration batches and a loss function"):
        lora_sb.initialize(model, _batches(), None)
    with pytest.raises(ValueError, match="no LoRA-SB adapter named 'other'"):
        lora_sb.initialize(model, _batches(), _cross_entropy, name="other")


def test_conv1d_gradient_is_taken_in_out_in_orientation():
    toy = TOYS["gpt2"]
    model, x = toy.build(), toy.make_input()
    mm.attach(model, mm.AdapterConfig.from_dict({"method": "lora_sb", "targets": ["c_fc"], "r": 2,
                                                  "update": "sgd"}))

    def loss_fn(m, batch):
        return m(batch).logits.float().pow(2).mean()

    lora_sb.initialize(model, [x], loss_fn)
    reference = toy.build()
    loss_fn(reference, x).backward()
    layer_name, layer = next(iter(mm.adapted_layers(model)))
    grad = reference.get_submodule(layer_name).weight.grad.T  # Conv1D stores (in, out)
    assert tuple(weight_out_in(layer.base).shape) == tuple(grad.shape)
    torch.testing.assert_close(layer.adapters["default"].delta_weight(layer.base), _best_rank(-1e-3 * grad, 2),
                               rtol=1e-4, atol=1e-8)
