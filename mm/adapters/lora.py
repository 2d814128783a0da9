"""LoRA (Hu et al., 2021): W x + (alpha / r) B A x, with B = 0 so training starts at the base model.

Also covers rsLoRA scaling (alpha / sqrt(r), Kalajdzievski 2023) and FFA-LoRA's frozen A (Sun et al.,
2024: A stays at its random init and only B trains, which keeps federated averaging of B exact).
On convolutions (``ConvLoRA``) A is a convolution with the layer's kernel and B a 1x1 one (see ``mm.conv``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mm.adapters.base import ADAPTERS, Adapter, add_low_rank_
from mm.config import AdapterConfig, ConfigError
from mm.conv import check_conv_rank, conv_fn

#: Inits computed from the layer's weight (``mm.adapters.lora_inits``), for linear layers of method 'lora'.
WEIGHT_INITS = ("olora", "loftq")


@ADAPTERS.register("lora")
@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA: a trainable low-rank update B A beside each frozen linear layer."""

    method: ClassVar[str] = "lora"
    #: Linear layers and nn.Conv1d/2d/3d (grouped and depthwise too); subclasses state their own kinds.
    layer_kinds: ClassVar[tuple[str, ...]] = ("linear", "conv", "embedding")

    rslora: bool = field(default=False, metadata={"help": "Scale by alpha/sqrt(r) instead of alpha/r."})
    freeze_a: bool = field(
        default=False, metadata={"help": "FFA-LoRA: keep A at its random init; only B trains."}
    )
    init: Literal["kaiming", "gaussian", "olora", "loftq"] = field(
        default="kaiming",
        metadata={"help": "Init of A: 'kaiming' (uniform, as PEFT) or 'gaussian' (std 1/r), B = 0; or from W: "
                  "'olora' (QR of W, s B A taken out of the layer) or 'loftq' (for a base that will be quantised: "
                  "the base becomes its quantised residual; see mm.adapters.lora_inits). Not on convolutions."},
    )
    residual: Literal["base", "adapter"] = field(
        default="base",
        metadata={"help": "init 'olora': where W - s B0 A0 lives, 'base' (the base weight, as PEFT) or 'adapter' "
                  "(base untouched; the adapter subtracts s B0 A0 x). See mm.adapters.pissa."},
    )
    loftq_bits: int = field(default=4, metadata={"help": "init 'loftq': 4 (NF4, bitsandbytes) or 8 (int8)."})
    loftq_iter: int = field(default=1, metadata={"help": "init 'loftq': alternating steps (quantise, SVD)."})
    rank_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={"help": "Per-layer rank, as PEFT: {pattern: r}; a pattern matches a layer whose name ends in "
                  "it (as a regex, after a dot or whole); the first matching pattern wins."},
    )
    alpha_pattern: dict[str, float] = field(
        default_factory=dict, metadata={"help": "Per-layer alpha, matched as 'rank_pattern'."},
    )

    def validate(self) -> None:
        super().validate()
        if self.init not in ("kaiming", "gaussian", *WEIGHT_INITS):
            raise ConfigError(f"lora: key 'init' must be 'kaiming', 'gaussian', 'olora' or 'loftq', got {self.init!r}")
        if self.init in WEIGHT_INITS and type(self) is not LoRAConfig and type(self).build_for is LoRAConfig.build_for:
            raise ConfigError(f"{self.method}: key 'init' {self.init!r} is an init of method 'lora' only")
        if self.residual not in ("base", "adapter"):
            raise ConfigError(f"{self.method}: key 'residual' must be 'base' or 'adapter', got {self.residual!r}")
        if self.loftq_bits not in (4, 8):
            raise ConfigError(f"{self.method}: key 'loftq_bits' must be 4 or 8, got {self.loftq_bits}")
        if self.loftq_iter < 1:
            raise ConfigError(f"{self.method}: key 'loftq_iter' must be >= 1, got {self.loftq_iter}")
        for key, values in self.layer_patterns().items():
            for pattern, value in values.items():
                _check_pattern(self.method, key, pattern, value, int if key == "rank_pattern" else float)

    def layer_patterns(self) -> dict[str, dict]:
        """{'rank_pattern': ..., 'alpha_pattern': ...} as PEFT reads them; empty for a subclass that redefines
        'rank_pattern' with its own meaning (EVA: exact layer names written by its initialiser)."""
        own = all("rank_pattern" not in vars(cls).get("__annotations__", {})
                  for cls in type(self).__mro__[:type(self).__mro__.index(LoRAConfig)])
        return {"rank_pattern": self.rank_pattern, "alpha_pattern": self.alpha_pattern} if own else {}

    def for_layer(self, layer_name: str) -> LoRAConfig:
        """This config with the rank and alpha that ``rank_pattern`` / ``alpha_pattern`` give ``layer_name``."""
        patterns = self.layer_patterns()
        if not patterns:
            return self
        r_key = pattern_key(self.rank_pattern, layer_name)
        alpha_key = pattern_key(self.alpha_pattern, layer_name)
        if r_key is None and alpha_key is None:
            return self
        return dataclasses.replace(
            self, r=self.rank_pattern[r_key] if r_key is not None else self.r,
            alpha=float(self.alpha_pattern[alpha_key]) if alpha_key is not None else self.alpha)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def build(self, in_features: int, out_features: int, base_weight: torch.Tensor) -> LoRA:
        return LoRA(self, in_features, out_features, dtype=_param_dtype(base_weight), device=base_weight.device)

    def build_for(self, layer_name: str, in_features: int, out_features: int, base_weight: torch.Tensor) -> LoRA:
        if self.init in WEIGHT_INITS:
            from mm.adapters import lora_inits  # late: it imports this module

            build = lora_inits.olora_adapter if self.init == "olora" else lora_inits.loftq_adapter
            return build(self, layer_name, in_features, out_features, base_weight)
        return self.build(in_features, out_features, base_weight)

    def instance_layer_kinds(self) -> tuple[str, ...]:
        """The layer kinds this config adapts: OLoRA and LoftQ factor (out, in) matrices only."""
        return ("linear",) if self.init in WEIGHT_INITS else self.layer_kinds

    def build_conv(self, layer_name: str, conv: nn.Module) -> ConvLoRA:
        """The adapter for the convolution ``layer_name``; refuses a rank that would outgrow it."""
        check_conv_rank(layer_name, conv, self.r, self.method)
        return ConvLoRA(self, conv)

    def build_embedding(self, layer_name: str, embedding: nn.Module) -> nn.Module:
        """The adapter for the ``nn.Embedding`` ``layer_name``, in PEFT's layout (see ``mm.embedding``)."""
        from mm.embedding import EmbeddingLoRA, check_embedding

        check_embedding(layer_name, embedding, self.method, freeze_a=self.freeze_a)
        return EmbeddingLoRA(embedding, self.r, self.scaling)


