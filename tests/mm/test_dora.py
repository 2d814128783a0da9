"""DoRA: W' = m (W + s B A) / ||W + s B A||_row; parity with HF PEFT's ``use_dora`` (forward, merged weight,
export and import); the inference norm cache."""

from __future__ import annotations

import pytest
import torch
from contract_cases import perturb
from toys import TOYS

import mm
from mm.adapters.dora import DoRA, DoRAConfig
from mm.layer import weight_out_in

peft = pytest.importorskip("peft")


def _dora_model(toy_name: str, **options):
    toy = TOYS[toy_name]
    model = toy.build()
    mm.attach(model, DoRAConfig(targets=toy.targets, r=4, alpha=8.0, **options))
    return toy, model


def test_magnitude_starts_at_row_norms_and_output_equals_base():
    toy, model = _dora_model("mlp")
    x = toy.make_input()
    for _, layer in mm.adapted_layers(model):
        adapter = layer.adapters["default"]
        torch.testing.assert_close(adapter.lora_magnitude_vector, layer.base.weight.norm(dim=1))
    torch.testing.assert_close(model(x), toy.build()(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("toy_name", ["mlp", "gpt2"])  # gpt2: transformers' Conv1D stores W as (in, out)
def test_merged_weight_is_magnitude_times_normalised_direction(toy_name):
    toy, model = _dora_model(toy_name)
    perturb(model, scale=0.2)
    for _, layer in mm.adapted_layers(model):
        adapter = layer.adapters["default"]
        weight = weight_out_in(layer.base).detach().clone()
        direction = weight + adapter.scaling * adapter.lora_B @ adapter.lora_A
        expected = adapter.lora_magnitude_vector[:, None] * direction / direction.norm(dim=1, keepdim=True)
        torch.testing.assert_close(weight + adapter.delta_weight(layer.base), expected, rtol=1e-5, atol=1e-6)


def test_norm_is_a_constant_for_the_gradient():
    """The paper's section 4.3: gradients flow through m and through B A in the numerator only."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 5)
    model = torch.nn.Sequential(layer)
    mm.attach(model, DoRAConfig(targets=["0"], r=2, alpha=2.0))
    perturb(model)
    adapter = model[0].adapters["default"]
    x = torch.randn(3, 6)
    model(x).sum().backward()
    m, a, b = (t.detach().clone().requires_grad_(True) for t in (adapter.lora_magnitude_vector, adapter.lora_A,
                                                                 adapter.lora_B))
    direction = layer.weight + adapter.scaling * b @ a
    weight = m[:, None] * direction / direction.norm(dim=1, keepdim=True).detach()
    torch.nn.functional.linear(x, weight, layer.bias).sum().backward()
    for ours, ref in ((adapter.lora_magnitude_vector, m), (adapter.lora_A, a), (adapter.lora_B, b)):
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-5, atol=1e-6)


def test_eval_caches_the_weight_norm_until_a_tensor_changes(monkeypatch):
    toy, model = _dora_model("mlp")
    perturb(model)
    model.eval()
    x = toy.make_input()
    calls = []
    original = torch.Tensor.pow
    monkeypatch.setattr(torch.Tensor, "pow", lambda self, *a: calls.append(1) or original(self, *a))
    with torch.no_grad():
        first = model(x)
        computed = len(calls)
        assert computed == 2, "one norm per adapted layer on the first forward"
        torch.testing.assert_close(model(x), first, rtol=0, atol=0)
        assert len(calls) == computed, "the second eval forward recomputed the norm"
        adapter = model.fc1.adapters["default"]
        adapter.lora_B.add_(0.1)  # a changed B (a hot-swap, a load) must invalidate the cache
        changed = model(x)
    assert len(calls) == computed + 1
    assert (changed - first).abs().max() > 1e-4
    model.train()
    model(x)
    model(x)
    assert len(calls) == computed + 1 + 2 * 2, "training recomputes the norm every step (2 layers, 2 steps)"


def _peft_dora(toy, seed=3, **options):
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=toy.targets, use_dora=True,
                             init_lora_weights=False, **options)
    peft_model = peft.get_peft_model(toy.build(), config).eval()
    with torch.no_grad():  # move the magnitude off its init as well
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.3 * torch.rand_like(param))
    return peft_model


@pytest.mark.parametrize("rslora", [False, True], ids=["dora", "dora-rslora"])
@pytest.mark.parametrize("toy_name", ["mlp", "llama", "gpt2"])
def test_import_of_peft_dora_gives_peft_outputs_and_merged_weights(toy_name, rslora, tmp_path):
    toy = TOYS[toy_name]
    peft_model = _peft_dora(toy, use_rslora=rslora)
    x = toy.make_input()
    expected = toy.run(peft_model, x)
    peft_model.save_pretrained(tmp_path / "peft")
    model = mm.import_peft(toy.build(), tmp_path / "peft")
    assert isinstance(mm.adapter_config(model, "default"), DoRAConfig)
    assert (expected - toy.run(toy.build(), x)).abs().max() > 1e-3, "PEFT's adapter is a no-op"
    torch.testing.assert_close(toy.run(model, x), expected, rtol=1e-5, atol=1e-5)
    peft_merged = peft_model.merge_and_unload()
    mm.merge(model, unload=True)
    peft_weights = dict(peft_merged.named_parameters())
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, peft_weights[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("toy_name", ["mlp", "llama", "gpt2"])
def test_export_loads_in_peft_with_same_outputs(toy_name, tmp_path):
    toy = TOYS[toy_name]
    model, x = toy.build(), toy.make_input()
    mm.attach(model, DoRAConfig(targets=toy.targets, r=4, alpha=6.0))
    perturb(model, scale=0.2)
    expected = toy.run(model, x)
    mm.export_peft(model, tmp_path / "peft")
    peft_model = peft.PeftModel.from_pretrained(toy.build(), tmp_path / "peft").eval()
    assert peft_model.peft_config["default"].use_dora
    torch.testing.assert_close(toy.run(peft_model, x), expected, rtol=1e-5, atol=1e-5)


def test_peft_dora_weights_without_use_dora_are_refused(tmp_path):
    import json

    toy = TOYS["mlp"]
    _peft_dora(toy).save_pretrained(tmp_path / "p")
    config_path = tmp_path / "p" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["use_dora"] = False
    config_path.write_text(json.dumps(config))
    with pytest.raises(mm.AdapterStateError, match="lora_magnitude_vector.*'use_dora' is false"):
        mm.import_peft(toy.build(), tmp_path / "p")


def test_dora_refuses_convolutions():
    from toys import CONV_TOYS

    with pytest.raises(mm.ConfigError, match="adapts linear layers only"):
        mm.attach(CONV_TOYS["conv2d"].build(), DoRAConfig(targets=["conv1"]))


def test_dora_after_another_adapter_rescales_only_the_base_output():
    """A LoRA active on the same layer is added after DoRA's rescaling, whatever the attach order."""
    toy = TOYS["mlp"]
    model = toy.build()
    mm.attach(model, mm.LoRAConfig(targets=["fc1"], r=2), "lora")
    mm.attach(model, DoRAConfig(targets=["fc1"], r=2), "dora")
    perturb(model, scale=0.3)
    x = toy.make_input()
    both = model(x)
    layer = model.fc1
    lora, dora = layer.adapters["lora"], layer.adapters["dora"]
    assert isinstance(dora, DoRA)
    weight = layer.base.weight + lora.delta_weight(layer.base) + dora.delta_weight(layer.base)
    hidden = torch.nn.functional.linear(x, weight, layer.base.bias)
    expected = model.head(model.act(model.fc2(model.act(hidden))))
    torch.testing.assert_close(both, expected, rtol=1e-5, atol=1e-5)
