"""NOLA: A and B are mixtures of seeded random bases; only the coefficients train and get saved."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from torch import nn

import mm
from mm.adapters.nola import NOLAConfig, nola_bases


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 6))


def _trainable_per_layer(model: nn.Module) -> list[int]:
    return [sum(p.numel() for p in layer.adapters.parameters() if p.requires_grad)
            for _, layer in mm.adapted_layers(model)]


@pytest.mark.parametrize("r", [1, 4, 16])
def test_trainable_count_is_independent_of_rank_and_shape(r):
    model = _mlp()
    mm.attach(model, NOLAConfig(targets=["0", "2", "4"], r=r, num_basis_a=20, num_basis_b=30))
    # Three layers of three different shapes, any rank: each trains exactly k_A + k_B numbers.
    assert _trainable_per_layer(model) == [50, 50, 50]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 3 * (20 + 30)


def test_factors_are_mixtures_of_the_seeded_bases():
    model = _mlp()
    mm.attach(model, NOLAConfig(targets=["2"], r=3, num_basis_a=5, num_basis_b=7))
    adapter = model[2].adapters["default"]
    with torch.no_grad():
        adapter.nola_beta.normal_()
    bases_a, bases_b = nola_bases(int(adapter.basis_seed), 3, 24, 40, 5, 7)
    lora_a = sum(c * basis for c, basis in zip(adapter.nola_alpha.detach(), bases_a, strict=True))
    lora_b = sum(c * basis for c, basis in zip(adapter.nola_beta.detach(), bases_b, strict=True))
    torch.testing.assert_close(adapter.delta_weight(model[2].base), lora_b @ lora_a * adapter.scaling)


def test_layers_get_distinct_bases_and_the_file_holds_only_coefficients_and_seeds(tmp_path):
    model = _mlp()
    config = NOLAConfig(targets=["0", "2"], r=4, num_basis_a=8, num_basis_b=8, seed=3)
    mm.attach(model, config)
    seeds = [int(layer.adapters["default"].basis_seed) for _, layer in mm.adapted_layers(model)]
    assert len(set(seeds)) == 2
    path = mm.save_adapters(model, tmp_path / "nola.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        stored = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    assert sorted(key.rpartition(".")[2] for key in stored) == sorted(["nola_alpha", "nola_beta", "basis_seed"] * 2)
    assert sum(t.numel() for t in stored.values()) == 2 * (8 + 8 + 1)  # no basis tensor anywhere


def test_reload_regenerates_the_bases_from_the_seed(tmp_path):
    model = _mlp()
    mm.attach(model, NOLAConfig(targets=["0", "2", "4"], r=4, num_basis_a=8, num_basis_b=8, seed=11))
    with torch.no_grad():
        for _, layer in mm.adapted_layers(model):
            layer.adapters["default"].nola_beta.normal_()
    x = torch.randn(5, 12)
    expected = model(x)
    path = mm.save_adapters(model, tmp_path / "nola.safetensors")
    fresh = _mlp()
    # A fresh config with another seed: the seeds in the file win, the bases follow them.
    mm.attach(fresh, NOLAConfig(targets=["0", "2", "4"], r=4, num_basis_a=8, num_basis_b=8, seed=99))
    before = fresh(x)
    mm.load_adapters(fresh, path)
    assert torch.equal(fresh(x), expected)
    assert not torch.equal(before, expected)


def test_changing_the_seed_changes_the_bases():
    model = _mlp()
    mm.attach(model, NOLAConfig(targets=["2"], r=4, num_basis_a=8, num_basis_b=8))
    adapter = model[2].adapters["default"]
    with torch.no_grad():
        adapter.nola_beta.normal_()
    first = adapter.delta_weight(model[2].base).clone()
    with torch.no_grad():
        adapter.basis_seed.add_(1)
    assert not torch.allclose(adapter.delta_weight(model[2].base), first)


def test_bad_keys_name_themselves():
    with pytest.raises(mm.ConfigError, match="num_basis_a"):
        NOLAConfig(targets=["x"], num_basis_a=0)
    with pytest.raises(mm.ConfigError, match="'seed'"):
        NOLAConfig(targets=["x"], seed=-1)