def pattern_key(patterns: dict[str, object], layer_name: str) -> str | None:
    """The first key of ``patterns`` matching ``layer_name`` as PEFT matches it: ``(.*\\.)?(key)$``."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", layer_name)), None)


def _check_pattern(method: str, key: str, pattern: str, value: object, kind: type) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"{method}: key {key!r}: {pattern!r} is not a valid regular expression ({err})") from None
    number = isinstance(value, int | float) and not isinstance(value, bool) and (kind is float or isinstance(value, int))
    if not number or value <= 0:
        what = "an integer >= 1" if kind is int else "a positive number"
        raise ConfigError(f"{method}: key {key!r}: {pattern!r} must map to {what}, got {value!r}")


def _init_a(lora_a: nn.Parameter, config: LoRAConfig) -> None:
    if config.init == "kaiming":  # on a conv weight fan_in = in/groups * kernel, what each rank sees
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
    else:
        nn.init.normal_(lora_a, std=1.0 / config.r)
    lora_a.requires_grad_(not config.freeze_a)


def _param_dtype(base_weight: torch.Tensor) -> torch.dtype:
    # Quantised bases store integers; their adapters train in fp32.
    return base_weight.dtype if base_weight.is_floating_point() else torch.float32


class LoRA(Adapter):
    def __init__(
        self, config: LoRAConfig, in_features: int, out_features: int, *, dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.scaling = config.scaling
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r, dtype=dtype, device=device))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        _init_a(self.lora_A, config)

    def extra_repr(self) -> str:
        r, in_features = self.lora_A.shape
        return f"r={r}, in={in_features}, out={self.lora_B.shape[0]}, scaling={self.scaling:g}"

    def forward(self, x: torch.Tensor, out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if x.dtype != self.lora_A.dtype:  # checked, not a blind .to(): a no-op call still costs a dispatch
            x = x.to(self.lora_A.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        # One fused autograd node (see add_low_rank_): in the bench_lora training step this beat both
        # PEFT's graph and our earlier ``h = linear(x, A) * s; out.view(..).addmm_(h, B.T)``, whose
        # in-place write through a view cost two full-size gradient copies per layer (CopySlices).
        return add_low_rank_(out, x, self.lora_A, self.lora_B, self.scaling)

    def delta(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.dropout is not None:
            x = self.dropout(x)
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling


class ConvLoRA(Adapter):
    """LoRA on a ``nn.Conv{1,2,3}d``: ``out + scaling * B(A(x))``.

    ``lora_A`` (r, in/groups, *kernel) convolves with the layer's own stride, padding, padding mode, dilation
    and groups; ``lora_B`` (out, r/groups, 1, ...) is a grouped 1x1 convolution. Group g of the output thus
    sees only group g of the input, through ranks g*r/groups .. (g+1)*r/groups - 1, exactly as the layer does.
    """

    def __init__(self, config: LoRAConfig, conv: nn.Module) -> None:
        super().__init__()
        weight = conv.weight
        self.scaling, self.groups = config.scaling, conv.groups
        ones = (1,) * (weight.dim() - 2)
        kwargs = {"dtype": _param_dtype(weight), "device": weight.device}
        self.lora_A = nn.Parameter(torch.empty(config.r, *weight.shape[1:], **kwargs))
        self.lora_B = nn.Parameter(torch.zeros(weight.shape[0], config.r // conv.groups, *ones, **kwargs))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        _init_a(self.lora_A, config)

    def extra_repr(self) -> str:
        return (f"r={self.lora_A.shape[0]}, kernel={tuple(self.lora_A.shape[2:])}, groups={self.groups}, "
                f"scaling={self.scaling:g}")

    def forward(self, x: torch.Tensor, out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return out + self.delta(x, base).to(out.dtype)

    def delta(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if x.dtype != self.lora_A.dtype:
            x = x.to(self.lora_A.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        # The layer's own _conv_forward applies its geometry, padding_mode included, to A; scaling the r-wide
        # hidden costs r/out of scaling the result.
        hidden = base._conv_forward(x, self.lora_A, None) * self.scaling
        return conv_fn(base)(hidden, self.lora_B, groups=self.groups)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """B A per group, as a kernel of the layer's shape (out, in/groups, *kernel)."""
        rank, groups = self.lora_A.shape[0], self.groups
        a = self.lora_A.reshape(groups, rank // groups, -1)
        b = self.lora_B.reshape(groups, -1, rank // groups)
        return (b @ a).reshape(base.weight.shape) * self.scaling
