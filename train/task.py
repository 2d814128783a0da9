"""Tasks: what a recipe trains. A task is an ``nn.Module`` = backbone + adapters + head + loss.

The loop needs only the ``Task`` protocol below. A task declares the recipe sections it reads
(``sections``: name -> config dataclass) and registers itself with ``@TASKS.register(name)``; a
recipe's ``task:`` key picks it. A track adds its task module to ``TASK_MODULES`` (one line).

Two small real tasks live here for tests and demos: ``digits`` (scikit-learn's 8x8 digits, an MLP or
ViT encoder with adapters and a linear head) and ``causal_lm`` (a transformers Llama, tiny from a
config or loaded from a local folder, on generated arithmetic sequences).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

import mm
from mm.registry import Registry

#: Task classes by the name a recipe's ``task:`` key uses.
TASKS: Registry[type] = Registry("task")

#: Modules whose import registers tasks; tracks append theirs here.
TASK_MODULES = ["train.task", "train.eo", "train.avsr", "train.mllm_task"]


def get_task(name: str) -> type:
    """The task class registered as ``name`` (imports ``TASK_MODULES`` first)."""
    for module in TASK_MODULES:
        importlib.import_module(module)
    return TASKS.get(name)


@runtime_checkable
class Task(Protocol):
    """What ``train.loop`` calls. ``forward(batch)`` must equal ``training_step(batch)`` so that DDP and
    DeepSpeed see the step as the wrapped module's forward."""

    sections: ClassVar[dict[str, type]]

    def training_step(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]: ...

    def evaluate(self, batches: Iterable[Any]) -> dict[str, float]: ...

    def train_dataset(self) -> Sequence[Any]: ...

    def eval_dataset(self) -> Sequence[Any] | None: ...

    def collate(self, samples: list[Any]) -> Any: ...


def add_balance_loss(model: nn.Module, loss: torch.Tensor, logs: dict[str, float]):
    """(task loss + every active mixture's weighted balance loss, logs with it and the routers' health).

    Logged per step: ``moe_aux_loss`` (what was added), ``moe_router_entropy`` (mean over blocks; log E is
    uniform routing) and ``moe_max_expert_share`` (the busiest expert's share of its block's choices;
    1/E is perfect balance). Per-expert detail: ``mm.adapters.moe.router_logs``.
    """
    from mm.adapters.moe import aux_loss, mixtures, router_stats

    found = list(mixtures(model))  # one walk of the model per step
    if not found:
        return loss, logs
    extra = aux_loss(model, found)
    stats = router_stats(model, found)
    logs = {**logs, "moe_aux_loss": float(extra.detach())}
    if stats:
        logs["moe_router_entropy"] = sum(s.entropy for s in stats) / len(stats)
        logs["moe_max_expert_share"] = max(max(s.tokens_per_expert) / max(1, sum(s.tokens_per_expert))
                                           for s in stats)
    return loss + extra.to(loss.dtype), logs


class AdapterTask(nn.Module):
    """Shared plumbing: quantise the backbone if asked, attach the recipe's adapters, default collate."""

    sections: ClassVar[dict[str, type]] = {}

    def __init__(self, recipe: Any) -> None:
        super().__init__()
        self.recipe = recipe

    @classmethod
    def validate(cls, recipe: Any) -> None:
        """Cross-section checks (raise ``mm.ConfigError`` naming the key and ``recipe.source``)."""

    def forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        loss, logs = self.training_step(batch)
        return add_balance_loss(self, loss, logs)

    def training_step(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def collate(self, samples: list[Any]) -> Any:
        return torch.utils.data.default_collate(samples)

    def seeded(self):
        """A block whose random draws (base init, adapter init) depend on the recipe seed alone, so every
        rank, and a later rebuild from the saved config, gets the same modules."""
        return _Seeded(self.recipe.seed)

    def adapt(self, backbone: nn.Module) -> nn.Module:
        """Quantise (``quant.mode``) then attach every adapter of the recipe to ``backbone``."""
        from train.quant import quantize_linears

        if self.recipe.quant.mode != "none":
            quantize_linears(backbone, self.recipe.quant)
        for name, config in self.recipe.adapters.items():
            mm.attach(backbone, config, name)
        return backbone


class _Seeded:
    def __init__(self, seed: int) -> None:
        self.seed, self.fork = seed, None

    def __enter__(self) -> None:
        self.fork = torch.random.fork_rng(devices=[])
        self.fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc) -> None:
        self.fork.__exit__(*exc)


