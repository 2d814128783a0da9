"""Training rules: what the loop calls around each optimizer step, switched on from a recipe.

A rule changes how the loop trains without editing it: which parameters train (LISA), which optimizer
runs (ALLoRA), at which learning rate each parameter group moves (LoRA+), at which rank a DyLoRA adapter
trains this step. A recipe turns rules on by name, with their settings::

    train:
      rules: [dylora_rank, {name: lisa, n_layers: 1, period: 5}]

Every rule is a class registered in ``RULES`` with its own settings dataclass (``config_class``: help
text, types and unknown keys checked like any recipe section). ``parse_rules`` validates the list when the
recipe loads and writes it back complete (defaults filled in), so the resolved ``config.yaml`` says exactly
what ran. ``optim.loraplus_ratio`` switches the LoRA+ rule on (an optimizer setting, not a list entry).

The loop calls the hooks of ``Rule`` below through a ``RuleSet``, in recipe order. Hook order per run:
``param_groups`` and ``make_optimizer`` (building the optimizer), ``on_train_start`` (after any resume),
then per optimizer step ``on_step_start``, per micro-batch ``before_backward`` / ``after_backward``,
``before_optimizer_step`` (not called for a step dropped by ``train.nonfinite=skip``; under DeepSpeed the
engine has already stepped inside backward), and ``on_step_end`` with the step's logs. A rule whose
state matters across a resume derives it from the step number, so a resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from mm.config import ConfigError
from mm.registry import Registry

if TYPE_CHECKING:
    import torch

#: Rule classes by the name ``train.rules`` uses.
RULES: Registry[type] = Registry("training rule")

#: Modules whose import registers rules (a new rule adds its module here).
RULE_MODULES = ["train.rules.lisa", "train.rules.allora", "train.rules.dylora_rank"]


def get_rule(name: str) -> type:
    for module in RULE_MODULES:
        importlib.import_module(module)
    return RULES.get(name)


@dataclass
class RuleConfig:
    """Settings of one rule; subclasses add fields with ``metadata={"help": ...}``."""

    def validate(self, recipe: Any, key: str) -> None:
        """Checks against the rest of the recipe; raise ``ConfigError`` naming ``key`` and ``recipe.source``."""


class Rule(Protocol):
    """What the loop calls. ``RuleHooks`` gives every hook a do-nothing default."""

    config_class: ClassVar[type[RuleConfig]]

    def param_groups(self, task: Any, groups: list[dict[str, Any]], optim: Any) -> list[dict[str, Any]]: ...

    def make_optimizer(self, groups: list[dict[str, Any]], optim: Any) -> torch.optim.Optimizer | None: ...

    def on_train_start(self, task: Any, optimizer: Any, accelerator: Any, step: int) -> None: ...

    def on_step_start(self, step: int) -> None: ...

    def before_backward(self, loss: torch.Tensor) -> None: ...

    def after_backward(self) -> None: ...

    def before_optimizer_step(self, step: int) -> None: ...

    def on_step_end(self, step: int, logs: dict[str, float]) -> None: ...


class RuleHooks:
    """Do-nothing hooks; a rule overrides the ones it needs. ``step`` counts finished optimizer steps."""

    config_class: ClassVar[type[RuleConfig]] = RuleConfig

    def __init__(self, config: RuleConfig, recipe: Any) -> None:
        self.config, self.recipe = config, recipe

    def param_groups(self, task: Any, groups: list[dict[str, Any]], optim: Any) -> list[dict[str, Any]]:
        return groups

    def make_optimizer(self, groups: list[dict[str, Any]], optim: Any) -> torch.optim.Optimizer | None:
        return None  # None: the loop builds optim.name

    def on_train_start(self, task: Any, optimizer: Any, accelerator: Any, step: int) -> None:
        pass

    def on_step_start(self, step: int) -> None:
        pass

    def before_backward(self, loss: torch.Tensor) -> None:
        pass

    def after_backward(self) -> None:
        pass

    def before_optimizer_step(self, step: int) -> None:
        pass

    def on_step_end(self, step: int, logs: dict[str, float]) -> None:
        pass


def _split_spec(spec: Any, key: str, source: str) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, dict) and isinstance(spec.get("name"), str):
        settings = dict(spec)
        return settings.pop("name"), settings
    raise ConfigError(f"{source}: key {key!r} must be a rule name or a mapping with a 'name' key "
                      f"({{name: lisa, n_layers: 2}}), got {spec!r}")


def parse_rules(recipe: Any) -> list[tuple[str, RuleConfig]]:
    """(name, settings) of each entry of ``train.rules``; errors name the entry and list the known rules."""
    from train.engine.config import build_section  # late: the config module imports this one lazily too

    specs, source = recipe.train.rules, recipe.source
    parsed: list[tuple[str, RuleConfig]] = []
    for index, spec in enumerate(specs):
        key = f"train.rules[{index}]"
        name, settings = _split_spec(spec, key, source)
        try:
            rule_class = get_rule(name)
        except KeyError as err:
            raise ConfigError(f"{source}: key {key!r}: {err.args[0]}") from None
        if any(name == seen for seen, _ in parsed):
            raise ConfigError(f"{source}: key {key!r}: rule {name!r} is listed twice")
        config = build_section(rule_class.config_class, settings, f"{key}.{name}", source)
        config.validate(recipe, key)
        parsed.append((name, config))
    return parsed


def resolved_rules(recipe: Any) -> list[dict[str, Any]]:
    """``train.rules`` validated and written out in full: ``[{name: ..., every setting: value}]``."""
    return [{"name": name, **dataclasses.asdict(config)} for name, config in parse_rules(recipe)]


def build_rules(recipe: Any) -> RuleSet:
    """The recipe's rules, ready for the loop: ``train.rules`` in order, then LoRA+ if asked for."""
    rules: list[Rule] = [get_rule(name)(config, recipe) for name, config in parse_rules(recipe)]
    if recipe.optim.loraplus_ratio is not None:
        from train.rules.loraplus import LoRAPlus

        rules.append(LoRAPlus(recipe))
    return RuleSet(rules)


