"""Few-shot method recipes (``configs/clip/<method>.yaml``): adapters and/or a QLadder plus a schedule that
grows with the shot and class counts. Read by ``mmtune fewshot`` (train/tasks/fewshot.py) and validated with
every config file (``clip`` in ``train.engine.config.CONFIG_VALIDATORS``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import mm
from mm.qladder import QLadderConfig

BUILTIN_METHODS = ("zero-shot", "linear-probe")
DEFAULT_METHODS = ("zero-shot", "linear-probe", "lora", "block_lora", "qladder")
DEFAULT_RECIPES = Path(__file__).resolve().parents[2] / "configs" / "clip"  # train/tasks/ -> repo root
OPTIM_KEYS = {"lr", "weight_decay", "batch_size", "steps", "steps_per_shot", "epochs"}
RECIPE_KEYS = {"description", "adapters", "qladder", "optim"}


@dataclass
class Recipe:
    """How one trainable method adapts CLIP: adapters, a QLadder, and the optimiser schedule."""

    name: str
    adapters: list[mm.AdapterConfig]
    qladder: QLadderConfig | None
    lr: float
    weight_decay: float = 0.0
    batch_size: int = 32
    steps: int = 0
    steps_per_shot: int = 0
    epochs: float = 0.0
    description: str = ""
    source: str = ""

    def total_steps(self, shots: int, classes: int = 1) -> int:
        """``steps`` + ``steps_per_shot`` x shots (CLIP-LoRA: 500 per shot) + ``epochs`` passes over the
        shots x classes training images: the schedule grows with the shot and class counts."""
        return self.steps + self.steps_per_shot * shots + math.ceil(self.epochs * shots * classes / self.batch_size)


def load_recipe(path: str | Path) -> Recipe:
    """A recipe YAML; unknown keys, unknown adapter methods and bad values are errors naming the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such recipe file")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict) or "optim" not in raw or not (raw.get("adapters") or raw.get("qladder")):
        raise mm.ConfigError(f"{path}: a recipe needs 'optim' and at least one of 'adapters', 'qladder'")
    unknown = sorted(set(raw) - RECIPE_KEYS) + sorted(set(raw["optim"]) - OPTIM_KEYS)
    if unknown:
        raise mm.ConfigError(f"{path}: unknown key(s) {unknown}; recipe keys: {sorted(RECIPE_KEYS)}, "
                             f"optim keys: {sorted(OPTIM_KEYS)}")
    adapters = [mm.AdapterConfig.from_dict(a, source=f"{path} adapters[{i}]")
                for i, a in enumerate(raw.get("adapters") or [])]
    ladder = QLadderConfig.from_dict(raw["qladder"], source=f"{path} qladder") if raw.get("qladder") else None
    optim = raw["optim"]
    if "lr" not in optim:
        raise mm.ConfigError(f"{path}: optim needs 'lr'")
    for key, value in optim.items():
        kind = int if key in ("batch_size", "steps", "steps_per_shot") else float
        if isinstance(value, bool) or not isinstance(value, int if kind is int else int | float):
            hint = " (YAML reads 1e-3 as text: write 1.0e-3)" if isinstance(value, str) else ""
            raise mm.ConfigError(f"{path}: optim.{key} expects {kind.__name__}, got {value!r}{hint}")
    recipe = Recipe(name=path.stem, adapters=adapters, qladder=ladder, description=raw.get("description", ""),
                    source=str(path), **{k: optim[k] for k in OPTIM_KEYS & set(optim)})
    if recipe.total_steps(1) < 1 or recipe.batch_size < 1 or recipe.lr <= 0 or recipe.epochs < 0:
        raise mm.ConfigError(f"{path}: optim needs steps + steps_per_shot + epochs > 0, batch_size >= 1, lr > 0, "
                             "epochs >= 0")
    return recipe


def find_recipe(method: str, recipes: str | Path) -> Recipe:
    path = Path(recipes) / f"{method}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in Path(recipes).glob("*.yaml"))
        raise mm.ConfigError(f"method {method!r}: no recipe {path}; built-in methods: {', '.join(BUILTIN_METHODS)}; "
                             f"recipes in {recipes}: {', '.join(known) or '(none)'}")
    try:
        return load_recipe(path)
    except mm.ConfigError as err:
        if "unknown adapter method" in str(err):
            raise mm.ConfigError(f"method {method!r} is not available in this build: {err}") from None
        raise
