"""The ``causal_lm`` task: a transformers Llama (tiny from a config, or loaded from a local folder) on
generated arithmetic sequences."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

import mm
from train.engine.task import TASKS, AdapterTask


@dataclass
class LMModelConfig:
    path: str | None = field(
        default=None, metadata={"help": "Local folder of a transformers causal LM (null: a tiny Llama "
                                        "built from the sizes below, random init from the recipe seed)."})
    vocab_size: int = field(default=64, metadata={"help": "Tiny model: vocabulary size."})
    hidden_size: int = field(default=32, metadata={"help": "Tiny model: hidden size."})
    intermediate_size: int = field(default=64, metadata={"help": "Tiny model: MLP width."})
    layers: int = field(default=2, metadata={"help": "Tiny model: decoder layers."})
    heads: int = field(default=4, metadata={"help": "Tiny model: attention heads."})
    kv_heads: int = field(default=2, metadata={"help": "Tiny model: key/value heads."})


@dataclass
class LMDataConfig:
    seq_len: int = field(default=16, metadata={"help": "Tokens per sequence."})
    train_size: int = field(default=512, metadata={"help": "Generated training sequences."})
    eval_size: int = field(default=64, metadata={"help": "Generated evaluation sequences."})
    strides: list[int] = field(default_factory=lambda: [1, 2, 3],
                               metadata={"help": "Each sequence counts up by one of these, modulo the vocab."})
    seed: int = field(default=0, metadata={"help": "Seed of the generated data."})


class ArithmeticSequences:
    """``{"input_ids": (seq_len,)}`` samples: ``start + stride * i (mod vocab)``. The next token follows
    from the two before it, so a small LM learns it and its loss has a known floor of 0."""

    def __init__(self, size: int, seq_len: int, vocab: int, strides: list[int], seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, vocab, (size, 1), generator=gen)
        stride = torch.tensor(strides)[torch.randint(0, len(strides), (size, 1), generator=gen)]
        self.tokens = (starts + stride * torch.arange(seq_len)) % vocab

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.tokens[i]}


@TASKS.register("causal_lm")
class CausalLM(AdapterTask):
    """Next-token prediction with an adapted (optionally 4/8-bit quantised) transformers causal LM."""

    sections: ClassVar[dict[str, type]] = {"model": LMModelConfig, "data": LMDataConfig}

    def __init__(self, recipe: Any) -> None:
        super().__init__(recipe)
        with self.seeded():
            self.lm = self.adapt(self._load_base())

    def _load_base(self) -> nn.Module:
        from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

        cfg, quant = self.recipe.model, self.recipe.quant
        if cfg.path and quant.mode != "none":  # load straight into 4/8 bits: no full-precision copy
            from train.engine.quant import bnb_config, load_device

            return AutoModelForCausalLM.from_pretrained(
                cfg.path, quantization_config=bnb_config(quant), device_map={"": load_device()})
        if cfg.path:
            return AutoModelForCausalLM.from_pretrained(cfg.path, dtype=torch.float32)
        config = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                             intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.layers,
                             num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                             max_position_embeddings=max(64, self.recipe.data.seq_len))
        return LlamaForCausalLM(config)

    @classmethod
    def validate(cls, recipe: Any) -> None:
        data, source = recipe.data, recipe.source
        if data.seq_len < 2 or data.train_size < 1 or data.eval_size < 1:
            raise mm.ConfigError(f"{source}: keys 'data.seq_len' (>= 2), 'data.train_size' and "
                                 f"'data.eval_size' (>= 1) are out of range")
        if not data.strides:
            raise mm.ConfigError(f"{source}: key 'data.strides' needs at least one stride")

    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        ids = batch["input_ids"]
        return self.lm(input_ids=ids, labels=ids).loss, {}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict]) -> dict[str, float]:
        loss_sum, correct, count = 0.0, 0, 0
        for batch in batches:
            ids = batch["input_ids"]
            logits = self.lm(input_ids=ids).logits[:, :-1].float()
            target = ids[:, 1:]
            loss_sum += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                        reduction="sum").item()
            correct += int((logits.argmax(-1) == target).sum())
            count += target.numel()
        loss = loss_sum / count
        return {"loss": loss, "perplexity": float(torch.tensor(loss).exp()), "next_token_accuracy": correct / count}

    def _vocab(self) -> int:
        return int(self.lm.config.vocab_size)

    def train_dataset(self) -> Sequence[dict]:
        d = self.recipe.data
        return ArithmeticSequences(d.train_size, d.seq_len, self._vocab(), d.strides, d.seed)

    def eval_dataset(self) -> Sequence[dict]:
        d = self.recipe.data
        return ArithmeticSequences(d.eval_size, d.seq_len, self._vocab(), d.strides, d.seed + 1)
