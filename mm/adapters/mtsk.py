"""Matryoshka LoRA of Llama-MTSK (Cappellazzo, Kim & Petridis, 2025, "Adaptive Audio-Visual Speech
Recognition via Matryoshka-Based Multimodal LLMs").

Llama-MTSK feeds the LLM audio-visual tokens compressed at several rates ("scales": one per pair of an
audio and a video compression rate) and trains one model for all of them. Its three LoRA strategies:

- **MS** (multi-scale): one global LoRA, shared by every scale.
- **SS** (specific-scale): one LoRA per scale; a forward at scale ``s`` uses only LoRA ``s``.
- **MSS** (multi-specific-scale): the global LoRA plus the scale's own LoRA, their updates summed
  (the global one learns what the scales share, the specific ones what is particular to each).

At inference only the global LoRA and/or the one of the chosen scale run, so the cost is that of a
single LoRA whatever the number of scales.

Why one adapter method rather than several named LoRAs switched with ``mm.set_active``: the scale is a
fact about the *input* of each forward (how its tokens were compressed), exactly what ``mm.route``
carries. With one method, ``with mm.route(scale="a4_v2"): model(...)`` selects the LoRAs inside every
adapted layer without touching the model's adapter state, the training loss over all scales is a
plain loop over route blocks, and the global and specific LoRAs save, load and attach as one adapter
with one config. The paper's training objective (the per-scale losses averaged each step) lives with
the task that builds the scales (train/tasks/avsr_model.py), not here.

Parametrisation (``parametrisation``). ``"reference"`` (the default) follows the authors' released code
(umbertocappellazzo/Omni-AVSR, ``Llama_MatryLoRA.py``): ``r`` is their ``RANK``, a *divisor*: each LoRA's
bottleneck is ``round(in_features / r)`` and its scale ``alpha / r``; the down projection A starts at zero
and the up projection B is Kaiming-uniform (the reverse of Hu et al.'s init; the output is still the
base's at init). The authors adapt q and v only (``targets: [q_proj, v_proj]`` in the recipes). Their
defaults, RANK 64 and ALPHA 8, give a Llama-3.2-1B (hidden 2048) bottleneck 32 and scale 0.125; a paper
"rank" of b on hidden size h is ``r = h / b`` here, with ``alpha = scale * r``. ``"lora"`` is plain LoRA
(``r`` the bottleneck, scale ``alpha / r``, A Kaiming, B zero), kept for comparison.

Forward without a route (or with ``scale=None``) uses ``default_scale``; MS needs no scale at all.
Merging folds in the update of the scale active at merge time (run ``mm.merge`` inside
``mm.route(scale=...)`` to deploy at that scale): a merged SS/MSS model serves that one scale.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

from mm.adapters.base import ADAPTERS, Adapter
from mm.adapters.lora import LoRA, LoRAConfig, _param_dtype
from mm.config import ConfigError
from mm.route import current_route

STRATEGIES = ("ms", "ss", "mss")
PARAMETRISATIONS = ("reference", "lora")


@ADAPTERS.register("mtsk")
@dataclass
class MatryoshkaLoRAConfig(LoRAConfig):
    """Llama-MTSK Matryoshka LoRA: a global LoRA (MS), one per compression scale (SS), or both (MSS)."""

    method: ClassVar[str] = "mtsk"

    strategy: Literal["ms", "ss", "mss"] = field(
        default="mss", metadata={"help": "'ms': one global LoRA for all scales; 'ss': one LoRA per scale; "
                                         "'mss': global + per-scale, summed."})
    scales: list[str] = field(
        default_factory=list,
        metadata={"help": "Scale names (e.g. 'a4_v2': audio rate 4, video rate 2), chosen per forward by "
                  "mm.route(scale=...). Required for ss/mss; for ms it only restricts the accepted names."})
    default_scale: str | None = field(
        default=None, metadata={"help": "Scale used when no route names one (null: such a forward is an "
                                        "error for ss/mss)."})
    parametrisation: Literal["reference", "lora"] = field(
        default="reference", metadata={"help": "'reference' (the authors' code): r divides the input width "
                                               "(bottleneck round(in/r)), scale alpha/r, A = 0 and B Kaiming at "
                                               "init; 'lora': r is the bottleneck, A Kaiming, B = 0."})

    def validate(self) -> None:
        super().validate()
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"mtsk: key 'strategy' must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.parametrisation not in PARAMETRISATIONS:
            raise ConfigError(f"mtsk: key 'parametrisation' must be one of {', '.join(PARAMETRISATIONS)}, got "
                              f"{self.parametrisation!r}")
        if self.parametrisation == "reference":
            clashing = [key for key, value in (("rslora", self.rslora), ("freeze_a", self.freeze_a),
                                               ("init", self.init != "kaiming")) if value]
            if clashing:
                raise ConfigError(f"mtsk: keys {clashing} do not apply to parametrisation 'reference' (scale "
                                  "alpha/r, A = 0 and B Kaiming at init); use parametrisation: lora")
        if self.strategy != "ms" and not self.scales:
            raise ConfigError(f"mtsk: key 'scales' must list the scales for strategy {self.strategy!r}")
        bad = [s for s in self.scales if not s or "." in s]
        if bad:
            raise ConfigError(f"mtsk: key 'scales' has names {bad} that are empty or contain '.'")
        if len(set(self.scales)) != len(self.scales):
            raise ConfigError(f"mtsk: key 'scales' repeats a name: {self.scales}")
        if self.default_scale is not None and self.scales and self.default_scale not in self.scales:
            raise ConfigError(f"mtsk: key 'default_scale' {self.default_scale!r} is not one of 'scales' "
                              f"{self.scales}")

    @property
    def uses_global(self) -> bool:
        return self.strategy in ("ms", "mss")

    @property
    def uses_specific(self) -> bool:
        return self.strategy in ("ss", "mss")

    def build(self, in_features: int, out_features: int, base_weight: torch.Tensor) -> MatryoshkaLoRA:
        return MatryoshkaLoRA(self, in_features, out_features, dtype=_param_dtype(base_weight),
                              device=base_weight.device)


def build_sub_lora(config: MatryoshkaLoRAConfig, in_features: int, out_features: int, *, dtype: torch.dtype,
                   device: torch.device) -> LoRA:
    """One of the global / per-scale LoRAs, in the config's parametrisation."""
    if config.parametrisation == "lora":
        return LoRA(config, in_features, out_features, dtype=dtype, device=device)
    bottleneck = round(in_features / config.r)  # the authors' round(hidden / RANK)
    if bottleneck < 1:
        raise ConfigError(f"mtsk: r={config.r} divides an input width of {in_features} to a bottleneck of 0 "
                          "(parametrisation 'reference': bottleneck = round(in_features / r)); lower r")
    lora = LoRA(dataclasses.replace(config, r=bottleneck), in_features, out_features, dtype=dtype, device=device)
    lora.scaling = config.alpha / config.r
    with torch.no_grad():  # the authors' init: down (A) zero, up (B) Kaiming-uniform
        lora.lora_A.zero_()
        nn.init.kaiming_uniform_(lora.lora_B, a=math.sqrt(5))
    return lora


