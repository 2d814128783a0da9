"""Recipes: every config under configs/ validates; bad keys and types are errors naming key and file."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import yaml

from mm.config import ConfigError
from train.engine.config import load_recipe, parse_override, save_resolved, validate_config_file

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
CONFIG_FILES = sorted(p for p in CONFIGS.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))
DIGITS = CONFIGS / "tiny" / "digits_lora.yaml"


def _plain(obj):
    """A validated config (dataclass, ``to_dict`` object, dict) as nested dicts and lists."""
    if hasattr(obj, "to_dict"):
        return _plain(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _leaves(tree, key=None):
    """(innermost key, value) of every scalar or scalar list; lists of mappings are walked through."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, k)
    elif isinstance(tree, list) and any(isinstance(v, dict) for v in tree):
        for v in tree:
            yield from _leaves(v, key)
    else:
        yield key, tree


def _read_raw(path: Path):
    return json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())


def _validated_values(path: Path, root: Path) -> dict:
    values: dict = {}
    for key, value in _leaves(_plain(validate_config_file(path, root))):
        values.setdefault(key, []).append(value)
    return values


def _first_float_leaf(tree, trail=()):
    """Path to the first positive float in the raw file (halving it keeps every range check satisfied)."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for k, v in items:
        if isinstance(v, float) and v > 0:
            return (*trail, k)
        found = _first_float_leaf(v, (*trail, k))
        if found:
            return found
    return None


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_file_loads_and_validates(path, tmp_path):
    """Every value written in the file reaches the validated config, and changing one is reflected."""
    raw = _read_raw(path)
    assert isinstance(raw, dict) and raw, f"{path}: empty or not a mapping"
    values = _validated_values(path, CONFIGS)
    if "task" not in values:  # 'task: cluster' chose the validator; a clustering recipe does not store it
        values["task"] = [raw.get("task")]
    dropped = [(key, value) for key, value in _leaves(raw) if value not in values.get(key, [])]
    assert not dropped, f"{path}: values of the file missing from the validated config: {dropped}"
    trail = _first_float_leaf(raw)
    if trail is None:
        return  # no float setting to vary (launcher files of names and flags); the check above covered it
    shutil.copytree(CONFIGS, tmp_path / "configs")  # validators resolve sibling configs from the tree
    changed = tmp_path / "configs" / path.relative_to(CONFIGS)
    holder = raw
    for step in trail[:-1]:
        holder = holder[step]
    old, new = holder[trail[-1]], holder[trail[-1]] / 2
    holder[trail[-1]] = new
    changed.write_text(json.dumps(raw) if path.suffix == ".json" else yaml.safe_dump(raw))
    after = _validated_values(changed, tmp_path / "configs")
    key = next(k for k in reversed(trail) if isinstance(k, str))
    assert after[key].count(new) == values[key].count(new) + 1, (trail, old, new, after[key])
    assert after[key].count(old) == values[key].count(old) - 1, (trail, old, new, after[key])


@pytest.mark.parametrize("path", sorted((CONFIGS / "tiny").glob("*.yaml")), ids=lambda p: p.name)
def test_resolved_recipes_round_trip(path, tmp_path):
    recipe = load_recipe(path)
    again = load_recipe(save_resolved(recipe, tmp_path / "config.yaml"))
    assert again.to_dict() == recipe.to_dict()


def test_deepspeed_configs_take_the_recipes_values():
    from train.engine.distributed import deepspeed_config

    recipe = load_recipe(DIGITS, ["train.batch_size=7", "train.grad_accum=3", "train.precision=bf16"])
    for path in sorted((CONFIGS / "deepspeed").glob("*.json")):
        filled = deepspeed_config(recipe, json.loads(path.read_text()))
        assert filled["train_micro_batch_size_per_gpu"] == 7 and filled["gradient_accumulation_steps"] == 3
        assert filled["bf16"]["enabled"] is True and filled["gradient_clipping"] == 1.0
        assert "auto" not in json.dumps(filled), f"{path}: every 'auto' must be filled from the recipe"


def test_launcher_configs_are_checked(tmp_path):
    from train.engine.distributed import validate_accelerate_config, validate_deepspeed_config

    bad_ds = tmp_path / "configs" / "deepspeed" / "bad.json"
    bad_ds.parent.mkdir(parents=True)
    bad_ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="bad.json.*'optimizer'"):
        validate_deepspeed_config(bad_ds)
    bad_acc = tmp_path / "configs" / "accelerate" / "bad.yaml"
    bad_acc.parent.mkdir(parents=True)
    bad_acc.write_text("distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: nope.json\n")
    with pytest.raises(ConfigError, match="bad.yaml.*deepspeed_config_file"):
        validate_accelerate_config(bad_acc)


def test_overrides_reach_typed_fields():
    recipe = load_recipe(DIGITS, ["train.max_steps=7", "optim.lr=1e-4", "adapters.default.r=2",
                                  "model.width=32", "train.clip_norm=null"])
    assert recipe.train.max_steps == 7 and recipe.optim.lr == pytest.approx(1e-4)
    assert recipe.adapters["default"].r == 2 and recipe.model.width == 32 and recipe.train.clip_norm is None


@pytest.mark.parametrize(("override", "key"), [
    ("train.max_stepz=3", "train.max_stepz"),
    ("train.max_steps=abc", "train.max_steps"),
    ("optim.name=adam", "optim.name"),
    ("model.width=1.5", "model.width"),
    ("quant.mode=int4", "quant.mode"),
    ("adapters.default.r=x", "'r'"),
    ("adapters.default.rank=4", "'rank'"),
    ("extra.key=1", "'extra'"),
])
def test_bad_key_or_type_names_the_key_and_the_file(override, key):
    with pytest.raises(ConfigError) as err:
        load_recipe(DIGITS, [override])
    assert key in str(err.value) and str(DIGITS) in str(err.value), str(err.value)


def test_errors_in_the_file_itself_name_it(tmp_path):
    raw = yaml.safe_load(DIGITS.read_text())
    raw["train"]["batch_size"] = "large"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"bad\.yaml.*'train\.batch_size'"):
        load_recipe(bad)
    raw["task"] = "no_such_task"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"bad\.yaml.*key 'task'.*no_such_task"):
        load_recipe(bad)


def test_value_checks_beyond_types():
    with pytest.raises(ConfigError, match="'train.grad_accum' must be >= 1"):
        load_recipe(DIGITS, ["train.grad_accum=0"])
    with pytest.raises(ConfigError, match="'data.domain'"):
        load_recipe(DIGITS, ["data.domain=sideways"])
    with pytest.raises(ConfigError, match="no such file"):
        load_recipe(DIGITS, ["train.deepspeed=configs/deepspeed/nope.json"])


def test_override_syntax():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("no_equals_sign")
    with pytest.raises(ConfigError, match="not a section"):
        load_recipe(DIGITS, ["seed.x=1"])


def test_train_check_prints_the_resolved_recipe(capsys):
    from train.cli import main

    assert main(["train", "--config", str(DIGITS), "--check", "train.max_steps=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["max_steps"] == 3 and printed["task"] == "digits"
    assert main(["train", "--config", str(DIGITS), "train.nope=1"]) == 2
    assert "train.nope" in capsys.readouterr().err
