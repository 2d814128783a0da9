"""The same LoRA weights give the same outputs in mmtune and HF PEFT, through export and import (linear layers and
convolutions: PEFT's LoRA Conv1d/2d/3d)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from contract_cases import perturb
from toys import CONV_TOYS, TOYS

import mm

try:
    import peft
except ImportError:
    # Parity with PEFT is the only check of LoRA's scaling against an outside reference: in CI its absence
    # is an error, not a silent skip. Locally, without peft, the module skips.
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        raise ImportError("peft is required in CI (CI=true): the PEFT parity tests must run") from None
    pytest.skip("peft is not installed", allow_module_level=True)

PARITY_TOYS = ["mlp", "llama", "gpt2"]  # gpt2 covers transformers' Conv1D (fan_in_fan_out)


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("toy_name", PARITY_TOYS)
def test_export_loads_in_peft_with_same_outputs(toy_name, rslora, tmp_path):
    toy = TOYS[toy_name]
    model, x = toy.build(), toy.make_input()
    mm.attach(model, mm.LoRAConfig(targets=toy.targets, r=4, alpha=6.0, rslora=rslora))
    perturb(model, scale=0.2)
    expected = toy.run(model, x)
    mm.export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["use_rslora"] is rslora and config["r"] == 4
    peft_model = peft.PeftModel.from_pretrained(toy.build(), tmp_path / "peft").eval()
    assert (toy.run(peft_model, x) - toy.run(toy.build(), x)).abs().max() > 1e-3, "PEFT loaded a no-op"
    torch.testing.assert_close(toy.run(peft_model, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("toy_name", PARITY_TOYS)
def test_import_reads_peft_adapter_with_same_outputs(toy_name, rslora, tmp_path):
    toy = TOYS[toy_name]
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=toy.targets, use_rslora=rslora,
                             init_lora_weights=False)  # random B, so the adapter is not a no-op
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(toy.build(), config).eval()
    x = toy.make_input()
    expected = toy.run(peft_model, x)
    peft_model.save_pretrained(tmp_path / "peft")
    model = mm.import_peft(toy.build(), tmp_path / "peft", name="imported")
    assert mm.adapter_names(model) == ["imported"]
    torch.testing.assert_close(toy.run(model, x), expected, rtol=1e-5, atol=1e-5)
    assert (expected - toy.run(toy.build(), x)).abs().max() > 1e-3


def test_export_refuses_methods_peft_lora_cannot_hold(tmp_path):
    toy = TOYS["vit"]
    model = toy.build()
    mm.attach(model, mm.LoRAConfig(targets=["q_proj"]))
    with pytest.raises(TypeError, match="q_proj: PEFT packs q/k/v"):
        mm.export_peft(model, tmp_path / "out")


def test_import_refuses_unsupported_peft_options(tmp_path):
    toy = TOYS["mlp"]
    peft.get_peft_model(toy.build(), peft.LoraConfig(r=2, target_modules=["fc1"], lora_bias=True)).save_pretrained(
        tmp_path / "bias")  # (use_dora, refused here before, is imported since DoRA exists: tests/mm/test_dora.py)
    with pytest.raises(mm.AdapterStateError, match="adapter_config.json: key 'lora_bias'"):
        mm.import_peft(toy.build(), tmp_path / "bias")


def test_import_of_layers_the_model_lacks_names_them(tmp_path):
    toy = TOYS["mlp"]
    peft.get_peft_model(toy.build(), peft.LoraConfig(r=2, target_modules=["fc1", "fc2"])).save_pretrained(
        tmp_path / "p")
    other = torch.nn.Sequential(torch.nn.Linear(12, 24))  # no fc1/fc2
    with pytest.raises(mm.AdapterStateError, match=r"adapter_model.safetensors: LoRA weights for modules the "
                       r"model lacks \(fc1, fc2\)"):
        mm.import_peft(other, tmp_path / "p")
    assert mm.adapter_names(other) == []


# Conv toys whose convs PEFT computes as we do (conv1d's second conv is dilated: see the refusal test below).
CONV_PARITY_TOYS = ["conv2d", "conv2d-grouped", "conv2d-depthwise", "conv3d"]


PEFT_GROUPED_WARNING = "ignore:LoRA adapter added to ConvNd layer with groups > 1"  # PEFT cannot merge those; we can


@pytest.mark.filterwarnings(PEFT_GROUPED_WARNING)
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("toy_name", CONV_PARITY_TOYS)
def test_conv_export_loads_in_peft_with_same_outputs(toy_name, rslora, tmp_path):
    toy = CONV_TOYS[toy_name]
    model, x = toy.build(), toy.make_input()
    mm.attach(model, mm.LoRAConfig(targets=toy.targets, r=4, alpha=6.0, rslora=rslora))
    perturb(model, scale=0.2)
    expected = toy.run(model, x)
    mm.export_peft(model, tmp_path / "peft")
    peft_model = peft.PeftModel.from_pretrained(toy.build(), tmp_path / "peft").eval()
    peft_conv = peft_model.base_model.model.conv2
    assert isinstance(peft_conv, peft.tuners.lora.layer._ConvNd), type(peft_conv)
    assert (toy.run(peft_model, x) - toy.run(toy.build(), x)).abs().max() > 1e-3, "PEFT loaded a no-op"
    torch.testing.assert_close(toy.run(peft_model, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("toy_name", ["conv2d", "conv3d"])
def test_conv_import_reads_peft_adapter_with_same_outputs(toy_name, tmp_path):
    toy = CONV_TOYS[toy_name]
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(toy.build(), peft.LoraConfig(
        r=4, lora_alpha=12, target_modules=toy.targets, init_lora_weights=False)).eval()
    x = toy.make_input()
    expected = toy.run(peft_model, x)
    peft_model.save_pretrained(tmp_path / "peft")
    model = mm.import_peft(toy.build(), tmp_path / "peft")
    torch.testing.assert_close(toy.run(model, x), expected, rtol=1e-5, atol=1e-5)
    assert (expected - toy.run(toy.build(), x)).abs().max() > 1e-3
    mm.merge(model)  # and, imported, it merges exactly
    torch.testing.assert_close(toy.run(model, x), expected, rtol=1e-5, atol=1e-5)


def _grouped_peft_model(toy, *, block_diagonal: bool):
    """PEFT's LoRA on grouped convs (its A is dense, in -> r), optionally zeroed outside each group's block."""
    torch.manual_seed(4)
    peft_model = peft.get_peft_model(toy.build(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=toy.targets, init_lora_weights=False)).eval()
    if block_diagonal:
        with torch.no_grad():
            for name in toy.targets:
                layer = peft_model.base_model.model.get_submodule(name)
                weight, groups = layer.lora_A["default"].weight, layer.base_layer.groups
                rank, per_group = weight.shape[0] // groups, weight.shape[1] // groups
                mask = torch.zeros_like(weight)
                for g in range(groups):
                    mask[g * rank:(g + 1) * rank, g * per_group:(g + 1) * per_group] = 1
                weight.mul_(mask)
    return peft_model


@pytest.mark.filterwarnings(PEFT_GROUPED_WARNING)
@pytest.mark.parametrize("toy_name", ["conv2d-grouped", "conv2d-depthwise"])
def test_grouped_conv_import_takes_block_diagonal_peft_a_and_refuses_dense(toy_name, tmp_path):
    toy = CONV_TOYS[toy_name]
    x = toy.make_input()
    peft_model = _grouped_peft_model(toy, block_diagonal=True)
    expected = toy.run(peft_model, x)
    peft_model.save_pretrained(tmp_path / "block")
    model = mm.import_peft(toy.build(), tmp_path / "block")
    torch.testing.assert_close(toy.run(model, x), expected, rtol=1e-5, atol=1e-5)
    _grouped_peft_model(toy, block_diagonal=False).save_pretrained(tmp_path / "dense")
    other = toy.build()
    with pytest.raises(mm.AdapterStateError, match=r"adapter_model.safetensors: conv1\.lora_A mixes channels "
                       rf"across the {other.conv1.groups} groups of a grouped Conv2d"):
        mm.import_peft(other, tmp_path / "dense")
    assert mm.adapter_names(other) == []


def test_conv_export_refuses_what_peft_computes_differently(tmp_path):
    toy = CONV_TOYS["conv1d"]  # conv2 is dilated; PEFT's conv A drops the dilation
    model = toy.build()
    mm.attach(model, mm.LoRAConfig(targets=toy.targets, r=4))
    with pytest.raises(TypeError, match=r"conv2: PEFT's conv LoRA ignores dilation \(2,\)"):
        mm.export_peft(model, tmp_path / "out")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
