"""Bad mmtune adapter files (safetensors + config metadata): a typed error naming the file and the tensor or
key, nothing left attached, nothing on disk changed; through ``mmtune eval`` the one-line contract.

Every case builds its file by editing a real saved file, so the rest of it stays well-formed and the case
reaches the check it is about (a renamed tensor gets a fresh checksum, or the checksum would answer first).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
from contract_cases import perturb
from corpus import assert_clear_error, assert_kept, run_mmtune, snapshot
from safetensors import safe_open
from toys import TOYS

import mm
from mm.state import CHECKSUM_KEY, tensors_checksum

TOY = TOYS["mlp"]
FILE = "adapters.safetensors"
Edit = Callable[[dict[str, str], dict[str, torch.Tensor]], None]


def _saved(folder: Path, name: str = "default") -> Path:
    model = TOY.build()
    mm.attach(model, mm.LoRAConfig(targets=["fc1", "fc2"], r=4, alpha=8.0), name)
    perturb(model, scale=0.2)
    return mm.save_adapters(model, folder / FILE)


def _rewrite(path: Path, edit: Edit, *, checksum: bool = True) -> Path:
    """Apply ``edit(metadata, tensors)`` to the file; the checksum is recomputed unless ``checksum=False``."""
    with safe_open(str(path), framework="pt") as handle:
        metadata, tensors = dict(handle.metadata()), {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    edit(metadata, tensors)
    if checksum and CHECKSUM_KEY in metadata:
        metadata[CHECKSUM_KEY] = tensors_checksum(tensors)
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


def _configs(metadata: dict[str, str]) -> dict:
    return json.loads(metadata["adapters"])


def _set_config(key: str, value) -> Edit:
    def edit(metadata, tensors):
        configs = _configs(metadata)
        configs["default"][key] = value
        metadata["adapters"] = json.dumps(configs)
    return edit


def _refused(path: Path, error: type[Exception], *culprits: str, names: list[str] | None = None) -> str:
    """Loading ``path`` into a fresh model raises ``error`` whose one-line message names every culprit; the
    model is left as it was and no file beside it changed."""
    before = snapshot(path.parent)
    model = TOY.build()
    with pytest.raises(error) as info:
        mm.load_adapters(model, path, names)
    message = str(info.value)
    assert "\n" not in message, message
    for culprit in (str(path), *culprits):
        assert culprit in message, (culprit, message)
    assert mm.adapter_names(model) == [] and not list(mm.adapted_layers(model))
    assert_kept(before, path.parent)
    return message


# ---- the file itself ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "empty", "text"])
def test_unreadable_file_is_named(tmp_path, damage):
    path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "text": b"adapters go here\n"}[damage])
    _refused(path, mm.AdapterStateError, "not a readable safetensors file")


def test_missing_file_and_folder_instead_of_file_are_named(tmp_path):
    for path in (tmp_path / "nope.safetensors", tmp_path):
        with pytest.raises(FileNotFoundError, match="no such adapter file"):
            mm.load_adapters(TOY.build(), path)


def test_foreign_safetensors_file_is_named(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"fc1.weight": torch.zeros(24, 12)}, str(path), metadata={"format": "pt"})
    _refused(path, mm.AdapterStateError, "metadata 'format' is 'pt'", "'mmtune.adapters'")


# ---- tensors -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_tensor_is_named(tmp_path, value):
    path = _rewrite(_saved(tmp_path), lambda meta, t: t["default/fc2.lora_B"].view(-1).__setitem__(5, value))
    _refused(path, mm.AdapterStateError, "'default/fc2.lora_B'", "1 NaN/inf")


def test_flipped_bit_fails_the_checksum(tmp_path):
    path = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x10  # inside the last tensor's bytes: the file still parses
    path.write_bytes(bytes(data))
    _refused(path, mm.AdapterStateError, "checksum mismatch")


def test_renamed_tensor_names_both_keys(tmp_path):
    def rename(meta, tensors):
        tensors["default/fc3.lora_A"] = tensors.pop("default/fc2.lora_A")
    _refused(_rewrite(_saved(tmp_path), rename), mm.AdapterStateError, "missing in file: fc2.lora_A",
             "not in model: fc3.lora_A")


def test_rank_in_config_differing_from_the_tensors_names_the_shapes(tmp_path):
    path = _rewrite(_saved(tmp_path), _set_config("r", 2))
    _refused(path, mm.AdapterStateError, "fc1.lora_A: file (4, 12) vs model (2, 12)")


def test_transposed_tensor_of_the_same_size_is_a_shape_error(tmp_path):
    def transpose(meta, tensors):
        tensors["default/fc1.lora_B"] = tensors["default/fc1.lora_B"].t().contiguous()
    _refused(_rewrite(_saved(tmp_path), transpose), mm.AdapterStateError, "fc1.lora_B: file (4, 24) vs model (24, 4)")


def test_file_for_other_module_names_is_refused_naming_file_and_modules(tmp_path):
    vit = TOYS["vit"].build()
    mm.attach(vit, mm.LoRAConfig(targets=["q_proj"], r=2))
    path = mm.save_adapters(vit, tmp_path / FILE)
    _refused(path, mm.AdapterStateError, "modules the model lacks", "blocks.0.attn.q_proj")


# ---- metadata and the configs in it ------------------------------------------------------------------------

@pytest.mark.parametrize("adapters, culprit", [
    (None, "metadata has no 'adapters' key"),
    ("{'default': ", "metadata 'adapters' is not valid JSON"),
    ("[1, 2]", "metadata 'adapters' must map adapter names to config objects"),
], ids=["missing", "not-json", "not-a-mapping"])
def test_bad_config_metadata_is_named(tmp_path, adapters, culprit):
    def edit(meta, tensors):
        if adapters is None:
            del meta["adapters"]
        else:
            meta["adapters"] = adapters
    _refused(_rewrite(_saved(tmp_path), edit), mm.AdapterStateError, culprit)


@pytest.mark.parametrize("key, value, culprits", [
    ("method", "lorra", ["key 'method'", "Did you mean 'lora'"]),
    ("rank", 4, ["unknown key(s) 'rank'"]),
    ("alpha", math.nan, ["key 'alpha' must be a finite number"]),
    ("alpha", -math.inf, ["key 'alpha' must be a finite number"]),
    ("target_regex", "fc(1", ["key 'target_regex'", "'fc(1'", "not a valid regular expression"]),
    ("exclude", ["fc2", "fc[1"], ["key 'exclude[1]'", "'fc[1'", "not a valid regular expression"]),
    ("r", 0, ["key 'r' must be >= 1"]),
], ids=["unknown-method", "unknown-key", "nan-alpha", "inf-alpha", "bad-regex", "bad-exclude", "zero-rank"])
def test_bad_saved_config_is_a_config_error_naming_file_adapter_and_key(tmp_path, key, value, culprits):
    path = _rewrite(_saved(tmp_path), _set_config(key, value))
    _refused(path, mm.ConfigError, "adapter 'default'", *culprits)


def test_asking_for_an_adapter_the_file_lacks_lists_what_it_holds(tmp_path):
    _refused(_saved(tmp_path), mm.AdapterStateError, "no adapter(s) ['other'] in file", "['default']",
             names=["other"])


# ---- what still works --------------------------------------------------------------------------------------

def test_file_without_checksum_from_older_mmtune_still_loads(tmp_path):
    path = _saved(tmp_path)
    x, expected = TOY.make_input(), None
    reference = mm.load_adapters(TOY.build(), path)
    expected = TOY.run(reference, x)
    _rewrite(path, lambda meta, tensors: meta.pop(CHECKSUM_KEY), checksum=False)
    with safe_open(str(path), framework="pt") as handle:
        assert CHECKSUM_KEY not in handle.metadata()
    assert torch.equal(TOY.run(mm.load_adapters(TOY.build(), path), x), expected)


def test_saved_checksum_covers_every_tensor(tmp_path):
    path = _saved(tmp_path)
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        assert handle.metadata()[CHECKSUM_KEY] == tensors_checksum(tensors)
    for key in tensors:  # each tensor, changed by one ulp, changes the checksum
        changed = dict(tensors, **{key: torch.nextafter(tensors[key], torch.full_like(tensors[key], 9.0))})
        assert tensors_checksum(changed) != tensors_checksum(tensors), key


# ---- through the CLI: mmtune eval of a run whose adapter file went bad --------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A real two-step digits run (its adapters.safetensors is what ``mmtune eval`` loads)."""
    from train.cli import main

    out = tmp_path_factory.mktemp("run") / "digits"
    code = main(["train", "--config", "configs/tiny/digits_lora.yaml", "train.max_steps=2", "train.eval_every=0",
                 "train.save_every=0", f"train.out_dir={out}"])
    assert code == 0 and (out / FILE).is_file()
    return out


