"""``mm.merge_adapters`` gives PEFT 0.21's ``add_weighted_adapter`` results on the same adapters: the merged
A/B tensors and the merged model's outputs, for every combination type (DARE with the same random masks:
PEFT's ``torch.bernoulli`` draws from a generator seeded as ours)."""

from __future__ import annotations

import pytest
import torch
from contract_cases import perturb
from toys import CONV_TOYS, TOYS

import mm

peft = pytest.importorskip("peft")

NAMES = ["task_a", "task_b", "task_c"]
ALPHAS = [4.0, 8.0, 2.0]  # different scalings, so a wrong per-adapter scaling shows
WEIGHTS = [0.7, -0.4, 1.3]  # a negative weight: task negation
DARE_SEED = 11


def _adapters_and_peft(toy, tmp_path, rank: int = 4, ranks: list[int] | None = None):
    """Our model with three perturbed LoRAs, and a PeftModel holding the same three (through export_peft)."""
    model = toy.build()
    for i, name in enumerate(NAMES):
        r = ranks[i] if ranks else rank
        mm.attach(model, mm.LoRAConfig(targets=toy.targets, r=r, alpha=ALPHAS[i]), name)
        perturb(model, name, seed=i, scale=0.3)
    peft_model = None
    for name in NAMES:
        mm.export_peft(model, tmp_path / name, adapter=name)
        if peft_model is None:
            peft_model = peft.PeftModel.from_pretrained(toy.build(), tmp_path / name, adapter_name=name)
        else:
            peft_model.load_adapter(tmp_path / name, adapter_name=name)
    return model, peft_model.eval()


def _peft_factors(peft_model, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for key, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and name in module.lora_A:
            out[key] = (module.lora_A[name].weight.detach(), module.lora_B[name].weight.detach())
    return out


def _our_factors(model, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {key: (layer.adapters[name].lora_A.detach(), layer.adapters[name].lora_B.detach())
            for key, layer in mm.adapted_layers(model) if name in layer.adapters}


def _merge_both(model, peft_model, method, monkeypatch, **kwargs):
    real_bernoulli = torch.bernoulli
    peft_generator = torch.Generator().manual_seed(DARE_SEED)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "bernoulli", lambda p, *a, **k: real_bernoulli(p, generator=peft_generator))
        peft_model.add_weighted_adapter(NAMES, WEIGHTS, "merged", combination_type=method, **kwargs)
    ours = mm.merge_adapters(model, NAMES, method, WEIGHTS, new_name="merged",
                             generator=torch.Generator().manual_seed(DARE_SEED), **kwargs)
    assert ours == "merged"
    return _our_factors(model, "merged"), _peft_factors(peft_model, "merged")


FACTOR_METHODS = ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "cat"]