class RuleSet:
    """Calls each rule's hook in order; the loop holds one of these."""

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules

    def __iter__(self):
        return iter(self.rules)

    def param_groups(self, task: Any, params: list[Any], optim: Any) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = [{"params": list(params)}]
        for rule in self.rules:
            groups = rule.param_groups(task, groups, optim)
        return groups

    def make_optimizer(self, groups: list[dict[str, Any]], optim: Any, default) -> torch.optim.Optimizer:
        """The one rule's optimizer that supplies one, else ``default(groups, optim)``; two is an error."""
        made = [(type(rule).__name__, rule.make_optimizer(groups, optim)) for rule in self.rules]
        made = [(name, opt) for name, opt in made if opt is not None]
        if len(made) > 1:
            raise ConfigError(f"key 'train.rules': {' and '.join(n for n, _ in made)} each bring their own "
                              "optimizer; keep one")
        return made[0][1] if made else default(groups, optim)

    def on_train_start(self, task: Any, optimizer: Any, accelerator: Any, step: int) -> None:
        for rule in self.rules:
            rule.on_train_start(task, optimizer, accelerator, step)

    def on_step_start(self, step: int) -> None:
        for rule in self.rules:
            rule.on_step_start(step)

    def before_backward(self, loss: torch.Tensor) -> None:
        for rule in self.rules:
            rule.before_backward(loss)

    def after_backward(self) -> None:
        for rule in self.rules:
            rule.after_backward()

    def before_optimizer_step(self, step: int) -> None:
        for rule in self.rules:
            rule.before_optimizer_step(step)

    def on_step_end(self, step: int, logs: dict[str, float]) -> None:
        for rule in self.rules:
            rule.on_step_end(step, logs)


def inner_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's wrapper (rules read and edit its state and groups)."""
    return getattr(optimizer, "optimizer", optimizer)


def step_seed(seed: int, step: int, salt: int) -> int:
    """A 63-bit seed that is a pure function of (recipe seed, step, rule): draws survive a resume."""
    return (seed * 1_000_003 + step * 7_919 + salt) % (2**63 - 1)
