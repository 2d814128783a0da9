"""DyLoRA (Valipour et al., 2023): one LoRA trained for every rank b in [r_min, r] at once.

Each training step samples b uniformly from {r_min, ..., r} (the paper's p_B) and runs the truncated
adapter ``(alpha / b) · B[:, :b] A[:b] x``. The paper's update rule (its Eqs. 7-8) changes only the b-th row
of A and the b-th column of B in that step: the first b-1 components were already trained for the
smaller ranks and are held fixed ("frozen" mode, our default; implemented by detaching them in the forward
pass, so they get no gradient). ``update='all'`` instead trains every component up to b (the ablation
without freezing). Components above b never see the step. Either way the components come out sorted by
importance, so after training the adapter runs at any rank k <= r as the plain LoRA ``(alpha/k) B_k A_k``.

Outside training (``model.eval()``) and for merging, the adapter runs at ``eval_rank`` (default r). Pick it
model-wide with ``set_rank(model, k)``. A command-line tool exposes the same choice with
``add_rank_flag(parser)`` (adds ``--dylora-rank K``) and ``apply_rank_flag(model, args)`` after loading.

During training a rank is drawn per forward pass by each adapter, unless ``sample_rank(model)`` pinned
one: call it once per optimizer step to draw b once and use it in every layer, as the paper does (all
layers then train the same truncation that evaluation will later use).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mm.adapters.base import ADAPTERS, Adapter, add_low_rank_
from mm.config import AdapterConfig, ConfigError

RANK_FLAG = "--dylora-rank"


@ADAPTERS.register("dylora")
@dataclass
class DyLoRAConfig(AdapterConfig):
    """DyLoRA: LoRA trained over a range of ranks at once, so one adapter runs at any rank up to r."""

    method: ClassVar[str] = "dylora"

    r_min: int = field(default=1, metadata={"help": "Smallest rank sampled in training (ranks r_min..r)."})
    eval_rank: int | None = field(
        default=None, metadata={"help": "Rank used outside training and for merging (None: r)."}
    )
    update: Literal["frozen", "all"] = field(
        default="frozen",
        metadata={"help": "'frozen': a step at rank b trains only component b (the paper's rule); "
                  "'all': it trains components 1..b."},
    )

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.r_min <= self.r:
            raise ConfigError(f"dylora: key 'r_min' must be in [1, r={self.r}], got {self.r_min}")
        if self.eval_rank is not None and not 1 <= self.eval_rank <= self.r:
            raise ConfigError(f"dylora: key 'eval_rank' must be in [1, r={self.r}], got {self.eval_rank}")
        if self.update not in ("frozen", "all"):
            raise ConfigError(f"dylora: key 'update' must be 'frozen' or 'all', got {self.update!r}")

    def build(self, in_features: int, out_features: int, base_weight: torch.Tensor) -> DyLoRA:
        dtype = base_weight.dtype if base_weight.is_floating_point() else torch.float32
        return DyLoRA(self, in_features, out_features, dtype=dtype, device=base_weight.device)


class DyLoRA(Adapter):
    def __init__(
        self, config: DyLoRAConfig, in_features: int, out_features: int, *, dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.alpha, self.r_min, self.frozen = config.alpha, config.r_min, config.update == "frozen"
        self.eval_rank = config.eval_rank or config.r
        self.train_rank: int | None = None  # pinned by sample_rank; None: draw per forward
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]

    def extra_repr(self) -> str:
        return f"r={self.r_min}..{self.r}, eval_rank={self.eval_rank}, frozen={self.frozen}"

    def draw_rank(self, generator: torch.Generator | None = None) -> int:
        return int(torch.randint(self.r_min, self.r + 1, (), generator=generator))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A_b, B_b, alpha / b) at the rank this forward runs at, with the paper's gradient masking."""
        if not self.training:
            b = self.eval_rank
            return self.lora_A[:b], self.lora_B[:, :b], self.alpha / b
        b = self.train_rank if self.train_rank is not None else self.draw_rank()
        a, bb = self.lora_A[:b], self.lora_B[:, :b]
        if self.frozen and b > 1:
            # Components 1..b-1 take part in the forward pass but receive no gradient this step.
            a = torch.cat([a[: b - 1].detach(), a[b - 1 :]])
            bb = torch.cat([bb[:, : b - 1].detach(), bb[:, b - 1 :]], dim=1)
        return a, bb, self.alpha / b

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.lora_A.dtype:
            x = x.to(self.lora_A.dtype)
        return self.dropout(x) if self.dropout is not None else x

    def forward(self, x: torch.Tensor, out: torch.Tensor, base: nn.Module) -> torch.Tensor:
        a, b, scaling = self.factors()
        # B_b (A_b x): LoRA's shape at rank b, so LoRA's fused node (add_low_rank_) serves it.
        return add_low_rank_(out, self._input(x), a, b, scaling)

    def delta(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        a, b, scaling = self.factors()
        return F.linear(F.linear(self._input(x), a), b) * scaling

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        k = self.eval_rank
        return (self.lora_B[:, :k] @ self.lora_A[:k]) * (self.alpha / k)


def _dylora_adapters(model: nn.Module, name: str | None) -> list[tuple[Any, str, DyLoRA]]:
    from mm.wrap import adapted_layers  # late: mm.wrap imports the adapter package

    found = [
        (layer, adapter_name, adapter)
        for _, layer in adapted_layers(model)
        for adapter_name, adapter in layer.adapters.items()
        if isinstance(adapter, DyLoRA) and (name is None or adapter_name == name)
    ]
    if not found:
        which = f"named {name!r}" if name is not None else "at all"
        raise ValueError(f"model has no DyLoRA adapter {which}")
    return found


def set_rank(model: nn.Module, rank: int, name: str | None = None) -> None:
    """Run the DyLoRA adapters (all, or adapter ``name``) at ``rank`` outside training and when merged.

    A runtime choice: a saved adapter keeps its config's ``eval_rank``; call this again after loading.
    """
    found = _dylora_adapters(model, name)
    for layer, adapter_name, adapter in found:
        if not 1 <= rank <= adapter.r:
            raise ValueError(f"DyLoRA adapter {adapter_name!r} has rank {adapter.r}; cannot run it at rank {rank}")
        if adapter_name in layer.merged:
            raise RuntimeError(f"DyLoRA adapter {adapter_name!r} is merged at rank {adapter.eval_rank}; unmerge "
                               "before changing its rank")
    for _, _, adapter in found:
        adapter.eval_rank = rank


def sample_rank(model: nn.Module, generator: torch.Generator | None = None) -> dict[str, int]:
    """Draw one training rank per DyLoRA adapter name and pin it in every layer until the next call.

    Call once per optimizer step. Returns {adapter name: rank}.
    """
    found = _dylora_adapters(model, None)
    drawn: dict[str, int] = {}
    for _, adapter_name, adapter in found:
        if adapter_name not in drawn:
            drawn[adapter_name] = adapter.draw_rank(generator)
        adapter.train_rank = drawn[adapter_name]
    return drawn


def unpin_rank(model: nn.Module) -> None:
    """Forget pinned training ranks: each adapter draws its own rank per forward again."""
    for _, _, adapter in _dylora_adapters(model, None):
        adapter.train_rank = None


def add_rank_flag(parser: Any) -> None:
    """Add ``--dylora-rank K`` to an argparse parser (the rank trained DyLoRA adapters run at)."""
    parser.add_argument(
        RANK_FLAG, type=int, default=None, metavar="K",
        help="run DyLoRA adapters at rank K (1 <= K <= their r); default: their eval_rank",
    )


def apply_rank_flag(model: nn.Module, args: Any) -> None:
    """Apply ``--dylora-rank`` from parsed ``args`` to ``model`` (no-op when the flag was not given)."""
    rank = getattr(args, RANK_FLAG.lstrip("-").replace("-", "_"), None)
    if rank is not None:
        set_rank(model, rank)
