"""The ``digits`` task: scikit-learn's 8x8 digits, an MLP or ViT encoder with adapters and a linear head."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

import mm
from train.engine.task import TASKS, AdapterTask


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