def _eval(run: Path, capsys) -> object:
    return run_mmtune(["eval", "--config", str(run / "config.yaml"), "--run", str(run)], capsys)


@pytest.mark.parametrize("damage, culprit", [
    ("truncated", "not a readable safetensors file"),
    ("bit-flip", "checksum mismatch"),
    ("nan", "'default/encoder.fc1.lora_B'"),
    ("nan-alpha", "key 'alpha' must be a finite number"),
])
def test_eval_of_a_run_with_a_bad_adapter_file_is_one_line(trained_run, tmp_path, capsys, damage, culprit):
    import shutil

    run = Path(shutil.copytree(trained_run, tmp_path / "run"))
    path = run / FILE
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "bit-flip":
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "nan":
        _rewrite(path, lambda meta, t: t["default/encoder.fc1.lora_B"].view(-1).__setitem__(0, math.nan))
    else:
        _rewrite(path, _set_config("alpha", math.nan))
    before = snapshot(run)
    assert_clear_error(_eval(run, capsys), "eval", FILE, culprit)
    assert_kept(before, run)


def test_eval_of_the_intact_run_works(trained_run, capsys):
    result = _eval(trained_run, capsys)
    assert result.code == 0, result.err
    assert "accuracy" in result.out


@pytest.mark.parametrize("override, culprits", [
    ("adapters.default.alpha=.nan", ["alpha", "finite"]),
    ("adapters.default.target_regex=fc[", ["target_regex", "fc["]),
])
def test_train_check_names_a_bad_adapter_setting(tmp_path, capsys, override, culprits):
    result = run_mmtune(["train", "--config", "configs/tiny/digits_lora.yaml", "--check", override,
                         f"train.out_dir={tmp_path / 'out'}"], capsys)
    assert_clear_error(result, "train", *culprits)
    assert not (tmp_path / "out").exists()
