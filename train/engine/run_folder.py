"""The run folder is the truth: ``<run>/config.yaml`` (and each checkpoint's copy of it) says what the run
trained, and everything that continues or uses a run starts from it.

- ``mmtune eval`` / ``mmtune generate`` rebuild the model and data from the run's config; a ``key=value``
  override that differs from it is applied and said on stderr, never silently; a recipe file given
  beside the run that differs from it is reported, not used. Keys of generated data (``synthetic.*``,
  ``data.synthetic``, ``data.fake_*``) cannot be overridden there: a run's data is never regenerated in place.
- Resuming compares the new recipe with the checkpoint's: keys a run cannot change midway (the model,
  adapters, data, task, seed, batch geometry) are refused with the list of differences; the keys in
  ``MUTABLE_ON_RESUME`` (learning rate and schedule, step count, evaluation and logging) are applied from
  the resume step on and returned, so the loop records them in the run log.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mm.config import ConfigError
from train.engine.config import Recipe, apply_overrides, load_recipe, read_yaml, recipe_from_dict

#: Keys a resumed run may change; everything else must equal the checkpoint's recipe. (Not
#: optim.loraplus_ratio: switching it on or off changes the optimizer's parameter groups.)
MUTABLE_ON_RESUME = frozenset({
    "optim.lr", "optim.schedule", "optim.warmup_steps", "optim.min_lr_ratio", "optim.weight_decay",
    "train.max_steps", "train.eval_every", "train.log_every", "train.save_every",
    "train.keep_last", "train.clip_norm", "train.nonfinite", "train.max_nonfinite_skips", "train.progress",
    "train.threads",
})
#: Keys that say where a run lives or how it was started, not what it trains: never compared.
LOCATION_KEYS = frozenset({"train.out_dir", "train.resume"})


def generates_data(key: str) -> bool:
    """Whether a dotted key belongs to the settings of generated data (AVSR's ``synthetic`` section, the
    ``synthetic`` / ``fake_*`` keys of EO and MLLM data): changing one would regenerate a run's data in place."""
    parts = key.split(".")
    return parts[0] == "synthetic" or any(part == "synthetic" or part.startswith("fake_") for part in parts[1:])


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{'optim': {'lr': 1}}`` -> ``{'optim.lr': 1}``; lists stay values."""
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def recipe_diff(before: Recipe, after: Recipe) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (before, after) for every resolved value that differs (location keys left out)."""
    old, new = flatten(before.to_dict()), flatten(after.to_dict())
    missing = object()
    diff = {}
    for key in sorted(set(old) | set(new), key=lambda k: (k.count("."), k)):
        if key in LOCATION_KEYS:
            continue
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            diff[key] = (None if a is missing else a, None if b is missing else b)
    return diff


def describe_diff(diff: dict[str, tuple[Any, Any]], limit: int = 8) -> str:
    items = [f"{key} ({a!r} -> {b!r})" for key, (a, b) in list(diff.items())[:limit]]
    more = f" and {len(diff) - limit} more" if len(diff) > limit else ""
    return ", ".join(items) + more


def check_resume_recipe(recipe: Recipe, checkpoint: Path) -> dict[str, tuple[Any, Any]]:
    """The mutable changes of ``recipe`` against the recipe saved in ``checkpoint``; an immutable change
    is a ``ConfigError`` listing every one of them."""
    saved_file = checkpoint / "config.yaml"
    if not saved_file.is_file():
        return {}  # a checkpoint from before recipes were saved in it: nothing to compare
    saved = recipe_from_dict(read_yaml(saved_file), name=recipe.name, source=str(saved_file))
    diff = recipe_diff(saved, recipe)
    fixed = {k: v for k, v in diff.items() if k not in MUTABLE_ON_RESUME}
    if fixed:
        raise ConfigError(
            f"{recipe.source}: cannot resume {checkpoint}: changed key(s) a run cannot change midway: "
            f"{describe_diff(fixed)}; resume with the run's recipe ({saved_file}), or start a new run in "
            f"another train.out_dir (changeable on resume: {', '.join(sorted(MUTABLE_ON_RESUME))})")
    return diff


def load_run_recipe(run_dir: str | Path, overrides: list[str], command: str, recipe_file: str | None = None,
                    warn=None) -> Recipe:
    """The recipe of the run in ``run_dir`` (its ``config.yaml``) with ``overrides`` applied; each override
    that changes a value, and a ``recipe_file`` that differs from the run's, is said through ``warn``."""
    warn = warn or (lambda line: print(line, file=sys.stderr))
    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"{run_dir}: not a run folder (no config.yaml); give the folder `mmtune train` "
                          "wrote (train.out_dir)")
    raw = read_yaml(config)
    saved = recipe_from_dict(raw, name=run_dir.name, source=str(config))
    source = str(config) + (f" (with overrides {' '.join(overrides)})" if overrides else "")
    recipe = recipe_from_dict(apply_overrides(raw, list(overrides), source), name=run_dir.name, source=source)
    changed = recipe_diff(saved, recipe)
    regenerating = [key for key in changed if generates_data(key)]
    if regenerating:
        raise ConfigError(f"{source}: key {regenerating[0]!r}: the run's data was generated with "
                          f"{changed[regenerating[0]][0]!r}; mmtune {command} does not regenerate a run's data in "
                          "place (train a new run with the new data settings)")
    for key, (old, new) in changed.items():
        warn(f"mmtune {command}: {key}: the run used {old!r}, the command line sets {new!r}; using {new!r}")
    if recipe_file is not None:
        given = recipe_diff(saved, load_recipe(recipe_file))
        if given:
            warn(f"mmtune {command}: {recipe_file} differs from {config} in {describe_diff(given, 4)}; "
                 "using the run's config (pass key=value to change a value)")
    recipe.train.out_dir = str(run_dir)  # where the run's files are now, wherever it was trained
    return recipe


def run_dir_of(recipe_file: str | None, run: str | None, overrides: list[str]) -> Path:
    """The run folder a command means: ``--run``, else the recipe's ``train.out_dir``."""
    if run:
        return Path(run)
    if recipe_file is None:
        raise ConfigError("give --run RUN_DIR (a folder `mmtune train` wrote) or --config RECIPE")
    return load_recipe(recipe_file, overrides).out_dir
