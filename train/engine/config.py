"""Recipes: ``configs/<track>/<recipe>.yaml`` read into typed dataclasses, with ``key=value`` overrides.

A recipe has the generic sections below (``optim``, ``train``, ``quant``, ``adapters``) plus the
sections its task declares (``model``, ``data``, ...: see ``train.engine.task.Task.sections``). Every key is
checked: an unknown key or a value of the wrong type is a ``ConfigError`` naming the key and the file.
Torch is not imported here, so validating a config is cheap.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mm.config import AdapterConfig, ConfigError


@dataclass
class OptimConfig:
    name: Literal["adamw", "adamw8bit", "sgd"] = field(
        default="adamw", metadata={"help": "Optimizer; adamw8bit is bitsandbytes' 8-bit AdamW (QLoRA)."})
    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "Decoupled weight decay."})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata={"help": "Adam betas."})
    eps: float = field(default=1e-8, metadata={"help": "Adam epsilon."})
    momentum: float = field(default=0.0, metadata={"help": "SGD momentum."})
    schedule: Literal["cosine", "linear", "constant"] = field(
        default="cosine", metadata={"help": "Decay after warm-up: cosine, linear (to min_lr_ratio) or constant."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up from 0 over this many steps."})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "Final lr as a fraction of lr."})
    loraplus_ratio: float | None = field(
        default=None, metadata={"help": "LoRA+ (Hayou et al., 2024): adapters' B matrices (lora_B) train at "
                                        "lr * this ratio, everything else at lr (null: off; the paper uses ~16)."})


@dataclass
class TrainConfig:
    max_steps: int = field(default=100, metadata={"help": "Optimizer steps to run."})
    batch_size: int = field(default=16, metadata={"help": "Samples per micro-batch on each process."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    clip_norm: float | None = field(default=1.0, metadata={"help": "Clip the gradient norm (null: off)."})
    precision: Literal["fp32", "bf16"] = field(default="fp32", metadata={"help": "Autocast precision."})
    eval_every: int = field(default=0, metadata={"help": "Evaluate every N steps (0: only at the end)."})
    log_every: int = field(default=1, metadata={"help": "Write train metrics every N steps."})
    save_every: int = field(default=0, metadata={"help": "Checkpoint every N steps (0: only at the end)."})
    keep_last: int = field(default=2, metadata={"help": "Complete checkpoints to keep."})
    out_dir: str = field(default="", metadata={"help": "Run folder (default runs/<recipe name>)."})
    resume: str = field(default="none", metadata={"help": "'none', 'auto' (newest complete checkpoint "
                                                          "in out_dir) or a checkpoint folder."})
    nonfinite: Literal["stop", "skip"] = field(
        default="stop", metadata={"help": "On a NaN/inf loss: stop (the checkpoints from before it are kept), "
                                          "or skip that optimizer step (its gradients are dropped)."})
    max_nonfinite_skips: int = field(
        default=3, metadata={"help": "With nonfinite=skip: stop after this many consecutive skipped steps "
                                     "(a diverged run skips every step)."})
    deepspeed: str | None = field(
        default=None, metadata={"help": "A DeepSpeed JSON (configs/deepspeed/*.json); null: DDP or single "
                                        "process, unless `accelerate launch` was given a DeepSpeed config."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar on the main process."})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads per process (null: "
                                                                "torch's default)."})
    rules: list[Any] = field(
        default_factory=list, metadata={"help": "Training rules (train/rules/): names or {name: ..., setting: "
                                                "value} mappings, e.g. [dylora_rank, {name: lisa, n_layers: 2}]."})


@dataclass
class QuantConfig:
    mode: Literal["none", "nf4", "fp4", "int8"] = field(
        default="none", metadata={"help": "Quantise the frozen backbone's Linear layers with bitsandbytes."})
    compute_dtype: Literal["fp32", "bf16"] = field(default="fp32", metadata={"help": "4-bit compute dtype."})
    skip: list[str] = field(
        default_factory=lambda: ["lm_head"], metadata={"help": "Module-name suffixes left unquantised."})


#: Sections every recipe has, whatever its task.
GENERIC_SECTIONS: dict[str, type] = {"optim": OptimConfig, "train": TrainConfig, "quant": QuantConfig}


@dataclass
class Recipe:
    """A validated recipe: the task name, its own sections, the adapters and the generic sections."""

    task: str
    name: str
    source: str
    seed: int = 0
    sections: dict[str, Any] = field(default_factory=dict)
    adapters: dict[str, AdapterConfig] = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)

    def __getattr__(self, name: str) -> Any:  # recipe.model, recipe.data: the task's own sections
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(f"recipe {self.__dict__.get('name')!r} has no section {name!r}")

    @property
    def out_dir(self) -> Path:
        return Path(self.train.out_dir or f"runs/{self.name}")

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain data (what ``save_resolved`` writes and ``load_recipe`` reads)."""
        out: dict[str, Any] = {"task": self.task, "seed": self.seed}
        out.update({key: dataclasses.asdict(value) for key, value in self.sections.items()})
        out["adapters"] = {name: config.to_dict() for name, config in self.adapters.items()}
        out.update({key: dataclasses.asdict(getattr(self, key)) for key in GENERIC_SECTIONS})
        out["train"]["out_dir"] = str(self.out_dir)
        return out