class MatryoshkaLoRA(Adapter):
    """``global_lora`` (MS, MSS) and ``scale_loras[scale]`` (SS, MSS); each a LoRA whose update is 0 at init."""

    def __init__(self, config: MatryoshkaLoRAConfig, in_features: int, out_features: int, *,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.strategy = config.strategy
        self.scales = tuple(config.scales)
        self.default_scale = config.default_scale
        self.global_lora = (build_sub_lora(config, in_features, out_features, dtype=dtype, device=device)
                            if config.uses_global else None)
        self.scale_loras = nn.ModuleDict({
            scale: build_sub_lora(config, in_features, out_features, dtype=dtype, device=device)
            for scale in (config.scales if config.uses_specific else [])})

    def extra_repr(self) -> str:
        return f"strategy={self.strategy}, scales={list(self.scales)}"

    def active_scale(self) -> str | None:
        """The scale of this forward: the route's, else ``default_scale``; checked against ``scales``."""
        route = current_route()
        scale = route.scale if route is not None and route.scale is not None else self.default_scale
        if scale is None:
            if self.scale_loras:
                raise RuntimeError(f"mtsk ({self.strategy}): no scale for this forward; run it inside "
                                   f"mm.route(scale=...) with one of {list(self.scales)} or set default_scale")
            return None
        if self.scales and scale not in self.scales:
            raise KeyError(f"mtsk: unknown scale {scale!r}; this adapter has scales {list(self.scales)}")
        return scale

    def _parts(self) -> list[LoRA]:
        scale = self.active_scale()
        parts = [self.global_lora] if self.global_lora is not None else []
        if self.scale_loras:
            parts.append(self.scale_loras[scale])
        return parts

    def forward(self, x: torch.Tensor, out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        for lora in self._parts():
            out = lora(x, out, base)
        return out

    def delta(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        parts = self._parts()
        total = parts[0].delta(x, base)
        for lora in parts[1:]:
            total = total + lora.delta(x, base)
        return total

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        parts = self._parts()
        total = parts[0].delta_weight(base)
        for lora in parts[1:]:
            total = total + lora.delta_weight(base)
        return total
