"""One row per adapter method (or variant) for the contract suite in tests/mm/test_contract.py.

A new method joins the suite by adding a row here; `test_every_method_has_a_case` fails until it does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import mm


@dataclass
class Case:
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    identity_at_init: bool = True  # the method promises base output before training
    mergeable: bool = True  # the update is a weight delta
    # Data-driven initialisers (EVA, LoRA-GA, ...) run here: (model, adapter name, input) -> None.
    prepare: Callable[[nn.Module, str, torch.Tensor], None] | None = None

    def config(self, targets: list[str]) -> mm.AdapterConfig:
        return mm.AdapterConfig.from_dict({"method": self.method, "targets": targets, **self.options})

    def adapts(self, layer_kind: str) -> bool:
        """Whether the method attaches to layers of ``layer_kind`` ('linear', 'conv', 'embedding')."""
        from mm.conv import supports_layer_kind

        if layer_kind == "embedding" and (self.options.get("freeze_a") or self.options.get("rank_pattern")):
            # An embedding LoRA's A starts at zero, so FFA's frozen A is refused there (test_embedding_lora);
            # the pattern row's patterns name the linear toys' layers, none of the embedding toy's.
            return False
        return supports_layer_kind(self.config(["x"]), layer_kind)


CASES: dict[str, Case] = {
    "lora": Case("lora", {"r": 4, "alpha": 8.0}),
    "lora-rslora-gaussian": Case("lora", {"r": 4, "alpha": 8.0, "rslora": True, "init": "gaussian"}),
    "lora-patterns": Case("lora", {"r": 8, "alpha": 8.0, "rank_pattern": {r".*(conv\d|fc1|q_proj|c_fc|tokens)": 4}, "alpha_pattern": {".*(2|v_proj|c_attn|positions)": 2.0}}),  # per-layer rank/alpha on every toy (rank 4 on every conv: the depthwise toy takes no more)
    "lora-olora-adapter-residual": Case("lora", {"r": 4, "alpha": 8.0, "init": "olora", "residual": "adapter"}),  # residual="base" (PEFT's) edits the base weight: tests/mm/test_olora.py
    "lora-ffa": Case("lora", {"r": 4, "alpha": 8.0, "freeze_a": True}),
    "dora": Case("dora", {"r": 4, "alpha": 8.0}),
    "dora-rslora-dropout": Case("dora", {"r": 4, "alpha": 8.0, "rslora": True, "dropout": 0.1}),
    "pissa-adapter-residual": Case("pissa", {"r": 4, "alpha": 4.0, "residual": "adapter"}),  # residual="base" (the default) edits the base weight, so disable/switch do not give W: tests/mm/test_pissa.py covers it
    "pissa-fast-adapter-residual": Case("pissa", {"r": 4, "alpha": 8.0, "svd": "fast", "niter": 2, "residual": "adapter"}),
    "lora_ga-adapter-residual": Case("lora_ga", {"r": 4, "alpha": 8.0, "residual": "adapter"}, prepare=lambda model, name, x: mm.adapters.lora_ga.initialize(model, [x, x.flip(0)], lambda m, b: getattr(out := m(b), "logits", out).float().pow(2).mean(), name=name)),  # noqa: E501
    "eva": Case("eva", {"r": 4, "alpha": 8.0, "tau": 0.9}, prepare=lambda model, name, x: mm.adapters.eva.initialize(model, [torch.randn(x.shape, generator=torch.Generator().manual_seed(i)) if x.is_floating_point() else torch.randint(0, int(x.max()) + 1, x.shape, generator=torch.Generator().manual_seed(i)) for i in range(8)], name=name, max_passes=20)),  # noqa: E501
    "lora_xs": Case("lora_xs", {"r": 4, "alpha": 4.0, "init_std": 0.0}),
    "lora_xs-paper-init": Case("lora_xs", {"r": 4, "alpha": 4.0}, identity_at_init=False),
    "lora_sb": Case("lora_sb", {"r": 4, "alpha": 4.0}, identity_at_init=False, prepare=lambda model, name, x: mm.adapters.lora_sb.initialize(model, [x], lambda m, b: getattr(out := m(b), "logits", out).float().pow(2).mean(), name=name)),  # noqa: E501
    "loldu": Case("loldu", {"r": 4, "alpha": 4.0}),
    "dylora": Case("dylora", {"r": 4, "alpha": 8.0, "eval_rank": 3}),
    "block_lora": Case("block_lora", {"r": 4, "alpha": 8.0, "blocks": 2}),
    "nola": Case("nola", {"r": 4, "alpha": 8.0, "num_basis_a": 16, "num_basis_b": 16}),
    "randlora": Case("randlora", {"r": 4, "alpha": 8.0}),
    "bone": Case("bone", {"r": 4}),
    "mos": Case("mos", {"r": 4, "alpha": 8.0, "pool_shards": 12, "private_shards": 2}),
    "diffora": Case("diffora", {"r": 4, "alpha": 8.0}),
    "mtsk-ms": Case("mtsk", {"r": 4, "alpha": 8.0, "strategy": "ms", "scales": ["a4_v2", "a16_v5"]}),
    "mtsk-mss": Case("mtsk", {"r": 4, "alpha": 8.0, "strategy": "mss", "scales": ["a4_v2"], "default_scale": "a4_v2"}),  # one scale: every LoRA trains in the un-routed contract forward; tests/mm/test_mtsk.py covers several
    "mole": Case("mole", {"r": 4, "alpha": 8.0, "num_experts": 2}, mergeable=False),
    "mixlora": Case("mixlora", {"r": 4, "alpha": 8.0, "num_experts": 3, "top_k": 2}, mergeable=False),
    "mm_lora": Case("mm_lora", {"r": 4, "alpha": 8.0, "vision_r": 2, "vision_alpha": 4.0, "unrouted": "both"}, mergeable=False),  # no route in the contract forward: both LoRAs on every token; tests/mm/test_mm_lora.py covers the routed split
    "trainable_tokens": Case("trainable_tokens", {"token_indices": [0, 2, 3, 5, 7]}),  # embeddings only: the embedding toy (its tied head: tests/mm/test_trainable_tokens.py)
}


@torch.no_grad()
def perturb(model: nn.Module, name: str | None = None, seed: int = 0, scale: float = 0.1) -> None:
    """Stand-in for training: move every trainable adapter tensor (of ``name``, or all) off its init."""
    gen = torch.Generator().manual_seed(seed)
    for _, layer in mm.adapted_layers(model):
        for adapter_name, adapter in layer.adapters.items():
            if name is not None and adapter_name != name:
                continue
            for param in adapter.parameters():
                if param.requires_grad:
                    param.add_(torch.randn(param.shape, generator=gen).to(param) * scale)
