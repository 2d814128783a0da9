"""modules_to_save: a fully trained copy of a small module (the classifier head) per adapter, saved in the
adapter file; the original stays frozen and returns when the adapter is disabled, switched off or deleted."""

from __future__ import annotations

import pytest
import torch
from toys import TOYS

import mm
from mm.modules_to_save import SavedModule


def _trained(model, x, steps: int = 3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def _mlp_with_head(name="default", method="lora"):
    toy = TOYS["mlp"]
    model = toy.build()
    mm.attach(model, mm.AdapterConfig.from_dict({"method": method, "targets": ["fc1"], "r": 2,
                                                  "modules_to_save": ["head"]}), name)
    return toy, model


def test_the_copy_trains_and_the_original_stays(tmp_path):
    toy, model = _mlp_with_head()
    x, base = toy.make_input(), toy.build()
    assert isinstance(model.head, SavedModule)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.adapters.default.module.weight", "head.adapters.default.module.bias"} <= trainable
    assert "head.base.weight" not in trainable
    _trained(model, x)
    assert torch.equal(model.head.base.weight, base.head.weight), "the original head changed"
    assert not torch.equal(model.head.adapters["default"].module.weight, base.head.weight), "the copy did not train"
    with mm.disable_adapters(model):
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)
    expected = model(x)
    path = mm.save_adapters(model, tmp_path / "a.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        assert "default/head.module.weight" in set(handle.keys())
    fresh = mm.load_adapters(toy.build(), path)
    assert torch.equal(fresh(x), expected)


def test_each_adapter_has_its_own_copy_and_delete_restores_the_module():
    toy, model = _mlp_with_head("a")
    mm.attach(model, mm.LoRAConfig(targets=["fc1"], r=2, modules_to_save=["head"]), "b")
    x = toy.make_input()
    with torch.no_grad():
        model.head.adapters["b"].module.weight.mul_(2)
    mm.set_active(model, "a")
    out_a = model(x)
    mm.set_active(model, "b")
    assert (model(x) - out_a).abs().max() > 1e-3
    mm.delete_adapter(model, "b")
    mm.delete_adapter(model, "a")
    assert type(model.head) is torch.nn.Linear
    torch.testing.assert_close(model(x), toy.build()(x), rtol=0, atol=0)


def test_merge_unload_keeps_the_trained_copy_and_unmerge_restores():
    toy, model = _mlp_with_head()
    x = toy.make_input()
    _trained(model, x)
    expected, original = model(x), model.head.base.weight.detach().clone()
    mm.merge(model)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    mm.unmerge(model)
    assert torch.equal(model.head.base.weight, original)
    mm.merge(model, unload=True)
    assert type(model.head) is torch.nn.Linear
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_all_linear_never_adapts_inside_a_saved_module():
    toy, model = _mlp_with_head()
    mm.attach(model, mm.LoRAConfig(targets=["all-linear"], r=2), "second")
    layers = {n for n, layer in mm.adapted_layers(model) if "second" in layer.adapters}
    assert layers == {"fc1", "fc2"}


def test_bad_names_are_config_errors():
    toy = TOYS["mlp"]
    model = toy.build()
    with pytest.raises(mm.ConfigError, match=r"key 'modules_to_save': \['classifier'\] name no module of TinyMLP"):
        mm.attach(model, mm.LoRAConfig(targets=["fc1"], modules_to_save=["classifier"]))
    assert not list(mm.adapted_layers(model)), "a refused attach changed the model"
    with pytest.raises(mm.ConfigError, match=r"\['fc1'\] are \(or hold\) layers the adapter adapts"):
        mm.attach(toy.build(), mm.LoRAConfig(targets=["fc1"], modules_to_save=["fc1"]))


def test_peft_modules_to_save_import_and_export_give_peft_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    toy = TOYS["mlp"]
    x = toy.make_input()
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(toy.build(), peft.LoraConfig(r=2, target_modules=["fc1"], init_lora_weights=False,
                                                                   modules_to_save=["head"])).eval()
    with torch.no_grad():
        peft_model.base_model.model.head.modules_to_save["default"].weight.mul_(1.5)
    expected = peft_model(x)
    peft_model.save_pretrained(tmp_path / "peft")
    model = mm.import_peft(toy.build(), tmp_path / "peft")
    assert isinstance(model.head, SavedModule) and mm.adapter_config(model, "default").modules_to_save == ["head"]
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    mm.export_peft(model, tmp_path / "again")
    reloaded = peft.PeftModel.from_pretrained(toy.build(), tmp_path / "again").eval()
    torch.testing.assert_close(reloaded(x), expected, rtol=1e-5, atol=1e-6)
