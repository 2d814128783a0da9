"""ALLoRA: the per-row step scale 1/sqrt(||row||^2 + 1/eta^2) on hand-made tensors, and the LoRA config."""

from __future__ import annotations

import math

import pytest
import torch
from toys import TinyMLP

import mm
from train.rules.allora import ALLoRA, allora_coefficient, allora_lora_config


def _param(rows):
    p = torch.nn.Parameter(torch.tensor(rows, dtype=torch.float64))
    p.grad = torch.ones_like(p)
    return p


def test_sgd_step_scales_each_row_by_its_coefficient():
    p = _param([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])  # row norms 5, 0, 1
    ALLoRA([p], lr=0.1, eta=2.0, betas=None).step()
    expected = torch.tensor([
        [3.0 - 0.1 / math.sqrt(25.25), 4.0 - 0.1 / math.sqrt(25.25)],
        [-0.1 * 2.0, -0.1 * 2.0],  # at zero norm the rate is boosted by eta
        [1.0 - 0.1 / math.sqrt(1.25), -0.1 / math.sqrt(1.25)],
    ], dtype=torch.float64)
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-12)


def test_vectors_use_the_whole_tensor_norm_and_tensor_granularity_too():
    vector = _param([3.0, 4.0])
    ALLoRA([vector], lr=1.0, eta=1.0, betas=None).step()
    torch.testing.assert_close(vector.detach(), torch.tensor([3.0, 4.0], dtype=torch.float64) - 1 / math.sqrt(26))
    matrix = _param([[3.0, 0.0], [0.0, 4.0]])
    ALLoRA([matrix], lr=1.0, eta=1.0, betas=None, granularity="tensor").step()
    start = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(matrix.detach(), start - 1 / math.sqrt(26))


def test_coefficient_is_eta_at_zero_and_falls_like_one_over_the_norm():
    eta = 4.0
    norms = torch.tensor([0.0, 0.1, 1.0, 10.0, 1000.0], dtype=torch.float64)
    coefficient = allora_coefficient(torch.diag(norms), eta).flatten()
    torch.testing.assert_close(coefficient, 1 / torch.sqrt(norms**2 + 1 / eta**2))
    assert coefficient[0] == eta
    assert bool((coefficient[1:] < coefficient[:-1]).all())
    assert abs(coefficient[-1] * 1000.0 - 1.0) < 1e-6


def test_adam_first_step_is_sign_times_coefficient_and_gradient_mode_cancels():
    rows = [[3.0, 4.0], [0.0, 0.0]]
    step_mode, grad_mode = _param(rows), _param(rows)
    for p in (step_mode, grad_mode):
        p.grad = torch.tensor([[2.0, -0.5], [0.3, -7.0]], dtype=torch.float64)
    ALLoRA([step_mode], lr=0.01, eta=2.0, eps=0.0).step()
    ALLoRA([grad_mode], lr=0.01, eta=2.0, eps=0.0, apply_to="gradient").step()
    signs = torch.tensor([[1.0, -1.0], [1.0, -1.0]], dtype=torch.float64)
    coefficient = torch.tensor([[1 / math.sqrt(25.25)], [2.0]], dtype=torch.float64)
    start = torch.tensor(rows, dtype=torch.float64)
    torch.testing.assert_close(step_mode.detach(), start - 0.01 * signs * coefficient)
    # Adam normalises the scaled gradient: its first step is lr * sign(g) whatever the coefficient.
    torch.testing.assert_close(grad_mode.detach(), start - 0.01 * signs)


def test_weight_decay_is_decoupled():
    p = _param([[0.0, 2.0]])
    p.grad = torch.zeros_like(p)
    ALLoRA([p], lr=0.1, eta=1.0, betas=None, weight_decay=0.5).step()
    torch.testing.assert_close(p.detach(), torch.tensor([[0.0, 2.0 * (1 - 0.05)]], dtype=torch.float64))


@pytest.mark.parametrize("method", ["lora", "lora_xs", "loldu"])
def test_trains_any_adapter(method):
    torch.manual_seed(0)
    model, x = TinyMLP(), torch.randn(64, 12)
    y = x[:, :5].argmax(dim=1)
    config = (allora_lora_config(targets=["fc1", "fc2"], r=4) if method == "lora"
              else mm.AdapterConfig.from_dict({"method": method, "targets": ["fc1", "fc2"], "r": 4}))
    mm.attach(model, config)
    model.head.requires_grad_(True)
    optimizer = ALLoRA([p for p in model.parameters() if p.requires_grad], lr=1e-2, eta=4.0)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses[::10]


def test_allora_config_is_scaling_free_and_dropout_free():
    config = allora_lora_config(targets=["q_proj"], r=16)
    assert config.scaling == 1.0 and config.dropout == 0.0 and config.r == 16
    assert allora_lora_config(targets=["q_proj"]).scaling == 1.0
    with pytest.raises(mm.ConfigError, match="'alpha', 'dropout'"):
        allora_lora_config(targets=["q_proj"], alpha=16.0, dropout=0.1)
    with pytest.raises(ValueError, match="eta must be > 0"):
        ALLoRA([_param([1.0])], eta=0.0)
