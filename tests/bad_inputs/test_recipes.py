"""Bad recipes and overrides given to ``mmtune train``: one line naming the file or key, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from corpus import assert_clear_error, run_mmtune

RECIPE = "configs/tiny/digits_lora.yaml"


def test_missing_recipe_file_names_the_path(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope.yaml"
    result = run_mmtune(["train", "--config", str(missing), "--check"], capsys)
    assert_clear_error(result, "train", str(missing))


def test_malformed_yaml_names_the_file(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: digits\nadapters: [unclosed\n")
    result = run_mmtune(["train", "--config", str(bad), "--check"], capsys)
    assert_clear_error(result, "train", "bad.yaml")


@pytest.mark.parametrize("override, key", [
    ("optim.lr=abc", "optim.lr"),
    ("train.no_such_key=1", "no_such_key"),
    ("adapters.default.r=-3", "r"),
])
def test_bad_override_names_the_key(override: str, key: str, capsys) -> None:
    result = run_mmtune(["train", "--config", RECIPE, "--check", override], capsys)
    assert_clear_error(result, "train", key)


def test_debug_shows_the_traceback(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(FileNotFoundError):
        run_mmtune(["train", "--debug", "--config", str(missing), "--check"], capsys)


@pytest.mark.parametrize("override, key", [
    ("optim.lr=.nan", "optim.lr"),  # was accepted: NaN passes `lr <= 0`
    ("optim.lr=1e999", "optim.lr"),  # YAML 1.1 reads it as a string, float() makes it inf
    ("adapters.default.alpha=.nan", "adapters.default.alpha"),
    ("train.clip_norm=.inf", "train.clip_norm"),
    ("optim.betas=[0.9,.nan]", "optim.betas[1]"),
    ("optim.min_lr_ratio=-.inf", "optim.min_lr_ratio"),
])
def test_non_finite_number_names_the_key(override: str, key: str, capsys) -> None:
    result = run_mmtune(["train", "--config", RECIPE, "--check", override], capsys)
    assert_clear_error(result, "train", f"'{key}'", "finite")


@pytest.mark.parametrize("override, key", [
    ("train.max_nonfinite_skips=0", "train.max_nonfinite_skips"),
    ("train.nonfinite=ignore", "train.nonfinite"),
])
def test_bad_nonfinite_setting_names_the_key(override: str, key: str, capsys) -> None:
    result = run_mmtune(["train", "--config", RECIPE, "--check", override], capsys)
    assert_clear_error(result, "train", key)