# ---------------------------------------------------------------------------- digits classification


@dataclass
class DigitsModelConfig:
    encoder: Literal["mlp", "vit"] = field(default="mlp", metadata={"help": "Encoder architecture."})
    width: int = field(default=64, metadata={"help": "Hidden width (MLP) or embedding width (ViT)."})
    depth: int = field(default=2, metadata={"help": "Hidden layers (MLP) or blocks (ViT)."})
    checkpoint: str | None = field(
        default=None, metadata={"help": "Local safetensors state dict of the encoder (null: random init "
                                        "from the recipe seed, the same on every process)."})


@dataclass
class DigitsDataConfig:
    domain: str = field(default="original", metadata={"help": "Digits domain (data.digits.DOMAINS)."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the fixed train/test split."})


class DigitsMLP(nn.Module):
    """A small MLP encoder over flattened 8x8 images; adapters target ``fc1``, ``fc2``, ..."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        dims = [64] + [width] * depth
        for i in range(depth):
            self.add_module(f"fc{i + 1}", nn.Linear(dims[i], dims[i + 1]))
        self.depth, self.feature_size = depth, width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.flatten(1)
        for i in range(self.depth):
            x = F.gelu(getattr(self, f"fc{i + 1}")(x))
        return x


@TASKS.register("digits")
class DigitsClassification(AdapterTask):
    """Digit classification: adapted encoder -> linear head (trained too) -> cross-entropy."""

    sections: ClassVar[dict[str, type]] = {"model": DigitsModelConfig, "data": DigitsDataConfig}

    def __init__(self, recipe: Any) -> None:
        super().__init__(recipe)
        cfg = recipe.model
        with self.seeded():
            if cfg.encoder == "mlp":
                encoder: nn.Module = DigitsMLP(cfg.width, cfg.depth)
            else:
                from encoders.vit import VisionTransformer, ViTConfig

                encoder = VisionTransformer(ViTConfig(width=cfg.width, depth=cfg.depth))
            if cfg.checkpoint:
                from safetensors.torch import load_file

                encoder.load_state_dict(load_file(cfg.checkpoint))
            if cfg.encoder == "vit":
                encoder.head = nn.Identity()  # the task's head replaces the encoder's own
            self.encoder = self.adapt(encoder)
            self.head = nn.Linear(cfg.width, 10)

    @classmethod
    def validate(cls, recipe: Any) -> None:
        from data.digits import DOMAINS

        if recipe.data.domain not in DOMAINS:
            raise mm.ConfigError(f"{recipe.source}: key 'data.domain' must be one of {', '.join(DOMAINS)}, "
                                 f"got {recipe.data.domain!r}")

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        features = self.encoder(images) if self.recipe.model.encoder == "mlp" else self.encoder.features(images)
        return self.head(features)

    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        logits = self.logits(batch["image"])
        loss = F.cross_entropy(logits.float(), batch["label"])
        accuracy = (logits.argmax(-1) == batch["label"]).float().mean()
        return loss, {"accuracy": accuracy.item()}

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict]) -> dict[str, float]:
        loss_sum, correct, count = 0.0, 0, 0
        for batch in batches:
            logits = self.logits(batch["image"]).float()
            loss_sum += F.cross_entropy(logits, batch["label"], reduction="sum").item()
            correct += int((logits.argmax(-1) == batch["label"]).sum())
            count += len(batch["label"])
        return {"loss": loss_sum / count, "accuracy": correct / count}

    def train_dataset(self) -> Sequence[dict]:
        from data.digits import DigitsDataset

        return DigitsDataset("train", self.recipe.data.domain, seed=self.recipe.data.split_seed)

    def eval_dataset(self) -> Sequence[dict]:
        from data.digits import DigitsDataset

        return DigitsDataset("test", self.recipe.data.domain, seed=self.recipe.data.split_seed)


# ---------------------------------------------------------------------------- causal language modelling


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
            from train.quant import bnb_config, load_device

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
