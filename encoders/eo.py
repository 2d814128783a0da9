"""SAR and multispectral towers: timm ViTs or ResNets with any number of input bands, single or fused.

Pretrained weights load from a local file (safetensors, or a ``torch.save`` file read with
``weights_only=True``; nothing is downloaded) in the layouts EO users start from:

- timm state dicts (``patch_embed.proj.weight``, ``blocks.N...`` / ``conv1.weight``, ``layerN...``), which is
  also the layout of torchgeo's published weights (``ResNet50_Weights.SENTINEL2_ALL_MOCO`` and the other
  SSL4EO-S12 / SSL4EO-L / SatlasPretrain ResNet and ViT weights are timm models' state dicts);
- the same keys under a prefix (``module.encoder_q.``, ``backbone.``, ``model.``, ``encoder.``) and/or
  inside a ``state_dict`` / ``model`` entry, as MoCo/DINO checkpoints and Lightning checkpoints store them.

The first convolution (ViT patch embedding or ResNet stem) is fitted to the tower's bands: when the
checkpoint names its input bands (``checkpoint_bands``, e.g. SSL4EO-S12's 13 Sentinel-2 L1C bands B1 ...
B12 with B8A) and the tower knows its own (``band_names``), the kernels of the matching bands are taken; an
RGB checkpoint is adapted (``average``: every band gets the mean of R, G, B; ``repeat``: band i gets kernel
i mod 3; scaled by 3/N so a grey scene answers as in RGB). ViT position embeddings are resampled when the
chip size differs. ``feature_maps`` gives the multi-scale maps a segmentation decoder reads.

Adapters attach with ``mm.attach(tower, mm.LoRAConfig(targets=tower.default_targets))``: a ViT's
``qkv``, ``proj``, ``fc1``, ``fc2`` linears; a ResNet's block convolutions (``conv1``/``conv2``/``conv3``,
LoRA on convolutions) and its linear ``neck`` (identity at init).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from mm.errors import MMTuneError

#: Adapter targets of a timm ViT tower: attention qkv / output and both MLP layers of every block.
VIT_TARGETS = ["qkv", "proj", "fc1", "fc2"]
#: A ResNet's block convolutions (conv LoRA, mm.layer.AdaptedConv) and its linear neck.
RESNET_TARGETS = ["conv1", "conv2", "conv3", "neck"]
#: Prefixes under which checkpoints of other frameworks keep a backbone's keys (MoCo, DINO, Lightning).
PREFIXES = ("module.encoder_q.", "module.base_encoder.", "module.backbone.", "module.", "backbone.", "model.",
            "encoder.", "teacher.backbone.", "student.backbone.")


class EOCheckpointError(MMTuneError, ValueError):
    """A pretrained-weights file is missing or does not fit the tower; the message names the file."""


@dataclass
class EOTowerConfig:
    arch: Literal["vit", "resnet"] = field(default="vit", metadata={"help": "Tower family."})
    model: str = field(default="vit_tiny_patch16_224", metadata={"help": "timm model name."})
    in_chans: int = field(default=3, metadata={"help": "Input bands (set from the selected bands)."})
    img_size: int | tuple[int, int] = field(default=32, metadata={"help": "Chip size in pixels (ViT), or (H, W)."})
    patch_size: int | None = field(default=8, metadata={"help": "ViT patch size (null: the model's)."})
    embed_dim: int | None = field(default=None, metadata={"help": "ViT width override (tiny test towers)."})
    depth: int | None = field(default=None, metadata={"help": "ViT depth override."})
    num_heads: int | None = field(default=None, metadata={"help": "ViT heads override."})
    checkpoint: str | None = field(default=None, metadata={"help": "Local RGB-pretrained weights to adapt."})
    adapt: Literal["average", "repeat"] = field(default="average", metadata={"help": "RGB -> N-band stem rule."})
    checkpoint_bands: list[str] | None = field(default=None, metadata={
        "help": "Names of the checkpoint's input bands (e.g. SSL4EO-S12: B1 ... B12 with B8A, 13 bands)."})
    band_names: list[str] | None = field(default=None, metadata={"help": "The tower's own band names (set by "
                                                                        "the task from the data)."})
    feature_levels: int = field(default=2, metadata={"help": "Feature maps handed to a segmentation decoder "
                                                             "(the last N blocks / stages)."})


def adapt_rgb_kernels(weight: torch.Tensor, bands: int, mode: str = "average") -> torch.Tensor:
    """First-layer kernels (O, 3, kh, kw) pretrained on RGB -> (O, bands, kh, kw), rescaled by 3/bands."""
    if weight.shape[1] != 3:
        raise ValueError(f"expected RGB kernels (O, 3, kh, kw), got {tuple(weight.shape)}")
    if bands == 3:
        return weight.clone()
    if mode == "average":
        adapted = weight.mean(1, keepdim=True).repeat(1, bands, 1, 1)
    elif mode == "repeat":
        adapted = weight[:, [i % 3 for i in range(bands)]]
    else:
        raise ValueError(f"unknown adapt mode {mode!r}; use 'average' or 'repeat'")
    return adapted * (3.0 / bands)


def read_state(path: str, stem: str) -> dict[str, torch.Tensor]:
    """A backbone state dict from a local file, unwrapped from ``state_dict``/``model`` and a key prefix."""
    if not Path(path).is_file():
        raise EOCheckpointError(f"{path}: checkpoint not found (pretrained tower weights load from a local file)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise EOCheckpointError(f"{path}: unreadable checkpoint ({err})") from None
    for key in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and isinstance(state.get(key), dict) and stem not in state:
            state = state[key]
    if not isinstance(state, dict):
        raise EOCheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    if stem not in state:
        prefix = next((p for p in PREFIXES if p + stem in state), None)
        if prefix is None:
            raise EOCheckpointError(f"{path}: no {stem!r} (nor under {', '.join(PREFIXES[:4])}, ...) in the checkpoint")
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def fit_stem(weight: torch.Tensor, config: EOTowerConfig, path: str) -> torch.Tensor:
    """The checkpoint's first-layer kernels fitted to the tower's bands (by name, or adapted from RGB)."""
    channels = weight.shape[1]
    if config.checkpoint_bands is not None:
        if len(config.checkpoint_bands) != channels:
            raise EOCheckpointError(f"{path}: checkpoint_bands names {len(config.checkpoint_bands)} bands, the "
                                    f"stem has {channels} input channels")
        if config.band_names is None:
            raise EOCheckpointError(f"{path}: checkpoint_bands given but the tower's band_names are unknown")
        missing = [b for b in config.band_names if b not in config.checkpoint_bands]
        if missing:
            raise EOCheckpointError(f"{path}: bands {missing} are not among the checkpoint's "
                                    f"{config.checkpoint_bands}")
        picked = weight[:, [config.checkpoint_bands.index(b) for b in config.band_names]]
        return picked * (channels / len(config.band_names))  # keep the summed response of a flat scene
    if channels == config.in_chans:
        return weight
    if channels != 3:
        raise EOCheckpointError(f"{path}: the stem takes {channels} bands, the tower {config.in_chans}; name them "
                                f"with checkpoint_bands to pick the matching kernels")
    return adapt_rgb_kernels(weight, config.in_chans, config.adapt)


class EOTower(nn.Module):
    """One modality's encoder: (B, C, H, W) -> (B, feature_size)."""

    def __init__(self, config: EOTowerConfig) -> None:
        super().__init__()
        import timm

        self.config = config
        kwargs: dict = {"pretrained": False, "num_classes": 0, "in_chans": config.in_chans}
        if config.arch == "vit":
            kwargs["img_size"] = config.img_size
            for key in ("patch_size", "embed_dim", "depth", "num_heads"):
                if getattr(config, key) is not None:
                    kwargs[key] = getattr(config, key)
        self.backbone = timm.create_model(config.model, **kwargs)
        self.feature_size = int(self.backbone.num_features)
        self.neck = nn.Identity()
        if config.arch == "resnet":
            self.neck = nn.Linear(self.feature_size, self.feature_size)
            with torch.no_grad():
                self.neck.weight.copy_(torch.eye(self.feature_size))
                self.neck.bias.zero_()
        self.default_targets = list(VIT_TARGETS if config.arch == "vit" else RESNET_TARGETS)
        available = len(self.backbone.blocks) if config.arch == "vit" else len(self.backbone.feature_info)
        self.levels = max(1, min(config.feature_levels, available))  # a shallow test tower has fewer
        if config.checkpoint:
            self.load_rgb_checkpoint(config.checkpoint)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.neck(self.backbone(images))

    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The last ``feature_levels`` block (ViT, as patch grids) or stage (ResNet) outputs, (B, C, h, w)."""
        return self.backbone.forward_intermediates(images, indices=self.levels, intermediates_only=True)

    @property
    def feature_channels(self) -> list[int]:
        if self.config.arch == "resnet":
            return [info["num_chs"] for info in self.backbone.feature_info[-self.levels:]]
        return [self.feature_size] * self.levels

    def load_rgb_checkpoint(self, path: str) -> None:
        """Load pretrained weights (timm/torchgeo layouts, any prefix); the stem is fitted to the bands."""
        own = self.backbone.state_dict()
        # The stem: conv1.weight (resnet18/50), conv1.0.weight (deep-stem resnet*t/d), patch_embed.proj.weight.
        stem = next(k for k, v in own.items() if v.ndim == 4 and v.shape[1] == self.config.in_chans)
        state = read_state(path, stem)
        state[stem] = fit_stem(state[stem], self.config, path)
        if "pos_embed" in state and state["pos_embed"].shape != own.get("pos_embed", state["pos_embed"]).shape:
            from timm.layers import resample_abs_pos_embed

            grid = self.backbone.patch_embed.grid_size
            prefix = 0 if getattr(self.backbone, "no_embed_class", False) else self.backbone.num_prefix_tokens
            state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(grid), num_prefix_tokens=prefix)
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc.", "head_drop", "norm_pre"))
                 or k in own}
        mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        if mismatched:
            raise EOCheckpointError(f"{path}: shapes differ from the tower for {mismatched[:5]} (patch size or "
                                    f"width?)")
        missing, unexpected = self.backbone.load_state_dict(state, strict=False)
        if unexpected or missing:
            raise EOCheckpointError(f"{path}: checkpoint does not fit {self.config.model}: missing {missing[:5]}, "
                                    f"unexpected {unexpected[:5]}")


class FusedEO(nn.Module):
    """Several towers, one per modality; features are concatenated in the towers' order."""

    def __init__(self, towers: dict[str, EOTower]) -> None:
        super().__init__()
        if not towers:
            raise ValueError("FusedEO needs at least one tower")
        self.towers = nn.ModuleDict(towers)
        self.feature_size = sum(t.feature_size for t in towers.values())
        self.default_targets = sorted({t for tower in towers.values() for t in tower.default_targets})

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        missing = [name for name in self.towers if name not in inputs]
        if missing:
            raise KeyError(f"FusedEO: batch lacks modality {missing}; has {sorted(inputs)}")
        return torch.cat([tower(inputs[name]) for name, tower in self.towers.items()], dim=-1)

    def feature_maps(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Every tower's feature maps, towers in order (a segmentation decoder merges them)."""
        return [m for name, tower in self.towers.items() for m in tower.feature_maps(inputs[name])]

    @property
    def feature_channels(self) -> list[int]:
        return [c for tower in self.towers.values() for c in tower.feature_channels]


def build_eo_encoder(towers: dict[str, EOTowerConfig]) -> FusedEO:
    """A (possibly single-tower) EO encoder taking a dict of modality tensors."""
    return FusedEO({name: EOTower(config) for name, config in towers.items()})