# ---------------------------------------------------------------------------- strict typed conversion


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(annotation)))
    return str(annotation).replace("typing.", "")


def _convert(value: Any, annotation: Any, key: str, source: str) -> Any:
    """``value`` checked (and, for YAML's '1e-3' strings and nested dataclasses, converted) to the type."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        return build_section(annotation, value, key, source)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            try:
                return _convert(value, arg, key, source)
            except ConfigError:
                continue
    elif annotation is Any:
        return value
    elif annotation is type(None):
        if value is None:
            return None
    elif origin is Literal:
        if value in typing.get_args(annotation):
            return value
    elif origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        if isinstance(value, list):
            return [_convert(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif annotation is float:
        if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 as a string (and 1e999 would be inf)
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{source}: key {key!r} must be a finite number, got {value}")
            return float(value)
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(annotation, type) and isinstance(value, annotation):
        return value
    raise ConfigError(f"{source}: key {key!r} expects {_describe(annotation)}, got {value!r} "
                      f"({type(value).__name__})")


def build_section(cls: type, data: Any, section: str, source: str) -> Any:
    """A dataclass ``cls`` from a mapping; unknown keys and wrong types name ``section.key`` and ``source``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: section {section!r} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(repr(f'{section}.{k}') for k in unknown)}; "
                          f"known keys in {section!r}: {', '.join(known)}")
    values = {name: _convert(value, hints[name], f"{section}.{name}", source) for name, value in data.items()}
    try:
        return cls(**values)
    except ConfigError as err:
        raise ConfigError(f"{source}: section {section!r}: {err}") from None
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{source}: section {section!r}: {err}") from None


# ---------------------------------------------------------------------------- overrides and loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'train.max_steps=10'`` -> (['train', 'max_steps'], 10); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*", key):
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    return key.split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Set each dotted key in a copy of ``raw``; a key through a non-mapping is an error naming it."""
    import copy

    raw = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: override {text!r}: key {'.'.join(path[:depth + 1])!r} "
                                  f"holds {child!r}, not a section")
            node = child
        node[path[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such recipe file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    return raw


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; the task's module is imported to learn its sections."""
    source = str(path) + (f" (with overrides {' '.join(overrides)})" if overrides else "")
    raw = apply_overrides(read_yaml(path), list(overrides), source)
    name = Path(path).stem
    return recipe_from_dict(raw, name=name, source=source)


def check_finite(raw: Any, source: str, key: str = "") -> None:
    """NaN or infinity anywhere in a recipe (YAML's .nan, .inf) is an error naming the dotted key: no
    setting of ours means anything at NaN, and ``lr <= 0`` style range checks let NaN through."""
    if isinstance(raw, float) and not math.isfinite(raw):
        raise ConfigError(f"{source}: key {key!r} must be a finite number, got {raw}")
    if isinstance(raw, dict):
        for name, value in raw.items():
            check_finite(value, source, f"{key}.{name}" if key else str(name))
    elif isinstance(raw, list):
        for index, value in enumerate(raw):
            check_finite(value, source, f"{key}[{index}]")


