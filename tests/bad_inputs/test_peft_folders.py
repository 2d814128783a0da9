"""Bad HF PEFT adapter folders given to ``mm.import_peft``: a typed error naming the file and the key, tensor
or module; the model is left without the adapter and nothing in the folder changes.

Folders are written by ``mm.export_peft`` (the format PEFT itself reads, see tests/mm/test_peft_parity.py)
and then edited, so the corpus runs without the ``peft`` package.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch
from contract_cases import perturb
from corpus import assert_kept, snapshot
from toys import TOYS

import mm
from mm.peft_format import CONFIG_FILE, WEIGHTS_FILE

TOY = TOYS["mlp"]
A_KEY = "base_model.model.fc1.lora_A.weight"
B_KEY = "base_model.model.fc1.lora_B.weight"


def _exported(folder: Path) -> Path:
    model = TOY.build()
    mm.attach(model, mm.LoRAConfig(targets=["fc1", "fc2"], r=4, alpha=8.0))
    perturb(model, scale=0.2)
    return mm.export_peft(model, folder / "peft")


def _edit_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / CONFIG_FILE).read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    return folder


def _edit_weights(folder: Path, edit) -> Path:
    tensors = safetensors.torch.load_file(str(folder / WEIGHTS_FILE))
    edit(tensors)
    safetensors.torch.save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    return folder


def _refused(folder: Path, error: type[Exception], file: str, *culprits: str) -> None:
    """``import_peft`` raises ``error`` with a one-line message naming ``folder/file`` and every culprit;
    the model keeps no adapter and the folder is unchanged."""
    before = snapshot(folder)
    model = TOY.build()
    with pytest.raises(error) as info:
        mm.import_peft(model, folder)
    message = str(info.value)
    assert "\n" not in message, message
    for culprit in (str(folder / file), *culprits):
        assert culprit in message, (culprit, message)
    assert mm.adapter_names(model) == [] and not list(mm.adapted_layers(model))
    assert_kept(before, folder)


# ---- adapter_config.json -----------------------------------------------------------------------------------

def test_folder_without_config_is_named(tmp_path):
    folder = _exported(tmp_path)
    (folder / CONFIG_FILE).unlink()
    _refused(folder, FileNotFoundError, CONFIG_FILE, "missing PEFT adapter config")


@pytest.mark.parametrize("text, culprit", [
    ('{"peft_type": "LORA", "r": 4,', "not valid JSON"),
    ("", "not valid JSON"),
    ('["LORA", 4]', "expected a JSON object, got list"),
], ids=["truncated", "empty", "array"])
def test_config_that_is_not_a_json_object_is_named(tmp_path, text, culprit):
    folder = _exported(tmp_path)
    (folder / CONFIG_FILE).write_text(text)
    _refused(folder, mm.AdapterStateError, CONFIG_FILE, culprit)


STATE, CONFIG = mm.AdapterStateError, mm.ConfigError


@pytest.mark.parametrize("changes, error, culprit", [
    ({"peft_type": "IA3"}, STATE, "key 'peft_type' is 'IA3', expected 'LORA'"),
    ({"lora_bias": True}, STATE, "key 'lora_bias'=True is not supported"),
    ({"r": None}, STATE, "key 'r' must be a number, got None"),
    ({"lora_alpha": "16"}, STATE, "key 'lora_alpha' must be a number, got '16'"),
    ({"r": 0}, CONFIG, "key 'r' must be >= 1"),
    ({"lora_alpha": math.nan}, CONFIG, "key 'alpha' must be a finite number"),
    ({"lora_dropout": 1.5}, CONFIG, "key 'dropout' must be in [0, 1)"),
], ids=["ia3", "lora-bias", "no-r", "text-alpha", "zero-r", "nan-alpha", "dropout"])
def test_unsupported_or_bad_config_key_is_named(tmp_path, changes, error, culprit):
    _refused(_edit_config(_exported(tmp_path), **changes), error, CONFIG_FILE, culprit)


# DoRA and rank/alpha patterns are read (mm/adapters/dora.py, LoRA patterns): a config that claims them
# must agree with the weights beside it, and the weights file is named when it does not.
@pytest.mark.parametrize("changes, culprit", [
    ({"use_dora": True}, "lora_magnitude_vector"),
    ({"rank_pattern": {"fc1": 8}}, "fc1.lora_A has shape (4, 12), model expects (8, 12)"),
], ids=["dora-without-magnitude", "rank-pattern-disagrees"])
def test_config_that_disagrees_with_its_weights_names_the_weights(tmp_path, changes, culprit):
    _refused(_edit_config(_exported(tmp_path), **changes), STATE, WEIGHTS_FILE, culprit)


def test_alpha_pattern_is_applied_to_the_layer_it_names(tmp_path):
    folder = _edit_config(_exported(tmp_path), alpha_pattern={"fc2": 2})
    model = TOY.build()
    mm.import_peft(model, folder)
    scalings = {name: layer.adapters["default"].scaling for name, layer in mm.adapted_layers(model)}
    fc2 = [value for name, value in scalings.items() if name.endswith("fc2")]
    others = [value for name, value in scalings.items() if not name.endswith("fc2")]
    assert fc2 and others and all(value != others[0] for value in fc2), scalings


# ---- adapter_model.safetensors -----------------------------------------------------------------------------

def test_folder_without_weights_is_named(tmp_path):
    folder = _exported(tmp_path)
    (folder / WEIGHTS_FILE).unlink()
    _refused(folder, FileNotFoundError, WEIGHTS_FILE, "missing (only safetensors PEFT adapters are read)")


def test_truncated_weights_are_named(tmp_path):
    folder = _exported(tmp_path)
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(data[: len(data) // 3])
    _refused(folder, mm.AdapterStateError, WEIGHTS_FILE, "not a readable safetensors file")


@pytest.mark.parametrize("value", [math.nan, -math.inf], ids=["nan", "inf"])
def test_non_finite_weight_is_named(tmp_path, value):
    folder = _edit_weights(_exported(tmp_path), lambda t: t[B_KEY].view(-1).__setitem__(3, value))
    _refused(folder, mm.AdapterStateError, WEIGHTS_FILE, f"tensor '{B_KEY}'", "NaN/inf")


def test_key_that_is_not_a_lora_weight_is_named(tmp_path):
    key = "base_model.model.fc1.ia3_l.weight"
    folder = _edit_weights(_exported(tmp_path), lambda t: t.__setitem__(key, torch.ones(24)))
    _refused(folder, mm.AdapterStateError, WEIGHTS_FILE, f"key '{key}' is not a PEFT LoRA A/B weight")


def test_layer_without_its_b_weight_is_named(tmp_path):
    folder = _edit_weights(_exported(tmp_path), lambda t: t.pop(B_KEY))
    _refused(folder, mm.AdapterStateError, WEIGHTS_FILE, "layer 'fc1' has no lora_B weight")


def test_transposed_weight_of_the_same_size_is_a_shape_error(tmp_path):
    folder = _edit_weights(_exported(tmp_path), lambda t: t.__setitem__(A_KEY, t[A_KEY].t().contiguous()))
    _refused(folder, mm.AdapterStateError, WEIGHTS_FILE, "fc1.lora_A has shape (12, 4), model expects (4, 12)")


def test_rank_in_config_differing_from_the_weights_is_a_shape_error(tmp_path):
    folder = _edit_config(_exported(tmp_path), r=2)
    _refused(folder, mm.AdapterStateError, WEIGHTS_FILE, "fc1.lora_A has shape (4, 12), model expects (2, 12)")


@pytest.mark.parametrize("renamed, culprit", [
    (["fc2"], "layers ['blocks.0.fc2'] are not adaptable layers of the model"),
    (["fc1", "fc2"], "LoRA weights for modules the model lacks (blocks.0.fc1, blocks.0.fc2)"),
], ids=["some", "all"])
def test_weights_for_modules_the_model_lacks_are_named(tmp_path, renamed, culprit):
    def rename(tensors):
        for layer in renamed:
            for part in ("lora_A", "lora_B"):
                tensors[f"base_model.model.blocks.0.{layer}.{part}.weight"] = tensors.pop(
                    f"base_model.model.{layer}.{part}.weight")
    _refused(_edit_weights(_exported(tmp_path), rename), mm.AdapterStateError, WEIGHTS_FILE, culprit)


def test_weights_with_no_lora_tensors_are_named(tmp_path):
    folder = _exported(tmp_path)
    safetensors.torch.save_file({}, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    _refused(folder, mm.AdapterStateError, WEIGHTS_FILE, "holds no LoRA weights")


# ---- what still works --------------------------------------------------------------------------------------

def test_intact_folder_imports_with_the_exported_outputs(tmp_path):
    model = TOY.build()
    mm.attach(model, mm.LoRAConfig(targets=["fc1", "fc2"], r=4, alpha=8.0))
    perturb(model, scale=0.2)
    x = TOY.make_input()
    folder = mm.export_peft(model, tmp_path / "peft")
    before = snapshot(folder)
    imported = mm.import_peft(TOY.build(), folder, name="imported")
    assert mm.adapter_names(imported) == ["imported"]
    assert torch.equal(TOY.run(imported, x), TOY.run(model, x))
    assert_kept(before, folder)
