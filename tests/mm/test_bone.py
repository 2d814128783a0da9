"""Bone: delta W_ij = W_ij b_i + b_i (the weight guide); parity with PEFT's MiSS 'bat'; exact unmerge."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mm
from mm.adapters.bone import BoneConfig, bone_delta


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 8))


def _randomise(model: nn.Module, seed: int = 1, scale: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in mm.adapted_layers(model):
            block = layer.adapters["default"].bone_block
            block.copy_(torch.randn(block.shape, generator=gen) * scale)


def test_delta_is_the_block_affine_map_of_each_weight_block():
    r = 4
    weight = torch.randn(8, 12)
    block = torch.randn(2, r, r)
    delta = bone_delta(weight, block)
    for i in range(2):
        for j in range(3):
            w_ij = weight[i * r:(i + 1) * r, j * r:(j + 1) * r]
            torch.testing.assert_close(delta[i * r:(i + 1) * r, j * r:(j + 1) * r], w_ij @ block[i] + block[i])
    # The weight guide: the same trainable block moves two different weights differently.
    assert not torch.allclose(bone_delta(torch.randn(8, 12), block), delta)


def test_forward_applies_the_guided_update_and_params_are_out_times_r():
    model = _mlp()
    mm.attach(model, BoneConfig(targets=["0", "2"], r=4))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 24 * 4 + 8 * 4
    _randomise(model)
    x = torch.randn(5, 12)
    layer = model[0]
    expected = layer.base(x) + x @ bone_delta(layer.base.weight, layer.adapters["default"].bone_block).T
    torch.testing.assert_close(layer(x), expected)


def test_parity_with_peft_miss_bat():
    """PEFT's MiSS with init_weights='bat' is the same formula with the same (out/r, r, r) block."""
    peft = pytest.importorskip("peft")
    reference = peft.get_peft_model(_mlp(), peft.MissConfig(r=4, target_modules=["0", "2"], init_weights="bat"))
    model = _mlp()
    mm.attach(model, BoneConfig(targets=["0", "2"], r=4))
    _randomise(model)
    for index in (0, 2):
        with torch.no_grad():
            reference.base_model.model[index].miss_block["default"].copy_(model[index].adapters["default"].bone_block)
    x = torch.randn(7, 12)
    expected = reference(x)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    with reference.disable_adapter():
        assert (reference(x) - expected).abs().max() > 1e-3
    # Merged weights agree too.
    reference.merge_adapter()
    mm.merge(model)
    for index in (0, 2):
        torch.testing.assert_close(model[index].base.weight, reference.base_model.model[index].base_layer.weight,
                                   rtol=1e-5, atol=1e-6)


def test_unmerge_restores_w_and_delta_is_stable_while_merged():
    model = _mlp()
    mm.attach(model, BoneConfig(targets=["0", "2"], r=4))
    _randomise(model, scale=0.1)  # the contract suite's perturbation size
    original = {i: model[i].base.weight.detach().clone() for i in (0, 2)}
    deltas = {i: model[i].adapters["default"].delta_weight(model[i].base).clone() for i in (0, 2)}
    mm.merge(model)
    for i in (0, 2):
        # Asked while merged, the delta is still the one relative to the original W.
        torch.testing.assert_close(model[i].adapters["default"].delta_weight(model[i].base), deltas[i],
                                   rtol=1e-5, atol=1e-5)
    mm.unmerge(model)
    for i in (0, 2):
        # W is recovered from the rounded merged weight: the error is a few ulps of W', scaled by (I + b)^-1.
        assert (model[i].base.weight - original[i]).abs().max() < 1e-6
    # Merge -> train -> merge again: the changed block is picked up, not the stale merge record.
    with torch.no_grad():
        model[0].adapters["default"].bone_block.mul_(2)
    mm.merge(model)
    expected = original[0] + bone_delta(original[0], model[0].adapters["default"].bone_block.detach())
    torch.testing.assert_close(model[0].base.weight, expected, rtol=1e-5, atol=1e-6)
    mm.unmerge(model)
    assert (model[0].base.weight - original[0]).abs().max() < 1e-6


def test_r_must_divide_both_dimensions():
    with pytest.raises(mm.ConfigError, match="'r'=5 must divide both in_features=12 and out_features=24"):
        BoneConfig(targets=["x"], r=5).build(12, 24, torch.zeros(24, 12))