def recipe_from_dict(raw: dict[str, Any], *, name: str, source: str) -> Recipe:
    from train.engine.task import get_task  # late: tasks import torch

    check_finite(raw, source)
    raw = dict(raw)
    task_name = raw.pop("task", None)
    if not isinstance(task_name, str):
        raise ConfigError(f"{source}: key 'task' must name a registered task, got {task_name!r}")
    try:
        task_cls = get_task(task_name)
    except KeyError as err:
        raise ConfigError(f"{source}: key 'task': {err.args[0]}") from None
    seed = _convert(raw.pop("seed", 0), int, "seed", source)
    adapters = _build_adapters(raw.pop("adapters", None), source)
    generic = {key: build_section(cls, raw.pop(key, None), key, source) for key, cls in GENERIC_SECTIONS.items()}
    sections = {key: build_section(cls, raw.pop(key, None), key, source) for key, cls in task_cls.sections.items()}
    if raw:
        known = ["task", "seed", "adapters", *GENERIC_SECTIONS, *task_cls.sections]
        raise ConfigError(f"{source}: unknown key(s) {', '.join(map(repr, sorted(raw)))} for task "
                          f"{task_name!r}; known top-level keys: {', '.join(known)}")
    recipe = Recipe(task=task_name, name=name, source=source, seed=seed, sections=sections,
                    adapters=adapters, **generic)
    check_recipe(recipe)
    task_cls.validate(recipe)
    return recipe


def _build_adapters(data: Any, source: str) -> dict[str, AdapterConfig]:
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f"{source}: key 'adapters' must map adapter names to configs "
                          f"(adapters: {{default: {{method: lora, ...}}}}), got {data!r}")
    return {name: AdapterConfig.from_dict(cfg, source=f"{source}: adapters.{name}") for name, cfg in data.items()}


def check_recipe(recipe: Recipe) -> None:
    """Value checks the types alone do not catch."""
    t, source = recipe.train, recipe.source
    positive = {"train.max_steps": t.max_steps, "train.batch_size": t.batch_size,
                "train.grad_accum": t.grad_accum, "train.log_every": t.log_every,
                "train.keep_last": t.keep_last, "train.max_nonfinite_skips": t.max_nonfinite_skips}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{source}: key {key!r} must be >= 1, got {value}")
    for key, value in {"train.eval_every": t.eval_every, "train.save_every": t.save_every,
                       "optim.warmup_steps": recipe.optim.warmup_steps}.items():
        if value < 0:
            raise ConfigError(f"{source}: key {key!r} must be >= 0, got {value}")
    if recipe.optim.lr <= 0:
        raise ConfigError(f"{source}: key 'optim.lr' must be > 0, got {recipe.optim.lr}")
    if len(recipe.optim.betas) != 2:
        raise ConfigError(f"{source}: key 'optim.betas' needs two values, got {recipe.optim.betas}")
    if t.deepspeed is not None and not Path(t.deepspeed).is_file():
        raise ConfigError(f"{source}: key 'train.deepspeed': no such file {t.deepspeed!r}")
    if recipe.optim.loraplus_ratio is not None and recipe.optim.loraplus_ratio <= 0:
        raise ConfigError(f"{source}: key 'optim.loraplus_ratio' must be > 0, got {recipe.optim.loraplus_ratio}")
    from train.rules.base import resolved_rules  # late: rule modules import torch

    t.rules = resolved_rules(recipe)  # checked, and written out with every setting


#: Config files under configs/ that are not ``mmtune train`` recipes: top-level folder -> "module:function"
#: that loads and validates one file (raising on a bad one). A track with its own format adds a line.
CONFIG_VALIDATORS: dict[str, str] = {
    "accelerate": "train.engine.distributed:validate_accelerate_config",
    "deepspeed": "train.engine.distributed:validate_deepspeed_config",
    "clip": "train.tasks.fewshot:load_recipe",  # few-shot method recipes (mmtune fewshot)
    "eo": "train.tasks.eo:validate_config",  # EO training (task: eo) and clustering (task: cluster) recipes
    "federated": "train.rules.federated_run:load_federated_recipe",  # recipes of mmtune federate
}


def validate_config_file(path: str | Path, configs_root: str | Path = "configs") -> Any:
    """Load and validate any file under configs/: its folder's validator, else as a training recipe."""
    import importlib

    relative = Path(path).resolve().relative_to(Path(configs_root).resolve())
    target = CONFIG_VALIDATORS.get(relative.parts[0]) if len(relative.parts) > 1 else None
    if target is None:
        return load_recipe(path)
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)(path)


def save_resolved(recipe: Recipe, path: str | Path) -> Path:
    """Write the resolved recipe as YAML, atomically; ``load_recipe`` reads it back to the same recipe."""
    from mm.state import atomic_write

    text = f"# resolved from {recipe.source}\n" + yaml.safe_dump(recipe.to_dict(), sort_keys=False)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
