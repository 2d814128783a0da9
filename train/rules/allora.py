"""ALLoRA (Huang & Balestriero, 2024): LoRA without dropout and scaling, with a norm-adaptive learning rate.

Each parameter row θ_i (a row of A or of B; a whole tensor for vectors and scalars) has its step scaled by

    c_i = 1 / sqrt(||θ_i||^2 + 1 / eta^2)

so rows at zero (LoRA's B at init) move with a boosted rate of up to ``eta`` times the base learning rate,
and rows with a large norm move proportionally slower (c_i ~ 1/||θ_i||). This replaces LoRA's alpha/r
scaling and dropout, which the paper argues slow down and destabilise short fine-tuning runs.

``apply_to`` says where c_i enters. 'step' (default) multiplies the optimizer's update, i.e. an adaptive
learning rate. 'gradient' multiplies the gradient before the base rule, the abstract's wording ("scaling
the per sample and per parameter gradients"); with SGD the two are identical, but Adam divides by the root
of the scaled squared gradient, which cancels a slowly varying c_i, hence the default. ``betas=None``
gives plain SGD, otherwise Adam(W) moments with bias correction.

The ALLoRA architecture is plain LoRA with alpha = r (scaling 1) and dropout 0:
``allora_lora_config(targets=[...], r=8)`` returns exactly that ``mm.LoRAConfig``. The optimizer works
with any adapter (LoRA-XS's R, LoLDU's diagonal, ...): it only looks at parameter norms.

In ``mmtune train`` the ``allora`` rule (``train.rules: [{name: allora, eta: 4}]``) replaces the optimizer
with ``ALLoRA`` (Adam moments with ``optim.name: adamw``, plain SGD with ``optim.name: sgd``; lr, weight
decay, betas and the schedule from ``optim``) and refuses a recipe whose adapters still have dropout or a
LoRA scaling other than 1.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mm.config import ConfigError
from train.rules.base import RULES, RuleConfig, RuleHooks


def allora_coefficient(
    param: torch.Tensor, eta: float, granularity: Literal["row", "tensor"] = "row",
) -> torch.Tensor:
    """1 / sqrt(||θ||^2 + 1/eta^2) per row (dim 0) of a matrix, or for the whole tensor; broadcastable."""
    p = param.detach()
    if p.dtype in (torch.float16, torch.bfloat16):  # norms of low-precision rows in float32
        p = p.float()
    if granularity == "row" and p.dim() >= 2:
        squared = p.flatten(1).pow(2).sum(dim=1).view(-1, *([1] * (p.dim() - 1)))
    else:
        squared = p.pow(2).sum()
    return torch.rsqrt(squared + 1.0 / eta**2)


class ALLoRA(torch.optim.Optimizer):
    """SGD or AdamW whose step for each parameter row is scaled by 1/sqrt(||row||^2 + 1/eta^2)."""

    def __init__(
        self, params: Iterable[Any], lr: float = 1e-3, *, eta: float,
        betas: tuple[float, float] | None = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, granularity: Literal["row", "tensor"] = "row",
        apply_to: Literal["step", "gradient"] = "step",
    ) -> None:
        if lr <= 0 or eta <= 0:
            raise ValueError(f"ALLoRA: lr and eta must be > 0, got lr={lr}, eta={eta}")
        if betas is not None and not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"ALLoRA: betas must be in [0, 1), got {betas}")
        if granularity not in ("row", "tensor") or apply_to not in ("step", "gradient"):
            raise ValueError(f"ALLoRA: granularity must be 'row' or 'tensor' and apply_to 'step' or 'gradient', "
                             f"got {granularity!r}, {apply_to!r}")
        defaults = dict(lr=lr, eta=eta, betas=betas, eps=eps, weight_decay=weight_decay, granularity=granularity,
                        apply_to=apply_to)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        coefficient = allora_coefficient(p, group["eta"], group["granularity"]).to(p.dtype)
        grad = p.grad * coefficient if group["apply_to"] == "gradient" else p.grad
        if group["betas"] is None:
            direction = grad
        else:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            beta1, beta2 = group["betas"]
            state["step"] += 1
            state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            first = state["exp_avg"] / (1 - beta1 ** state["step"])
            second = state["exp_avg_sq"] / (1 - beta2 ** state["step"])
            direction = first / (second.sqrt() + group["eps"])
        if group["apply_to"] == "step":
            direction = direction * coefficient
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(direction, alpha=-group["lr"])


def allora_lora_config(**kwargs: Any) -> Any:
    """``mm.LoRAConfig`` for ALLoRA: alpha = r (scaling 1) and no dropout; other keys pass through."""
    import mm

    fixed = sorted({"alpha", "dropout", "rslora"} & set(kwargs))
    if fixed:
        raise mm.ConfigError(f"allora: keys {fixed} are fixed by ALLoRA (scaling 1, no dropout); leave them out")
    r = kwargs.get("r", mm.LoRAConfig.__dataclass_fields__["r"].default)
    return mm.LoRAConfig(alpha=float(r), dropout=0.0, **kwargs)


@dataclass
class ALLoRARuleConfig(RuleConfig):
    eta: float = field(default=4.0, metadata={"help": "Largest step boost (at a zero row), in units of lr; the "
                                                      "paper tunes it, 4.0 is our default, not the paper's."})
    granularity: Literal["row", "tensor"] = field(
        default="row", metadata={"help": "Norm per row (dim 0) of each matrix, or per whole tensor."})
    apply_to: Literal["step", "gradient"] = field(
        default="step", metadata={"help": "Scale the optimizer's update (an adaptive lr) or the gradient."})

    def validate(self, recipe: Any, key: str) -> None:
        where = f"{recipe.source}: key '{key}'"
        if self.eta <= 0:
            raise ConfigError(f"{where}: allora needs eta > 0, got {self.eta}")
        if recipe.optim.name == "adamw8bit" or (recipe.optim.name == "sgd" and recipe.optim.momentum):
            raise ConfigError(f"{where}: allora is AdamW or plain SGD; set optim.name to adamw or sgd "
                              f"(momentum 0), got {recipe.optim.name} (momentum {recipe.optim.momentum})")
        if recipe.train.deepspeed is not None:
            raise ConfigError(f"{where}: allora needs each parameter's rows, which DeepSpeed flattens into "
                              "shards; drop train.deepspeed")
        for name, adapter in recipe.adapters.items():
            if getattr(adapter, "dropout", 0.0):
                raise ConfigError(f"{where}: ALLoRA trains without dropout; set adapters.{name}.dropout=0 "
                                  f"(got {adapter.dropout})")
            scaling = getattr(adapter, "scaling", None)
            if isinstance(scaling, float) and abs(scaling - 1.0) > 1e-12:
                raise ConfigError(f"{where}: ALLoRA has no LoRA scaling; set adapters.{name}.alpha equal to "
                                  f"its r={adapter.r} (and rslora false), got scaling {scaling:g}")


@RULES.register("allora")
class ALLoRARule(RuleHooks):
    """The ALLoRA optimizer in place of ``optim.name``, over the loop's param groups."""

    config_class = ALLoRARuleConfig

    def make_optimizer(self, groups: list[dict[str, Any]], optim: Any) -> torch.optim.Optimizer:
        cfg = self.config
        return ALLoRA(groups, lr=optim.lr, eta=cfg.eta, betas=None if optim.name == "sgd" else tuple(optim.betas),
                      eps=optim.eps, weight_decay=optim.weight_decay, granularity=cfg.granularity,
                      apply_to=cfg.apply_to)