@pytest.mark.parametrize("method", FACTOR_METHODS)
@pytest.mark.parametrize("toy_name", ["mlp", "llama", "gpt2"])
def test_factor_methods_match_peft_tensors_and_outputs(toy_name, method, tmp_path, monkeypatch):
    toy = TOYS[toy_name]
    model, peft_model = _adapters_and_peft(toy, tmp_path)
    density = None if method in ("linear", "cat") else 0.5
    ours, theirs = _merge_both(model, peft_model, method, monkeypatch, density=density)
    assert ours.keys() == theirs.keys() and ours
    for key, (a, b) in ours.items():
        torch.testing.assert_close(a, theirs[key][0], rtol=1e-6, atol=1e-7, msg=f"{method} A at {key}")
        torch.testing.assert_close(b, theirs[key][1], rtol=1e-6, atol=1e-7, msg=f"{method} B at {key}")
    assert any(b.abs().sum() > 0 for _, b in ours.values()), "merged to nothing"
    x = toy.make_input()
    mm.set_active(model, "merged")
    peft_model.set_adapter("merged")
    with torch.no_grad():
        torch.testing.assert_close(toy.run(model, x), toy.run(peft_model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"])
@pytest.mark.parametrize("toy_name", ["mlp", "gpt2"])
def test_svd_methods_match_peft_updates(toy_name, method, tmp_path, monkeypatch):
    toy = TOYS[toy_name]
    model, peft_model = _adapters_and_peft(toy, tmp_path, ranks=[2, 4, 3])
    density = None if method == "svd" else 0.6
    ours, theirs = _merge_both(model, peft_model, method, monkeypatch, density=density, svd_rank=5)
    for key, (a, b) in ours.items():
        assert a.shape[0] == 5
        # Singular vectors are defined up to sign: compare the update B A itself.
        torch.testing.assert_close(b @ a, theirs[key][1] @ theirs[key][0], rtol=1e-4, atol=1e-5)
    x = toy.make_input()
    mm.set_active(model, "merged")
    peft_model.set_adapter("merged")
    with torch.no_grad():
        torch.testing.assert_close(toy.run(model, x), toy.run(peft_model, x), rtol=1e-4, atol=1e-5)


def test_conv_svd_and_cat_match_peft(tmp_path, monkeypatch):
    toy = CONV_TOYS["conv2d"]
    model, peft_model = _adapters_and_peft(toy, tmp_path, rank=2)
    ours, theirs = _merge_both(model, peft_model, "cat", monkeypatch)
    for key, (a, b) in ours.items():
        torch.testing.assert_close(a, theirs[key][0])
        torch.testing.assert_close(b, theirs[key][1])
    mm.merge_adapters(model, NAMES, "svd", WEIGHTS, new_name="svd_ours", svd_rank=3)
    peft_model.add_weighted_adapter(NAMES, WEIGHTS, "svd_ours", combination_type="svd", svd_rank=3)
    x = toy.make_input()
    mm.set_active(model, "svd_ours")
    peft_model.set_adapter("svd_ours")
    with torch.no_grad():
        torch.testing.assert_close(toy.run(model, x), toy.run(peft_model, x), rtol=1e-4, atol=1e-5)


def test_merged_adapter_saves_loads_and_exports_to_peft(tmp_path):
    toy = TOYS["llama"]
    model, _ = _adapters_and_peft(toy, tmp_path)
    name = mm.merge_adapters(model, NAMES, "ties", WEIGHTS, density=0.4)
    mm.set_active(model, name)
    x = toy.make_input()
    expected = toy.run(model, x)
    mm.save_adapters(model, tmp_path / "merged.safetensors", [name])
    reloaded = mm.load_adapters(toy.build(), tmp_path / "merged.safetensors")
    torch.testing.assert_close(toy.run(reloaded, x), expected)
    mm.export_peft(model, tmp_path / "merged_peft", adapter=name)
    from_peft = peft.PeftModel.from_pretrained(toy.build(), tmp_path / "merged_peft").eval()
    torch.testing.assert_close(toy.run(from_peft, x), expected, rtol=1e-5, atol=1e-5)


def test_rslora_inputs_give_peft_factors_with_plain_unit_scaling(tmp_path, monkeypatch):
    """PEFT keeps ``use_rslora`` on the merged config, so its merged adapter (alpha = r) is scaled by sqrt(r), not
    1; ours is a plain LoRA of scaling 1: same A and B as PEFT's, the update B A itself."""
    toy = TOYS["mlp"]
    model = toy.build()
    for i, name in enumerate(NAMES):
        mm.attach(model, mm.LoRAConfig(targets=toy.targets, r=4, alpha=ALPHAS[i], rslora=True), name)
        perturb(model, name, seed=i, scale=0.3)
    peft_model = None
    for name in NAMES:
        mm.export_peft(model, tmp_path / name, adapter=name)
        if peft_model is None:
            peft_model = peft.PeftModel.from_pretrained(toy.build(), tmp_path / name, adapter_name=name)
        else:
            peft_model.load_adapter(tmp_path / name, adapter_name=name)
    ours, theirs = _merge_both(model, peft_model.eval(), "ties", monkeypatch, density=0.5)
    for key, (a, b) in ours.items():
        torch.testing.assert_close(a, theirs[key][0])
        torch.testing.assert_close(b, theirs[key][1])
    layer = dict(mm.adapted_layers(model))["fc1"]
    assert layer.adapters["merged"].scaling == 1.0
    torch.testing.assert_close(layer.adapters["merged"].delta_weight(layer.base), ours["fc1"][1] @ ours["fc1"][0])
