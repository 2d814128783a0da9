"""MixLoRA (Li et al., 2024): top-k LoRA experts on the feed-forward block with a load-balance loss.

The router takes the softmax over E experts, keeps the top k and renormalises their probabilities to sum
to 1 (as the authors' code does). Expert j is the frozen FFN with expert j's LoRA on each targeted
projection, and the block returns ``sum_j g_j FFN_{e_j}(x)``: each chosen expert's pre-activation goes
through the nonlinearity on its own. The frozen weights still run once per token, not once per choice
(``mm.adapters.moe_ffn``: the authors' shared-W1/W3 optimisation, and the down projection by linearity).
The auxiliary loss ``E * sum_i f_i P_i`` over all layers' router logits concatenated (MoE-PEFT's form;
``balance_loss="per_layer"`` averages per-layer losses instead) is returned, times ``aux_loss_coef``
(default 0.001, MoE-PEFT's), by ``mm.adapters.moe.aux_loss(model)``. MixLoRA's independently configured attention LoRA is a second adapter:
``mm.attach(model, LoRAConfig(targets=[q, k, v, o]), "attn")``.

``router_scope="layer"`` instead gives each projection its own router mixing inside that projection
(MoLA's layout). Router, dispatch and MoLA per-layer expert counts live in ``mm.adapters.moe``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from mm.adapters.base import ADAPTERS
from mm.adapters.moe import MixtureConfig
from mm.config import ConfigError


@ADAPTERS.register("mixlora")
@dataclass
class MixLoRAConfig(MixtureConfig):
    """MixLoRA: top-k LoRA experts on the FFN with an auxiliary load-balance loss."""

    method: ClassVar[str] = "mixlora"
    renormalize: ClassVar[bool] = True

    num_experts: int = field(default=8, metadata={"help": "LoRA experts per layer (each of rank r)."})
    top_k: int = field(default=2, metadata={"help": "Experts each token uses (their gates sum to 1)."})

    def validate(self) -> None:
        if isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k < 1:
            raise ConfigError(f"mixlora: key 'top_k' must be >= 1, got {self.top_k}")
        super().validate()
