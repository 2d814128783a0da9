"""Mixtures of LoRA experts: the router, the dispatch and the balance loss that MoLE and MixLoRA share.

Each adapted projection holds E LoRA experts stacked as ``lora_A`` (E, r, in) and ``lora_B`` (E, out, r). A
router (E logits per token, computed in fp32) picks the top-k experts e_1..e_k of each token with gates
g_1..g_k (s = alpha / r below).

Router scope ``"block"`` (MoLE, MixLoRA): the adapted projections under one parent module (an LLM MLP's
gate/up/down, open_clip's c_fc/c_proj) share one router, so a token uses the same experts in every
projection of the block; an expert is the block with that expert's LoRAs, and the block returns
``sum_j g_j FFN_{e_j}(x)``. With top-1 that is each projection using its token's expert. With top-k > 1 the
input projections return one row per (token, expert) and the output projection folds them back
(``mm.adapters.moe_ffn``), so the nonlinearity sees each expert's own pre-activation, as in MixLoRA. A block
whose projections all read its input width (attention q/k/v/o) has nothing to fold: there each projection
returns ``W x + sum_j g_j s B_{e_j} A_{e_j} x``. Scope ``"layer"`` gives every projection its own router and
that per-projection mixture (MoLA's layout). Dispatch is vectorised (``mm.adapters.moe_dispatch``): no
Python loop over tokens or experts.

MoLA (Gao et al., 2024) is the per-layer expert count: ``layer_experts`` (a list by layer index) or
``expert_groups`` with ``num_layers`` (equal groups of consecutive layers, e.g. [2, 4, 6, 8] = more experts
in higher layers), resolved from the layer index in each module's name.

Balance loss, router and padding mask: ``mm.adapters.moe_router``. ``aux_loss(model)`` returns, for every
active mixture, ``aux_loss_coef`` times its balance loss from the latest forward, in the form
``balance_loss`` names: ``"concat"`` (MoE-PEFT's MixLoRA: one loss over all layers' router logits
concatenated; routers with different expert counts form one concatenation per count, averaged),
``"per_layer"`` (the mean of each router's own loss) or ``"none"``. The default ``"auto"`` follows each
reference: ``"concat"`` for block routers (MixLoRA, MoLE), ``"none"`` for MoLA's per-projection routers
(``router_scope="layer"``: MoE-PEFT's MoLA has ``router_loss`` off), whose init is likewise Kaiming-uniform
(``router_init="auto"``) where MixLoRA's is normal(0, 0.02). ``aux_loss_coef`` defaults to MoE-PEFT's
0.001. ``router_stats(model)`` gives tokens per expert and router entropy per block for logging.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from mm.adapters.base import Adapter, NotMergeableError, add_matmul_
from mm.adapters.lora import LoRAConfig, _param_dtype
from mm.adapters.moe_dispatch import (  # noqa: F401  (grouped_delta, masked_delta: re-exported)
    DISPATCH,
    MASKED_MAX_WIDTH,
    grouped_delta,
    masked_delta,
    masked_mix,
)
from mm.adapters.moe_ffn import add_folded, expand_output, fold_input
from mm.adapters.moe_router import (  # noqa: F401  (re-exported: the router API lives with the mixtures)
    PADDING_MASK,
    ROUTER_INIT_STD,
    Router,
    Routing,
    concat_balance_loss,
    load_balance_loss,
)
from mm.config import ConfigError
from mm.wrap import _layer_index, adapted_layers


@dataclass
class MixtureConfig(LoRAConfig):
    """Fields shared by the mixtures of LoRA experts (not registered itself: use 'mole' or 'mixlora')."""

    num_experts: int = field(default=4, metadata={"help": "LoRA experts per layer (each of rank r)."})
    layer_experts: list[int] | None = field(
        default=None, metadata={"help": "MoLA: experts for each layer index (layer i gets layer_experts[i])."}
    )
    expert_groups: list[int] | None = field(
        default=None,
        metadata={"help": "MoLA rule: expert counts for equal groups of consecutive layers, lowest first, e.g. "
                  "[2, 4, 6, 8] (more in higher layers); needs num_layers."},
    )
    num_layers: int | None = field(
        default=None, metadata={"help": "Depth of the model, for expert_groups."}
    )
    router_scope: Literal["block", "layer"] = field(
        default="block",
        metadata={"help": "'block': one router per parent module shared by its projections, experts are whole "
                  "FFNs (top-k > 1: each choice its own row through the block); 'layer': a router per "
                  "projection mixing inside it (MoLA)."},
    )
    aux_loss_coef: float = field(
        default=0.001, metadata={"help": "Weight of the load-balance loss that aux_loss(model) returns "
                                         "(MoE-PEFT's default)."}
    )
    balance_loss: Literal["auto", "concat", "per_layer", "none"] = field(
        default="auto",
        metadata={"help": "'concat': one loss over all layers' router logits concatenated (MoE-PEFT's MixLoRA); "
                  "'per_layer': the mean of the routers' own losses; 'none'; 'auto': none for router_scope "
                  "'layer' (MoLA), else concat."},
    )
    router_init: Literal["auto", "normal", "kaiming"] = field(
        default="auto",
        metadata={"help": "'normal': std 0.02 (MixLoRA); 'kaiming': Kaiming-uniform (MoLA); 'auto': kaiming for "
                  "router_scope 'layer', else normal."},
    )
    router_jitter: float = field(
        default=0.0,
        metadata={"help": "In training, multiply the router's input by noise uniform in [1 - j, 1 + j] (MixLoRA's "
                  "and Switch Transformer's jitter); 0 = off. The experts see the clean input."},
    )
    dispatch: Literal["auto", "masked", "grouped"] = field(
        default="auto",
        metadata={"help": "'masked': all experts' r-wide projections in one matmul, gates as a sparse mask; "
                  "'grouped': tokens sorted by expert into batched matmuls (cost independent of E); 'auto': "
                  "masked while E*r <= 256, else grouped. Same result."},
    )

    top_k = 1  # the subclass decides: MoLE is top-1, MixLoRA a field
    renormalize = True  # gates = chosen probabilities divided by their sum

    def __post_init__(self) -> None:
        super().__post_init__()
        self._groups: dict[str, tuple[weakref.ref, set[str]]] = {}  # block -> (router, projections) of one attach

    def validate(self) -> None:
        super().validate()
        m = self.method  # router_scope and dispatch: the Literal type check names the key
        if self.aux_loss_coef < 0:
            raise ConfigError(f"{m}: key 'aux_loss_coef' must be >= 0, got {self.aux_loss_coef}")
        if not 0 <= self.router_jitter < 1:
            raise ConfigError(f"{m}: key 'router_jitter' must be in [0, 1), got {self.router_jitter}")
        if self.layer_experts is not None and self.expert_groups is not None:
            raise ConfigError(f"{m}: give 'layer_experts' or 'expert_groups', not both")
        if (self.expert_groups is None) != (self.num_layers is None):
            raise ConfigError(f"{m}: 'expert_groups' and 'num_layers' go together (the rule needs the depth)")
        if self.num_layers is not None and self.num_layers < len(self.expert_groups or []):
            raise ConfigError(f"{m}: key 'num_layers' ({self.num_layers}) is smaller than the number of "
                              f"expert_groups ({len(self.expert_groups)})")
        for key in ("num_experts", "layer_experts", "expert_groups"):
            value = getattr(self, key)
            for count in [value] if isinstance(value, int) else value or []:
                if count < max(1, self.top_k):
                    raise ConfigError(f"{m}: key {key!r} has {count} experts; each layer needs at least "
                                      f"top_k={self.top_k} (and 1)")

    @property
    def resolved_balance_loss(self) -> str:
        if self.balance_loss != "auto":
            return self.balance_loss
        return "none" if self.router_scope == "layer" else "concat"

    @property
    def resolved_router_init(self) -> str:
        if self.router_init != "auto":
            return self.router_init
        return "kaiming" if self.router_scope == "layer" else "normal"

    def experts_at(self, layer_name: str) -> int:
        """The expert count of the layer called ``layer_name`` (MoLA's per-layer allocation, or num_experts)."""
        if self.layer_experts is None and self.expert_groups is None:
            return self.num_experts
        index = _layer_index(layer_name, self.layers_pattern)
        if index is None:
            raise ConfigError(f"{self.method}: module {layer_name!r} has no layer index for per-layer expert "
                              "counts; set 'layers_pattern' (e.g. 'layers', 'resblocks')")
        if self.layer_experts is not None:
            if index >= len(self.layer_experts):
                raise ConfigError(f"{self.method}: 'layer_experts' has {len(self.layer_experts)} entries, "
                                  f"module {layer_name!r} is layer {index}")
            return self.layer_experts[index]
        if index >= self.num_layers:
            raise ConfigError(f"{self.method}: module {layer_name!r} is layer {index}, but num_layers is "
                              f"{self.num_layers}")
        return self.expert_groups[index * len(self.expert_groups) // self.num_layers]

    def _router_for(self, layer_name: str, in_features: int, experts: int, device: torch.device) -> tuple[Router, bool]:
        """(router, whether this layer owns it): block scope shares one router per parent per attach."""
        if self.router_scope == "layer":
            router = Router(in_features, experts, self, layer_name, device)
            router.add_member(layer_name, in_features)
            return router, True
        block, _, leaf = layer_name.rpartition(".")
        ref, members = self._groups.get(block, (None, set()))
        router = ref() if ref is not None else None
        if router is None or leaf in members:  # a leaf seen again: this is a new attach of the config
            router, members = Router(in_features, experts, self, block, device), set()
            self._groups[block] = (weakref.ref(router), members)
            owner = True
        else:  # same parent, same layer index: the same expert count
            owner = False
        members.add(leaf)
        router.add_member(leaf, in_features)
        return router, owner

    def build_for(self, layer_name: str, in_features: int, out_features: int, base_weight: torch.Tensor):
        experts = self.experts_at(layer_name)
        router, owner = self._router_for(layer_name, in_features, experts, base_weight.device)
        return MixtureOfLoRAExperts(self, in_features, out_features, router=router, owns_router=owner,
                                    dtype=_param_dtype(base_weight), device=base_weight.device)

    def build(self, in_features: int, out_features: int, base_weight: torch.Tensor):
        return self.build_for("", in_features, out_features, base_weight)


class MixtureOfLoRAExperts(Adapter):
    """E LoRA experts on one projection, mixed per token by a (possibly block-shared) router."""

    mergeable = False

    def __init__(self, config: MixtureConfig, in_features: int, out_features: int, *, router: Router,
                 owns_router: bool, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        experts = router.num_experts
        self.scaling = config.scaling
        self.method = config.method
        self.lora_A = nn.Parameter(torch.empty(experts, config.r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(experts, out_features, config.r, dtype=dtype, device=device))
        for expert_A in self.lora_A.data:  # per expert: a 3-D tensor's fan-in would count r * in
            if config.init == "kaiming":
                nn.init.kaiming_uniform_(expert_A, a=math.sqrt(5))
            else:
                nn.init.normal_(expert_A, std=1.0 / config.r)
        self.lora_A.requires_grad_(not config.freeze_a)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.owns_router = owns_router
        if owns_router:
            self.router = router
        else:  # not registered: its parameters are saved and trained once, with the owning projection
            object.__setattr__(self, "shared_router", router)
        self.routes_input = in_features == router.in_features
        name = config.dispatch
        if name == "auto":
            name = "masked" if experts * config.r <= MASKED_MAX_WIDTH else "grouped"
        self.dispatch = DISPATCH[name]
        self.grouped_pairs = name == "grouped"  # whole-FFN rows (moe_ffn) follow the same rule
        self._pairs: torch.Tensor | None = None  # the folded (token, expert) rows, from fold to forward

    @property
    def expands_output(self) -> bool:
        """This projection reads the input of a whole-FFN block mixture and returns one row per choice."""
        return self.routes_input and self.block_router.expands

    @property
    def folds_input(self) -> bool:
        """This projection reads the expanded rows of a whole-FFN block mixture and folds them back."""
        return not self.routes_input and self.block_router.expands

    @staticmethod
    def fold(x: torch.Tensor, adapters: list[MixtureOfLoRAExperts]) -> torch.Tensor:
        return fold_input(x, adapters)

    @property
    def block_router(self) -> Router:
        return self.router if self.owns_router else self.shared_router

    def extra_repr(self) -> str:
        experts, r, in_features = self.lora_A.shape
        role = "routes" if self.routes_input else "reuses routing"
        if self.block_router.expands:
            role = "expands to top-k rows" if self.routes_input else "folds top-k rows"
        return (f"experts={experts}, r={r}, in={in_features}, out={self.lora_B.shape[1]}, "
                f"scaling={self.scaling:g}, {role}, block={self.block_router.block!r}")

    def routing_for(self, x: torch.Tensor) -> Routing:
        flat = x.reshape(-1, x.shape[-1])
        router = self.block_router
        if self.routes_input:
            return router(flat, x)
        routing = router.reuse(flat.shape[0], f"{self.method} in block {router.block!r}")
        router._input = None  # the block's output projection ran: a later call with the same tensor re-routes
        return routing

    def _inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(flat tokens after dropout, chosen experts, gates times the LoRA scale)."""
        routing = self.routing_for(x)
        flat = x.reshape(-1, x.shape[-1]).to(self.lora_A.dtype)
        if self.dropout is not None:
            flat = self.dropout(flat)
        return flat, routing.experts, (routing.gates * self.scaling).to(flat.dtype)

    def delta(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        update = self.dispatch(*self._inputs(x), self.lora_A, self.lora_B)
        return update.view(*x.shape[:-1], update.shape[-1])

    def forward(self, x: torch.Tensor, out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.block_router.expands:
            return expand_output(self, x, out) if self.routes_input else add_folded(self, out)
        if self.dispatch is masked_delta:  # B's matmul accumulates into the base output in place
            mixed, weight = masked_mix(*self._inputs(x), self.lora_A, self.lora_B)
            return add_matmul_(out, mixed.to(out.dtype), weight.to(out.dtype))
        update = self.delta(x, base)
        if out.is_contiguous() and out.dtype == update.dtype:
            return out.add_(update)  # into the base's fresh output: no full-size temporary
        return out + update.to(out.dtype)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        raise NotMergeableError(
            f"{self.method} routes every token to its own experts, so its update is no single weight "
            "delta and cannot be merged; keep it unmerged (mm.merge refuses, mm.disable_adapters still works)"
        )


def mixtures(model: nn.Module, *, active_only: bool = True):
    """(adapter name, adapter) for each router-owning projection of the model's mixtures (active ones)."""
    for _, layer in adapted_layers(model):
        for name, adapter in layer.adapters.items():
            if not isinstance(adapter, MixtureOfLoRAExperts) or not adapter.owns_router:
                continue
            if not active_only or not (layer.disabled or name not in layer.active or name in layer.merged):
                yield name, adapter


def aux_loss(model: nn.Module, found: list | None = None) -> torch.Tensor:
    """Sum over active mixtures of ``aux_loss_coef`` times their balance loss (``balance_loss``: the routers'
    logits concatenated, or the mean of per-router losses) from the latest forward.

    Add it to the task loss: ``loss = task_loss + mm.adapters.moe.aux_loss(model)``. ``found``: the
    ``list(mixtures(model))`` a caller already has, to skip walking the model again.
    """
    routers: dict[str, list[Router]] = {}
    configs: dict[str, MixtureConfig] = {}
    for name, adapter in mixtures(model) if found is None else found:
        if adapter.router.balance_loss is not None and adapter.config.resolved_balance_loss != "none":
            routers.setdefault(name, []).append(adapter.router)
            configs[name] = adapter.config
    total = torch.zeros((), device=next(model.parameters()).device)
    for name, members in routers.items():
        if configs[name].resolved_balance_loss == "per_layer":
            loss = torch.stack([router.balance_loss for router in members]).mean()
        else:  # one concatenation per expert count (MoLA's per-layer counts cannot share one)
            by_count: dict[int, list] = {}
            for router in members:
                by_count.setdefault(router.num_experts, []).append(router.balance_sums)
            loss = torch.stack([concat_balance_loss(sums) for sums in by_count.values()]).mean()
        total = total + configs[name].aux_loss_coef * loss
    return total


@dataclass
class RouterStats:
    adapter: str
    block: str
    tokens_per_expert: list[int]
    entropy: float
    balance_loss: float


def router_stats(model: nn.Module, found: list | None = None) -> list[RouterStats]:
    """Per router of the active mixtures, from the latest forward: tokens per expert, mean router entropy."""
    return [
        RouterStats(name, a.router.block, a.router.tokens_per_expert.tolist(), float(a.router.entropy),
                    float(a.router.balance_loss.detach()))
        for name, a in (mixtures(model) if found is None else found) if a.router.tokens_per_expert is not None
    ]


def router_logs(model: nn.Module, prefix: str = "moe") -> dict[str, float]:
    """Flat scalars for a logger: per block the entropy, balance loss and each expert's token share."""
    logs = {}
    for stats in router_stats(model):
        key = f"{prefix}/{stats.adapter}/{stats.block or 'root'}"
        total = max(1, sum(stats.tokens_per_expert))
        logs[f"{key}/entropy"] = stats.entropy
        logs[f"{key}/balance_loss"] = stats.balance_loss
        for expert, count in enumerate(stats.tokens_per_expert):
            logs[f"{key}/expert{expert}"] = count / total
    return logs
