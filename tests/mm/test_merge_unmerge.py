"""Merging several adapters at once, undoing it, disabling under an exception, and mis-shaped files.

Each test here was written against a bug the contract suite let through (see scripts/mutation_smoke.py):
unmerge skipping every second merged adapter, disable_adapters left on after an exception, and the
load-time shape check comparing element counts (a transposed tensor of the same size).
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from contract_cases import perturb
from safetensors import safe_open
from toys import TOYS

import mm
from mm.state import CHECKSUM_KEY, tensors_checksum

TOY = TOYS["mlp"]


def _two_adapters():
    model = TOY.build()
    for seed, name in enumerate(("a", "b"), start=1):
        mm.attach(model, mm.LoRAConfig(targets=["fc1", "fc2"], r=4, alpha=8.0), name)
        perturb(model, name, seed=seed, scale=0.3)
    mm.set_active(model, ["a", "b"])
    return model


def _base_weights(model) -> dict[str, torch.Tensor]:
    return {name: layer.base.weight.detach().clone() for name, layer in mm.adapted_layers(model)}


@pytest.mark.parametrize("names", [None, ["a", "b"], ["b", "a"]], ids=["all", "a-b", "b-a"])
def test_unmerging_two_merged_adapters_restores_the_base_weights(names):
    model = _two_adapters()
    original, x = _base_weights(model), TOY.make_input()
    unmerged_out = TOY.run(model, x)
    mm.merge(model, ["a", "b"])
    for name, layer in mm.adapted_layers(model):
        assert layer.merged == ["a", "b"]
        assert (layer.base.weight - original[name]).abs().max() > 1e-2, "merge did not change the weight"
    torch.testing.assert_close(TOY.run(model, x), unmerged_out, rtol=1e-5, atol=1e-6)
    mm.unmerge(model, names)
    for name, layer in mm.adapted_layers(model):
        assert layer.merged == [], f"{name} still has {layer.merged} merged"
        torch.testing.assert_close(layer.base.weight, original[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(TOY.run(model, x), unmerged_out, rtol=1e-5, atol=1e-6)


def test_unmerging_one_of_two_leaves_exactly_the_other_merged():
    model = _two_adapters()
    original = _base_weights(model)
    mm.merge(model, ["a", "b"])
    mm.unmerge(model, "a")
    for name, layer in mm.adapted_layers(model):
        assert layer.merged == ["b"]
        expected = original[name] + layer.adapters["b"].delta_weight(layer.base).detach()
        torch.testing.assert_close(layer.base.weight, expected, rtol=0, atol=1e-6)


def test_an_exception_inside_disable_adapters_leaves_them_enabled():
    model = _two_adapters()
    x = TOY.make_input()
    adapted, base = TOY.run(model, x), TOY.run(TOY.build(), x)
    with pytest.raises(ValueError, match="inside the block"), mm.disable_adapters(model):
        torch.testing.assert_close(TOY.run(model, x), base)
        raise ValueError("failure inside the block")
    assert not any(layer.disabled for _, layer in mm.adapted_layers(model))
    torch.testing.assert_close(TOY.run(model, x), adapted, rtol=0, atol=0)


def test_a_transposed_tensor_of_the_same_size_is_refused_and_nothing_stays_attached(tmp_path):
    model = _two_adapters()
    path = mm.save_adapters(model, tmp_path / "adapters.safetensors", ["a"])
    with safe_open(str(path), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    tensors["a/fc2.lora_A"] = tensors["a/fc2.lora_A"].t().contiguous()  # (4, 24) -> (24, 4): same numel
    metadata[CHECKSUM_KEY] = tensors_checksum(tensors)  # a well-formed file, only the shape is wrong
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    fresh = TOY.build()
    with pytest.raises(mm.AdapterStateError,
                       match=r"adapters.safetensors: adapter 'a' .*fc2.lora_A: file \(24, 4\) vs model \(4, 24\)"):
        mm.load_adapters(fresh, path)
    assert mm.adapter_names(fresh) == [] and not list(mm.adapted_layers(fresh))
    assert [type(m) for m in fresh.modules()] == [type(m) for m in TOY.build().modules()]
