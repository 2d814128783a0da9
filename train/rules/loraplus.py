"""LoRA+ (Hayou, Ghosh & Yu, 2024): B learns faster than A.

LoRA's A and B play different roles (B starts at zero and maps the rank-r code back to the output width),
and the paper shows that one learning rate for both is inefficient for wide models; it sets
lr_B = ratio * lr_A with a ratio around 16. Switched on by ``optim.loraplus_ratio`` in a recipe: the
optimizer gets two param groups, every adapter's ``lora_B`` at ``optim.lr * ratio`` and everything else
that trains (A, other adapter tensors, a task's head) at ``optim.lr``. The schedule scales both groups
alike (LambdaLR multiplies each group's own base lr), so the ratio holds at every step.

Unlike PEFT's ``create_loraplus_optimizer``, 1-D parameters (biases, DoRA magnitudes) stay at the base
rate: the paper's argument is about B, and a head's bias is not a LoRA factor. PEFT's separate embedding
learning rate does not apply (mmtune adapts linear layers).
"""

from __future__ import annotations

from typing import Any

from mm.config import ConfigError
from train.rules.base import RuleHooks

B_NAME = "lora_B"


class LoRAPlus(RuleHooks):
    """Splits each param group into its non-B and B parts, the B part at ``lr * optim.loraplus_ratio``."""

    def __init__(self, recipe: Any) -> None:
        super().__init__(None, recipe)

    def param_groups(self, task: Any, groups: list[dict[str, Any]], optim: Any) -> list[dict[str, Any]]:
        b_ids = {id(p) for name, p in task.named_parameters() if name.rsplit(".", 1)[-1] == B_NAME}
        split: list[dict[str, Any]] = []
        for group in groups:
            settings = {k: v for k, v in group.items() if k != "params"}
            lr = settings.pop("lr", optim.lr)
            others = [p for p in group["params"] if id(p) not in b_ids]
            bs = [p for p in group["params"] if id(p) in b_ids]
            split += [{**settings, "params": others, "lr": lr}] if others else []
            split += [{**settings, "params": bs, "lr": lr * optim.loraplus_ratio}] if bs else []
        if not any(id(p) in b_ids for group in groups for p in group["params"]):
            raise ConfigError(f"{self.recipe.source}: key 'optim.loraplus_ratio': no trainable {B_NAME} in the "
                              f"model; LoRA+ needs a LoRA-style adapter (lora, dylora, eva, block_lora, ...)")
        return split
