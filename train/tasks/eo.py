"""Earth-observation tasks: the M3LEO release (or a generated miniset in its formats) or a user's own
GeoTIFFs, through one adapted tower per modality, with any mix of heads: land-cover presence (multi-label
BCE; mAP, F1), per-pixel segmentation (FPN-style decoder; mIoU, per-class IoU) and regression (masked MSE
on standardised targets; RMSE in physical units).

Recipes: ``configs/eo/*.yaml`` (``task: eo``); docs/eo.md lists them with their commands. Generated data
is used only when a recipe says ``data.synthetic: true``; a missing split file is an error naming it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

import mm
from data.fake_m3leo import EODataConfig
from data.geotiff_config import GeoTIFFDataConfig
from train.engine.task import TASKS, AdapterTask


@dataclass
class EOModelConfig:
    arch: Literal["vit", "resnet"] = field(default="vit", metadata={"help": "Tower family (one tower per modality)."})
    model: str = field(default="vit_tiny_patch16_224", metadata={"help": "timm model name of every tower."})
    patch_size: int | None = field(default=8, metadata={"help": "ViT patch size (lowered to divide a chip size)."})
    embed_dim: int | None = field(default=64, metadata={"help": "ViT width (null: the model's)."})
    depth: int | None = field(default=2, metadata={"help": "ViT depth (null: the model's)."})
    num_heads: int | None = field(default=4, metadata={"help": "ViT heads (null: the model's)."})
    checkpoints: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Modality -> local pretrained checkpoint (timm / torchgeo layout); its stem is fitted to the bands."})
    checkpoint_bands: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Modality -> names of its checkpoint's input bands (kernels are picked by band name)."})
    adapt: Literal["average", "repeat"] = field(default="average", metadata={"help": "RGB -> N-band rule."})
    train_towers: bool = field(default=False, metadata={"help": "Also train the towers' own weights (no "
                                                                 "adapters needed; random-init towers)."})
    decoder_width: int = field(default=64, metadata={"help": "Channels of the segmentation decoder."})
    feature_levels: int = field(default=2, metadata={"help": "Feature maps per tower the decoder reads."})


@dataclass
class EOTaskData(EODataConfig):
    source: Literal["m3leo", "geotiff"] = field(default="m3leo", metadata={
        "help": "m3leo: the release layout (split_file) or synthetic; geotiff: your own files (key geotiff)."})
    geotiff: GeoTIFFDataConfig | None = field(default=None, metadata={
        "help": "Your own GeoTIFF products, chipping and labels (data/geotiff_config.py)."})


def m3leo_targets(labels: list[str]) -> list[Any]:
    from data.geotiff import Target
    from data.m3leo_products import REGRESSION_LABELS, WORLDCOVER_SHORT

    names, kinds = WORLDCOVER_SHORT, {"landcover": "presence", "landcover_map": "segmentation"}
    return [Target(label, kinds[label], len(names), names) if label in kinds else Target(label, "regression")
            for label in labels if label in kinds or label in REGRESSION_LABELS]


def _patch(size: tuple[int, int], wanted: int | None) -> int | None:
    """The largest patch size <= ``wanted`` that divides both chip sides."""
    if wanted is None:
        return None
    common = math.gcd(*size)
    return max(p for p in range(1, min(wanted, common) + 1) if common % p == 0)


@TASKS.register("eo")
class EOTask(AdapterTask):
    """Adapted EO towers -> presence / segmentation / regression heads, each on its own label key."""

    sections: ClassVar[dict[str, type]] = {"model": EOModelConfig, "data": EOTaskData}

    def __init__(self, recipe: Any) -> None:
        super().__init__(recipe)
        from encoders.eo import EOTowerConfig, build_eo_encoder
        from heads.multilabel import MultiLabelHead
        from heads.regression import RegressionHead
        from heads.segmentation import SegmentationHead

        cfg = recipe.model
        self._train, self._eval, self.targets = self._datasets(recipe.data)
        self.modalities = list(self._train.band_names)
        first = self._train[0]
        towers = {}
        for name, bands in self._train.band_names.items():
            size = tuple(int(n) for n in first[name].shape[-2:])
            towers[name] = EOTowerConfig(
                arch=cfg.arch, model=cfg.model, in_chans=len(bands), img_size=size, patch_size=_patch(size, cfg.patch_size),
                embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, checkpoint=cfg.checkpoints.get(name),
                adapt=cfg.adapt, checkpoint_bands=cfg.checkpoint_bands.get(name), band_names=list(bands),
                feature_levels=cfg.feature_levels)
        with self.seeded():
            encoder = build_eo_encoder(towers)
        self.encoder = encoder if cfg.train_towers and not recipe.adapters else self.adapt(encoder)
        self.presence = [t for t in self.targets if t.kind == "presence"]
        self.segmentation = [t for t in self.targets if t.kind == "segmentation"]
        self.regression = [t.key for t in self.targets if t.kind == "regression"]
        with self.seeded():
            self.presence_heads = nn.ModuleDict({t.key: MultiLabelHead(encoder.feature_size, t.classes)
                                                 for t in self.presence})
            self.segmentation_heads = nn.ModuleDict({t.key: SegmentationHead(encoder.feature_channels, t.classes,
                                                                             cfg.decoder_width)
                                                     for t in self.segmentation})
            self.regression_head = RegressionHead(encoder.feature_size, len(self.regression)) if self.regression else None
        if self.regression_head is not None:
            targets, valid = self._regression_targets([self._train.labels(i) for i in range(len(self._train))])
            self.regression_head.fit_scaling(targets, valid)

    @staticmethod
    def _datasets(data: EOTaskData) -> tuple[Sequence[dict], Sequence[dict], list[Any]]:
        if data.source == "geotiff":
            from data.geotiff import GeoTIFFChips

            chips = GeoTIFFChips(data.geotiff)
            return chips.dataset("train"), chips.dataset("val"), chips.targets
        from data.fake_m3leo import ensure_chips
        from data.m3leo import M3LEODataset

        m3leo = ensure_chips(data)
        return M3LEODataset(m3leo, "train"), M3LEODataset(m3leo, "val"), m3leo_targets(m3leo.labels)

    @classmethod
    def validate(cls, recipe: Any) -> None:
        data = recipe.data
        if data.source == "geotiff" and data.geotiff is None:
            raise mm.ConfigError(f"{recipe.source}: key 'data.geotiff' must declare inputs and labels (source: geotiff)")
        if data.source == "m3leo" and not data.split_file and not data.synthetic:
            raise mm.ConfigError(f"{recipe.source}: key 'data.split_file' is empty and 'data.synthetic' is false")
        if data.source == "m3leo" and not data.labels:
            raise mm.ConfigError(f"{recipe.source}: key 'data.labels' is empty; name at least one target")
        if recipe.model.train_towers and recipe.adapters:
            raise mm.ConfigError(f"{recipe.source}: key 'model.train_towers' trains whole towers; drop 'adapters'")
        if not recipe.model.train_towers and not recipe.adapters:
            raise mm.ConfigError(f"{recipe.source}: give 'adapters' (or model.train_towers: true)")

    def _regression_targets(self, samples: list[dict] | dict) -> tuple[torch.Tensor, torch.Tensor]:
        batch = torch.utils.data.default_collate(samples) if isinstance(samples, list) else samples
        return (torch.stack([batch[k].float() for k in self.regression], -1),
                torch.stack([batch[f"{k}_valid"].bool() for k in self.regression], -1))

    def _inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        return {name: batch[name] for name in self.modalities}

    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        from heads.multilabel import multilabel_loss
        from heads.regression import masked_mse
        from heads.segmentation import segmentation_loss

        inputs = self._inputs(batch)
        loss, logs = torch.zeros(()), {}
        if self.presence or self.regression:
            features = self.encoder(inputs)
            loss = features.new_zeros(())
            for t in self.presence:
                bce = multilabel_loss(self.presence_heads[t.key](features), batch[t.key], batch[f"{t.key}_valid"])
                loss, logs[f"bce_{t.key}"] = loss + bce, bce.item()
            if self.regression_head is not None:
                targets, valid = self._regression_targets(batch)
                mse = masked_mse(self.regression_head(features), self.regression_head.standardize(targets), valid)
                loss, logs["mse_std"] = loss + mse, mse.item()
        if self.segmentation:
            maps = self.encoder.feature_maps(inputs)
            for t in self.segmentation:
                target = batch[t.key]
                ce = segmentation_loss(self.segmentation_heads[t.key](maps, tuple(target.shape[-2:])), target)
                loss, logs[f"ce_{t.key}"] = loss + ce, ce.item()
        return loss, logs

    @torch.no_grad()
    def evaluate(self, batches: Iterable[dict]) -> dict[str, float]:
        from heads.multilabel import multilabel_metrics
        from heads.regression import rmse
        from heads.segmentation import confusion_matrix, iou_metrics

        scores: dict[str, list] = {t.key: [] for t in self.presence}
        confusion = {t.key: torch.zeros(t.classes, t.classes, dtype=torch.long) for t in self.segmentation}
        preds, targets, target_valid = [], [], []
        for batch in batches:
            inputs = self._inputs(batch)
            if self.presence or self.regression:
                features = self.encoder(inputs)
                for t in self.presence:
                    scores[t.key].append((torch.sigmoid(self.presence_heads[t.key](features).float()),
                                          batch[t.key], batch[f"{t.key}_valid"]))
                if self.regression_head is not None:
                    target, valid = self._regression_targets(batch)
                    preds.append(self.regression_head.predict(features))
                    targets.append(target)
                    target_valid.append(valid)
            if self.segmentation:
                maps = self.encoder.feature_maps(inputs)
                for t in self.segmentation:
                    logits = self.segmentation_heads[t.key](maps, tuple(batch[t.key].shape[-2:]))
                    confusion[t.key] += confusion_matrix(logits.argmax(1), batch[t.key], t.classes)
        metrics: dict[str, float] = {}
        for key, parts in scores.items():
            probs, labels, valid = (torch.cat(p) for p in zip(*parts, strict=True))
            found = multilabel_metrics(probs, labels, valid=valid)
            metrics.update(found if len(scores) == 1 else {f"{k}_{key}": v for k, v in found.items()})
        for key, counts in confusion.items():
            found = iou_metrics(counts, list(next(t.names for t in self.segmentation if t.key == key)) or None)
            metrics.update(found if len(confusion) == 1 else {f"{k}_{key}": v for k, v in found.items()})
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
