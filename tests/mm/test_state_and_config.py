"""Adapter files, strict configs, the registry and the trainable report."""

from __future__ import annotations

import json
import os
import stat

import pytest
import safetensors.torch
import torch
from contract_cases import perturb
from safetensors import safe_open
from toys import TOYS

import mm
from mm.registry import Registry


def _adapted(targets=("fc1", "fc2"), name="default"):
    model = TOYS["mlp"].build()
    mm.attach(model, mm.LoRAConfig(targets=list(targets), r=4, alpha=8.0), name)
    return model


def test_file_holds_only_adapter_tensors_and_the_config(tmp_path):
    model = _adapted()
    path = mm.save_adapters(model, tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        keys = sorted(handle.keys())
        meta = handle.metadata()
    assert keys == ["default/fc1.lora_A", "default/fc1.lora_B", "default/fc2.lora_A", "default/fc2.lora_B"]
    config = json.loads(meta["adapters"])["default"]
    assert config["method"] == "lora" and config["r"] == 4 and config["targets"] == ["fc1", "fc2"]


def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    model = _adapted()
    path = mm.save_adapters(model, tmp_path / "a.safetensors")
    before = path.read_bytes()
    perturb(model)

    def crash_half_way(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr("mm.state.save_file", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        mm.save_adapters(model, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temp file left behind


def test_loading_a_shape_mismatch_names_key_and_shapes_and_leaves_model_clean(tmp_path):
    model = _adapted()
    path = mm.save_adapters(model, tmp_path / "a.safetensors")
    other = TOYS["mlp"].build()
    mm.attach(other, mm.LoRAConfig(targets=["fc1", "fc2"], r=2), "default")
    with pytest.raises(mm.AdapterStateError, match=r"fc1.lora_A: file \(4, 12\) vs model \(2, 12\)"):
        mm.load_adapters(other, path)
    fresh = torch.nn.Sequential(torch.nn.Linear(12, 3))
    fresh.add_module("fc1", torch.nn.Linear(12, 3))  # same name, wrong shape: attach works, load fails
    with pytest.raises(mm.AdapterStateError, match="shape mismatch"):
        mm.load_adapters(fresh, path)
    assert mm.adapter_names(fresh) == []  # the adapter attached for loading was removed again


def test_not_an_adapter_file_is_named(tmp_path):
    bogus = tmp_path / "weights.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(bogus))
    with pytest.raises(mm.AdapterStateError, match="weights.safetensors: metadata 'format'"):
        mm.load_adapters(_adapted(), bogus)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not safetensors at all")
    with pytest.raises(mm.AdapterStateError, match="garbage.safetensors: not a readable safetensors"):
        mm.load_adapters(_adapted(), garbage)


def test_unknown_and_mistyped_config_keys_are_errors():
    with pytest.raises(mm.ConfigError, match=r"recipe.yaml: unknown key\(s\) 'rank' for method 'lora'"):
        mm.AdapterConfig.from_dict({"method": "lora", "targets": ["q"], "rank": 4}, source="recipe.yaml")
    with pytest.raises(mm.ConfigError, match="key 'r' expects <class 'int'>, got '8'"):
        mm.LoRAConfig(targets=["q"], r="8")
    with pytest.raises(mm.ConfigError, match="key 'method'.*unknown adapter method 'lorra'.*Did you mean 'lora'"):
        mm.AdapterConfig.from_dict({"method": "lorra", "targets": ["q"]})
    with pytest.raises(mm.ConfigError, match="give 'targets' or 'target_regex'"):
        mm.LoRAConfig()
    assert mm.AdapterConfig.from_dict({"method": "lora", "targets": ["q"], "alpha": 16}).alpha == 16


def test_registry_lists_known_names_on_a_miss():
    reg: Registry[int] = Registry("widget")
    reg.register("alpha")(1)
    reg.register("beta")(2)
    with pytest.raises(KeyError, match="unknown widget 'alpah'. Did you mean 'alpha'.*Known widgets: alpha, beta"):
        reg.get("alpah")
    with pytest.raises(KeyError, match="already registered"):
        reg.register("alpha")(3)


def test_target_selection_by_suffix_regex_exclude_and_layer():
    model = TOYS["llama"].build()
    select = lambda **kw: mm.select_targets(model, mm.LoRAConfig(**kw))  # noqa: E731
    assert select(targets=["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert select(targets=["q_proj"], layers=[1]) == ["model.layers.1.self_attn.q_proj"]
    assert select(targets=["q_proj"], layers=[1], layers_pattern="layers") == ["model.layers.1.self_attn.q_proj"]
    assert select(target_regex=r".*\.0\.mlp\.(up|down)_proj") == [
        "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    assert select(targets=["q_proj", "v_proj"], exclude=[r"model\.layers\.0\..*"]) == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    all_linear = select(targets=["all-linear"])
    assert "lm_head" not in all_linear and len(all_linear) == 14  # 7 projections x 2 layers


def test_adapter_names_are_checked():
    model = _adapted()
    with pytest.raises(mm.AttachError, match="already has an adapter named 'default'"):
        mm.attach(model, mm.LoRAConfig(targets=["fc1"]))
    with pytest.raises(mm.AttachError, match="must be a non-empty identifier"):
        mm.attach(model, mm.LoRAConfig(targets=["fc1"]), "my.adapter")
    with pytest.raises(KeyError, match="no adapter.*'nope'"):
        mm.set_active(model, "nope")


def test_trainable_report_counts_per_adapter_and_type():
    model = _adapted()
    mm.attach(model, mm.LoRAConfig(targets=["fc1"], r=2, freeze_a=True), "ffa")
    report = mm.trainable_report(model)
    assert report.per_adapter == {"default": 4 * (12 + 24) + 4 * (24 + 24), "ffa": 2 * 24}  # FFA: only B
    assert report.layers_per_adapter == {"default": 2, "ffa": 1}
    assert report.trainable == sum(report.per_adapter.values())
    assert report.total == sum(p.numel() for p in model.parameters())
    assert "adapter ffa: 48 params on 1 layers" in str(report)


def test_ffa_lora_keeps_a_at_its_init_through_training():
    model = _adapted()
    mm.delete_adapter(model, "default")
    mm.attach(model, mm.LoRAConfig(targets=["fc1"], r=4, freeze_a=True))
    layer = model.fc1
    a_init = layer.adapters["default"].lora_A.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 12)).pow(2).mean().backward()
        opt.step()
    assert torch.equal(layer.adapters["default"].lora_A, a_init)
    assert layer.adapters["default"].lora_B.abs().sum() > 0


def test_merged_adapter_refuses_disable():
    model = _adapted()
    mm.merge(model)
    with pytest.raises(RuntimeError, match="merged; call mm.unmerge first"), mm.disable_adapters(model):
        pass


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_saved_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = mm.save_adapters(_adapted(), tmp_path / "a.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode
