"""Adapter configs: one dataclass per method, validated strictly (unknown keys and wrong types are errors)."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from mm.errors import MMTuneError


class ConfigError(MMTuneError, ValueError):
    """A config key is unknown, missing or of the wrong type; the message names it."""


def _type_ok(value: Any, annotation: Any) -> bool:
    """Whether ``value`` fits ``annotation`` for the annotations configs use (scalars, lists, optionals)."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin in (list, tuple):
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        return isinstance(value, list | tuple) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if annotation is float:  # YAML writes 16 for 16.0; bools are not numbers here
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _non_finite(value: Any, key: str) -> str | None:
    """The dotted path of the first NaN/inf number in ``value`` (scalars, lists, dicts), else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return key
    if isinstance(value, list | tuple):
        return next((hit for i, v in enumerate(value) if (hit := _non_finite(v, f"{key}[{i}]"))), None)
    if isinstance(value, dict):
        return next((hit for k, v in value.items() if (hit := _non_finite(v, f"{key}.{k}"))), None)
    return None


@dataclass
class AdapterConfig:
    """Fields every adapter method shares: where it attaches and how big it is."""

    method: ClassVar[str] = ""

    targets: list[str] = field(
        default_factory=list,
        metadata={"help": "Module-name suffixes to adapt ('q_proj' matches 'layers.0.attn.q_proj'); "
                  "'all-linear' adapts every linear layer except the output head."},
    )
    target_regex: str | None = field(
        default=None, metadata={"help": "A regex matched against the full module name (re.fullmatch)."}
    )
    exclude: list[str] = field(
        default_factory=list,
        metadata={"help": "Suffixes or full-name regexes of modules never adapted, even when targeted."},
    )
    layers: list[int] | None = field(
        default=None, metadata={"help": "Only adapt modules inside these block indices (None: all)."}
    )
    layers_pattern: str | None = field(
        default=None,
        metadata={"help": "Name of the block list holding the layer index, e.g. 'layers', 'h', 'resblocks' "
                  "(None: the first integer in the module name)."},
    )
    r: int = field(default=8, metadata={"help": "Rank of the update."})
    alpha: float = field(default=8.0, metadata={"help": "Scale numerator: the update is scaled by alpha/r."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    modules_to_save: list[str] = field(
        default_factory=list,
        metadata={"help": "Modules trained in full beside the adapter and saved with it (a classifier head), by "
                  "name or suffix, as PEFT: each gets a trainable copy per adapter (mm.modules_to_save)."},
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _type_ok(value, hints[f.name]):
                raise ConfigError(
                    f"{self.method or type(self).__name__}: key {f.name!r} expects {hints[f.name]}, "
                    f"got {value!r} ({type(value).__name__})"
                )
            # NaN passes every range check (all comparisons are False) and makes every output NaN.
            bad = _non_finite(value, f.name)
            if bad is not None:
                raise ConfigError(f"{self.method or type(self).__name__}: key {bad!r} must be a finite "
                                  f"number, got {value!r}")
        # Module names are dotted identifiers, so a pattern that does not compile is a typo, never a suffix.
        patterns = [("target_regex", self.target_regex)] if self.target_regex is not None else []
        patterns += [(f"exclude[{i}]", pattern) for i, pattern in enumerate(self.exclude)]
        for key, pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"{self.method}: key {key!r} {pattern!r} is not a valid regular expression "
                                  f"({err})") from None
        if not (self.targets or self.target_regex):
            raise ConfigError(f"{self.method}: give 'targets' or 'target_regex' (which modules to adapt)")
        if self.r < 1:
            raise ConfigError(f"{self.method}: key 'r' must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{self.method}: key 'dropout' must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict[str, Any]:
        out = {"method": self.method}
        out.update(dataclasses.asdict(self))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> AdapterConfig:
        """Build the config of ``data['method']`` (or of ``cls``); ``source`` names the file in errors."""
        from mm.adapters import ADAPTERS  # late: adapters import this module

        data = dict(data)
        method = data.pop("method", cls.method or None)
        if method is None:
            raise ConfigError(f"{source}: missing key 'method' (one of {', '.join(ADAPTERS.names())})")
        try:
            config_cls = ADAPTERS.get(method)
        except KeyError as err:
            raise ConfigError(f"{source}: key 'method': {err.args[0]}") from None
        known = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"{source}: unknown key(s) {', '.join(map(repr, unknown))} for method {method!r}; "
                f"known keys: {', '.join(sorted(known))}"
            )
        try:
            return config_cls(**data)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    def build(self, in_features: int, out_features: int, base_weight: Any) -> Any:
        """The adapter module for one layer; each method implements it."""
        raise NotImplementedError(f"{type(self).__name__} does not build a module")

    def build_for(self, layer_name: str, in_features: int, out_features: int, base_weight: Any) -> Any:
        """The adapter module for the layer called ``layer_name``; ``attach`` calls this.

        Methods whose shape differs per layer (EVA's redistributed ranks) override it; the rest build alike.
        """
        return self.build(in_features, out_features, base_weight)
