"""OLoRA (init 'olora' of LoRA): A, B from the QR of W, the residual keeps the output at init; parity with
HF PEFT's init_lora_weights='olora'."""

from __future__ import annotations

import pytest
import torch
from contract_cases import perturb
from toys import CONV_TOYS, TOYS

import mm
from mm.layer import weight_out_in

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("residual", ["base", "adapter"])
def test_factors_come_from_qr_and_output_is_unchanged(residual):
    toy = TOYS["llama"]
    base, model, x = toy.build(), toy.build(), toy.make_input()
    originals = {n: m.weight.detach().clone() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    mm.attach(model, mm.LoRAConfig(targets=toy.targets, r=4, alpha=8.0, init="olora", residual=residual))
    torch.testing.assert_close(toy.run(model, x), toy.run(base, x), rtol=1e-5, atol=1e-5)
    for name, layer in mm.adapted_layers(model):
        adapter, weight = layer.adapters["default"], originals[name]
        q, r = torch.linalg.qr(weight)
        assert torch.equal(adapter.lora_B.detach(), q[:, :4]) and torch.equal(adapter.lora_A.detach(), r[:4])
        eye = torch.eye(4)
        torch.testing.assert_close(adapter.lora_B.T @ adapter.lora_B, eye, atol=1e-5, rtol=0)  # orthonormal B
        residual_weight = weight - adapter.scaling * adapter.lora_B @ adapter.lora_A
        expected = residual_weight if residual == "base" else weight
        torch.testing.assert_close(weight_out_in(layer.base), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("toy_name", ["mlp", "llama"])
def test_matches_peft_olora_init_and_trained_outputs(toy_name):
    toy = TOYS[toy_name]
    x = toy.make_input()
    peft_model = peft.get_peft_model(toy.build(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=toy.targets,
                                                                   init_lora_weights="olora")).eval()
    model = toy.build()
    mm.attach(model, mm.LoRAConfig(targets=toy.targets, r=4, alpha=8.0, init="olora"))
    peft_state = peft_model.state_dict()
    for name, layer in mm.adapted_layers(model):
        adapter = layer.adapters["default"]
        prefix = f"base_model.model.{name}"
        torch.testing.assert_close(adapter.lora_A, peft_state[f"{prefix}.lora_A.default.weight"])
        torch.testing.assert_close(adapter.lora_B, peft_state[f"{prefix}.lora_B.default.weight"])
        torch.testing.assert_close(layer.base.weight, peft_state[f"{prefix}.base_layer.weight"], rtol=1e-6, atol=1e-6)
    perturb(model, scale=0.2)  # the same "training" in both
    with torch.no_grad():
        for name, layer in mm.adapted_layers(model):
            peft_layer = peft_model.get_submodule(f"base_model.model.{name}")
            peft_layer.lora_A["default"].weight.copy_(layer.adapters["default"].lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.adapters["default"].lora_B)
    torch.testing.assert_close(toy.run(model, x), toy.run(peft_model, x), rtol=1e-5, atol=1e-5)


def test_save_load_restores_the_residual_on_a_fresh_base(tmp_path):
    toy = TOYS["mlp"]
    model, x = toy.build(), toy.make_input()
    mm.attach(model, mm.LoRAConfig(targets=toy.targets, r=3, init="olora"))
    perturb(model)
    path = mm.save_adapters(model, tmp_path / "olora.safetensors")
    assert torch.equal(mm.load_adapters(toy.build(), path)(x), model(x))


def test_olora_is_refused_where_it_cannot_apply():
    with pytest.raises(mm.ConfigError, match="adapts linear layers only"):
        mm.attach(CONV_TOYS["conv2d"].build(), mm.LoRAConfig(targets=["conv1"], init="olora"))
    with pytest.raises(mm.ConfigError, match=r"init 'olora': key 'r'=13 exceeds the rank of fc1 \(24x12\)"):
        mm.attach(TOYS["mlp"].build(), mm.LoRAConfig(targets=["fc1"], r=13, init="olora"))
    with pytest.raises(mm.ConfigError, match="block_lora: key 'init' 'olora' is an init of method 'lora' only"):
        mm.AdapterConfig.from_dict({"method": "block_lora", "targets": ["fc1"], "init": "olora"})


def test_peft_olora_adapters_round_trip_through_export_and_import(tmp_path):
    toy = TOYS["llama"]
    model, x = toy.build(), toy.make_input()
    mm.attach(model, mm.LoRAConfig(targets=toy.targets, r=4, alpha=8.0, init="olora"))
    perturb(model, scale=0.2)
    expected = toy.run(model, x)
    mm.export_peft(model, tmp_path / "peft")
    peft_model = peft.PeftModel.from_pretrained(toy.build(), tmp_path / "peft").eval()  # re-runs OLoRA's init
    torch.testing.assert_close(toy.run(peft_model, x), expected, rtol=1e-5, atol=1e-5)
    imported = mm.import_peft(toy.build(), tmp_path / "peft")
    assert mm.adapter_config(imported, "default").init == "olora"
    torch.testing.assert_close(toy.run(imported, x), expected, rtol=1e-5, atol=1e-5)
