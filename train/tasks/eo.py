"""Earth-observation tasks on M3LEO chips: SAR-only, S2-only or fused towers, adapted, with a multi-label
land-cover head and/or regression heads (built-up fraction, biomass, elevation).

Recipes: ``configs/eo/*.yaml`` (``task: eo``). With ``data.fake_chips > 0`` and no split file yet, the
recipe first writes that many generated chips (data/fake_geotiff.py) under ``data.fake_root``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

import mm
from data.fake_geotiff import EODataConfig, ensure_chips
from data.m3leo import REGRESSION_LABELS, WORLDCOVER_CODES
from train.engine.task import TASKS, AdapterTask


@dataclass
class EOModelConfig:
    arch: Literal["vit", "resnet"] = field(default="vit", metadata={"help": "Tower family (one tower per modality)."})
    model: str = field(default="vit_tiny_patch16_224", metadata={"help": "timm model name of every tower."})
    patch_size: int | None = field(default=8, metadata={"help": "ViT patch size."})
    embed_dim: int | None = field(default=64, metadata={"help": "ViT width (null: the model's)."})
    depth: int | None = field(default=2, metadata={"help": "ViT depth (null: the model's)."})
    num_heads: int | None = field(default=4, metadata={"help": "ViT heads (null: the model's)."})
    checkpoints: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Modality -> local RGB-pretrained checkpoint; its stem is adapted to the modality's bands."})
    adapt: Literal["average", "repeat"] = field(default="average", metadata={"help": "RGB -> N-band rule."})
    train_towers: bool = field(default=False, metadata={"help": "Also train the towers' own weights (no "
                                                                 "adapters needed; random-init towers)."})


@TASKS.register("eo")
class EOTask(AdapterTask):
    """Adapted EO towers -> concatenated features -> land-cover presence (BCE) + regression (masked MSE)."""

    sections: ClassVar[dict[str, type]] = {"model": EOModelConfig, "data": EODataConfig}

    def __init__(self, recipe: Any) -> None:
        super().__init__(recipe)
        from data.m3leo import M3LEODataset
        from encoders.eo import EOTowerConfig, build_eo_encoder
        from heads.multilabel import MultiLabelHead
        from heads.regression import RegressionHead

        cfg, data = recipe.model, ensure_chips(recipe.data)
        self.data_config = data
        self._train, self._eval = M3LEODataset(data, "train"), M3LEODataset(data, "val")
        size = int(self._train[0][next(iter(data.modalities))].shape[-1])
        towers = {name: EOTowerConfig(
            arch=cfg.arch, model=cfg.model, in_chans=len(index), img_size=size, patch_size=cfg.patch_size,
            embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
            checkpoint=cfg.checkpoints.get(name), adapt=cfg.adapt) for name, index in self._train.band_index.items()}
        encoder = build_eo_encoder(towers)
        self.encoder = encoder if cfg.train_towers and not recipe.adapters else self.adapt(encoder)
        self.regression = [label for label in data.labels if label in REGRESSION_LABELS]
        self.landcover = "landcover" in data.labels
        self.landcover_head = MultiLabelHead(encoder.feature_size, len(WORLDCOVER_CODES)) if self.landcover else None
        self.regression_head = RegressionHead(encoder.feature_size, len(self.regression)) if self.regression else None
        if self.regression_head is not None:
            targets, valid = self._regression_targets([self._train[i] for i in range(len(self._train))])
            self.regression_head.fit_scaling(targets, valid)

    @classmethod
    def validate(cls, recipe: Any) -> None:
        data = recipe.data
        if not data.split_file and data.fake_chips <= 0:
            raise mm.ConfigError(f"{recipe.source}: key 'data.split_file' is empty and 'data.fake_chips' is 0")
        if recipe.model.train_towers and recipe.adapters:
            raise mm.ConfigError(f"{recipe.source}: key 'model.train_towers' trains whole towers; drop 'adapters'")
        if not recipe.model.train_towers and not recipe.adapters:
            raise mm.ConfigError(f"{recipe.source}: give 'adapters' (or model.train_towers: true)")

    def _regression_targets(self, samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = torch.utils.data.default_collate(samples) if isinstance(samples, list) else samples
        return (torch.stack([batch[k].float() for k in self.regression], -1),
                torch.stack([batch[f"{k}_valid"].bool() for k in self.regression], -1))

    def features(self, batch: dict) -> torch.Tensor:
        return self.encoder({name: batch[name] for name in self.data_config.modalities})

    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        from heads.multilabel import multilabel_loss
        from heads.regression import masked_mse

        features = self.features(batch)
        loss, logs = features.new_zeros(()), {}
        if self.landcover_head is not None:
            bce = multilabel_loss(self.landcover_head(features), batch["landcover"], batch["landcover_valid"])
            loss, logs["bce"] = loss + bce, bce.item()
        if self.regression_head is not None:
            targets, valid = self._regression_targets(batch)
            mse = masked_mse(self.regression_head(features), self.regression_head.standardize(targets), valid)
            loss, logs["mse_std"] = loss + mse, mse.item()
        return loss, logs

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict]) -> dict[str, float]:
        from heads.multilabel import multilabel_metrics
        from heads.regression import rmse

        scores, labels, valid, preds, targets, target_valid = [], [], [], [], [], []
        for batch in batches:
            features = self.features(batch)
            if self.landcover_head is not None:
                scores.append(torch.sigmoid(self.landcover_head(features).float()))
                labels.append(batch["landcover"])
                valid.append(batch["landcover_valid"])
            if self.regression_head is not None:
                t, v = self._regression_targets(batch)
                preds.append(self.regression_head.predict(features))
                targets.append(t)
                target_valid.append(v)
        metrics: dict[str, float] = {}
        if scores:
            metrics.update(multilabel_metrics(torch.cat(scores), torch.cat(labels), valid=torch.cat(valid)))
        if preds:
            errors = rmse(torch.cat(preds), torch.cat(targets), torch.cat(target_valid))
            metrics.update({f"rmse_{name}": float(e) for name, e in zip(self.regression, errors, strict=True)})
        return metrics

    def train_dataset(self) -> Sequence[dict]:
        return self._train

    def eval_dataset(self) -> Sequence[dict]:
        return self._eval


def validate_config(path: str) -> Any:
    """Validator of configs/eo/: clustering recipes (``task: cluster``) or training recipes (``task: eo``)."""
    import yaml

    from train.engine.config import load_recipe

    with open(path) as handle:
        task = (yaml.safe_load(handle) or {}).get("task")
    if task == "cluster":
        from train.tasks.cluster import load_cluster_recipe

        return load_cluster_recipe(path)
    return load_recipe(path)
