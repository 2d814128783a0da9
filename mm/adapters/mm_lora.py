"""MM-LoRA (Arcana, Sun et al., 2024, "Improving Multi-modal Large Language Model through Boosting Vision
Capabilities"): two parallel LoRAs on each adapted LLM linear layer, one for vision tokens and one for
language tokens, each with its own rank and parameters.

With the modality mask M (True at vision tokens) the layer computes, token by token,

    h = W x + (alpha_v / r_v) B_v A_v x    where M is True  (vision tokens)
    h = W x + (alpha_l / r_l) B_l A_l x    where M is False (language tokens)

i.e. Arcana's ``F_I = F * (M == vision)`` and ``F_T = F * (M == language)`` each through its own LoRA. The
mask is a fact about the input, so it reaches the layers deep inside an unmodified LLM through the routing
context: ``with mm.route(token_masks={"vision": mask}): llm(inputs_embeds=...)`` with ``mask`` a bool
tensor of the layer input's leading shape (batch, tokens). Tokens are gathered per modality, so each LoRA
runs only on its own tokens (the cost of one LoRA per token, like plain LoRA at rank r_v or r_l).

Without any route (a plain forward of the LLM, e.g. text-only use) ``unrouted`` decides: "language" (the
default: with no image spliced in, every token is text), "error", or "both" (every token gets both
updates, as one LoRA of rank r_v + r_l: where the modality is unknown; the contract suite uses it). A
route that exists but lacks the mask is always an error, since then the caller meant to route and forgot
the mask. The update depends on each token's modality, so it is not a single weight delta: not mergeable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import nn

from mm.adapters.base import ADAPTERS, Adapter
from mm.adapters.lora import LoRA, LoRAConfig, _param_dtype
from mm.config import ConfigError
from mm.route import current_route

MODALITIES = ("vision", "language")
UNROUTED = ("language", "error", "both")


@ADAPTERS.register("mm_lora")
@dataclass
class MMLoRAConfig(LoRAConfig):
    """MM-LoRA (Arcana): a vision LoRA for vision tokens and a language LoRA for text tokens, by route mask."""

    method: ClassVar[str] = "mm_lora"

    vision_r: int | None = field(default=None, metadata={"help": "Rank of the vision LoRA (null: r)."})
    vision_alpha: float | None = field(
        default=None, metadata={"help": "Scale numerator of the vision LoRA (null: alpha)."})
    language_r: int | None = field(default=None, metadata={"help": "Rank of the language LoRA (null: r)."})
    language_alpha: float | None = field(
        default=None, metadata={"help": "Scale numerator of the language LoRA (null: alpha)."})
    mask_key: str = field(
        default="vision", metadata={"help": "Name of the route's token mask that is True at vision tokens."})
    unrouted: Literal["language", "error", "both"] = field(
        default="language",
        metadata={"help": "Forward with no route at all: 'language' (every token is text), 'error', or "
                  "'both' (every token gets both updates)."},
    )

    def validate(self) -> None:
        super().validate()
        for key in ("vision_r", "language_r"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"mm_lora: key {key!r} must be >= 1, got {value}")
        if not self.mask_key:
            raise ConfigError("mm_lora: key 'mask_key' must name the route's vision mask, got ''")
        if self.unrouted not in UNROUTED:
            raise ConfigError(f"mm_lora: key 'unrouted' must be one of {', '.join(UNROUTED)}, got {self.unrouted!r}")

    def branch(self, modality: str) -> LoRAConfig:
        """The plain LoRA config of one modality's branch (its own rank and alpha, the shared options)."""
        r = getattr(self, f"{modality}_r")
        alpha = getattr(self, f"{modality}_alpha")
        return LoRAConfig(targets=self.targets, target_regex=self.target_regex, r=self.r if r is None else r,
                          alpha=self.alpha if alpha is None else alpha, dropout=self.dropout,
                          rslora=self.rslora, freeze_a=self.freeze_a, init=self.init)

    def build(self, in_features: int, out_features: int, base_weight: torch.Tensor) -> MMLoRA:
        return MMLoRA(self, in_features, out_features, dtype=_param_dtype(base_weight), device=base_weight.device)


class MMLoRA(Adapter):
    """``vision`` and ``language``: two independent LoRAs (B = 0 at init), chosen per token by the route."""

    mergeable = False

    def __init__(self, config: MMLoRAConfig, in_features: int, out_features: int, *, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.mask_key, self.unrouted = config.mask_key, config.unrouted
        self.vision = LoRA(config.branch("vision"), in_features, out_features, dtype=dtype, device=device)
        self.language = LoRA(config.branch("language"), in_features, out_features, dtype=dtype, device=device)

    def extra_repr(self) -> str:
        return f"mask={self.mask_key!r}, unrouted={self.unrouted!r}"

    def vision_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """The route's vision mask for input ``x`` (None: no route and ``unrouted`` is not 'error')."""
        route = current_route()
        if route is None:
            if self.unrouted == "error":
                raise RuntimeError(f"mm_lora: no route for this forward; run it inside mm.route(token_masks="
                                   f"{{{self.mask_key!r}: bool mask}}) (or set unrouted='language')")
            return None
        mask = route.token_masks.get(self.mask_key)
        if mask is None:
            raise KeyError(f"mm_lora: the route has no token mask {self.mask_key!r} (it has "
                           f"{sorted(route.token_masks)}); pass mm.route(token_masks={{{self.mask_key!r}: "
                           f"bool tensor of shape {tuple(x.shape[:-1])}}})")
        if mask.dtype != torch.bool:
            raise TypeError(f"mm_lora: token mask {self.mask_key!r} must be a bool tensor (True at vision "
                            f"tokens), got dtype {mask.dtype}")
        if tuple(mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"mm_lora: token mask {self.mask_key!r} has shape {tuple(mask.shape)}, the layer "
                             f"input has leading shape {tuple(x.shape[:-1])} (batch, tokens)")
        return mask.to(x.device)

    def forward(self, x: torch.Tensor, out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        mask = self.vision_mask(x)
        if mask is None:
            out = self.vision(x, out, base) if self.unrouted == "both" else out
            return self.language(x, out, base)
        return self._by_modality(mask, x, out, lambda lora, xs, outs: lora(xs, outs, base))

    def delta(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        mask = self.vision_mask(x)
        if mask is None:
            update = self.language.delta(x, base)
            return update + self.vision.delta(x, base) if self.unrouted == "both" else update
        zeros = x.new_zeros((*x.shape[:-1], self.language.lora_B.shape[0]))
        return self._by_modality(mask, x, zeros, lambda lora, xs, outs: outs + lora.delta(xs, base))

    def _by_modality(self, mask: torch.Tensor, x: torch.Tensor, out: torch.Tensor, apply) -> torch.Tensor:
        """``apply(lora, x_rows, out_rows)`` with the vision LoRA on masked tokens, the language LoRA on the rest."""
        vision_tokens = int(mask.sum())
        if vision_tokens == 0:
            return apply(self.language, x, out)
        if vision_tokens == mask.numel():
            return apply(self.vision, x, out)
        flat_x, flat_out, flat_mask = x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1]), mask.reshape(-1)
        result = torch.empty_like(flat_out)
        for lora, rows in ((self.vision, flat_mask.nonzero().squeeze(1)), (self.language, (~flat_mask).nonzero().squeeze(1))):
            # flat_out[rows] is a copy, so a LoRA may add into it in place.
            result = result.index_copy(0, rows, apply(lora, flat_x[rows], flat_out[rows]))
        return result.view(out.shape)
