"""SAR and multispectral towers: timm ViTs or ResNets with any number of input bands, single or fused.

An RGB-pretrained checkpoint (a local safetensors or ``torch.save`` file; nothing is downloaded) loads into
an N-band tower by adapting its first convolution (the ViT patch embedding or ResNet stem):

- ``average``: every band gets the mean of the R, G, B kernels,
- ``repeat``: band i gets kernel i mod 3,

each scaled by 3/N, so a scene whose N bands all equal one grey image gives the same first-layer response
as that grey image in RGB (for ``repeat``: when N is a multiple of 3). ViT position embeddings are resampled when the chip size differs.

Adapters attach with ``mm.attach(tower, mm.LoRAConfig(targets=tower.default_targets))``: a ViT's
``qkv``, ``proj``, ``fc1``, ``fc2`` linears. A ResNet has only convolutions, which the adapter core does not
wrap; its tower ends in a linear ``neck`` (identity at init) that adapters target instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

#: Adapter targets of a timm ViT tower: attention qkv / output and both MLP layers of every block.
VIT_TARGETS = ["qkv", "proj", "fc1", "fc2"]
RESNET_TARGETS = ["neck"]
STEM_KEYS = {"vit": "patch_embed.proj.weight", "resnet": "conv1.weight"}


@dataclass
class EOTowerConfig:
    arch: Literal["vit", "resnet"] = field(default="vit", metadata={"help": "Tower family."})
    model: str = field(default="vit_tiny_patch16_224", metadata={"help": "timm model name."})
    in_chans: int = field(default=3, metadata={"help": "Input bands (set from the selected bands)."})
    img_size: int = field(default=32, metadata={"help": "Chip size in pixels (ViT)."})
    patch_size: int | None = field(default=8, metadata={"help": "ViT patch size (null: the model's)."})
    embed_dim: int | None = field(default=None, metadata={"help": "ViT width override (tiny test towers)."})
    depth: int | None = field(default=None, metadata={"help": "ViT depth override."})
    num_heads: int | None = field(default=None, metadata={"help": "ViT heads override."})
    checkpoint: str | None = field(default=None, metadata={"help": "Local RGB-pretrained weights to adapt."})
    adapt: Literal["average", "repeat"] = field(default="average", metadata={"help": "RGB -> N-band stem rule."})


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


def _read_state(path: str) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found (RGB-pretrained tower weights load from a local file)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


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
        if config.checkpoint:
            self.load_rgb_checkpoint(config.checkpoint)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.neck(self.backbone(images))

    def load_rgb_checkpoint(self, path: str) -> None:
        """Load pretrained weights (RGB or already N-band); the stem is adapted to ``in_chans``."""
        state = _read_state(path)
        stem = STEM_KEYS[self.config.arch]
        if stem not in state:
            raise KeyError(f"{path}: no {stem!r} in the checkpoint (is it a timm {self.config.arch}?)")
        if state[stem].shape[1] != self.config.in_chans:
            state[stem] = adapt_rgb_kernels(state[stem], self.config.in_chans, self.config.adapt)
        own = self.backbone.state_dict()
        if "pos_embed" in state and state["pos_embed"].shape != own.get("pos_embed", state["pos_embed"]).shape:
            from timm.layers import resample_abs_pos_embed

            grid = self.backbone.patch_embed.grid_size
            prefix = 0 if getattr(self.backbone, "no_embed_class", False) else self.backbone.num_prefix_tokens
            state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(grid), num_prefix_tokens=prefix)
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc.", "head_drop"))}
        mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        if mismatched:
            raise ValueError(f"{path}: shapes differ from the tower for {mismatched[:5]} (patch size or width?)")
        missing, unexpected = self.backbone.load_state_dict(state, strict=False)
        if unexpected or missing:
            raise ValueError(f"{path}: checkpoint does not fit {self.config.model}: missing {missing[:5]}, "
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


def build_eo_encoder(towers: dict[str, EOTowerConfig]) -> FusedEO:
    """A (possibly single-tower) EO encoder taking a dict of modality tensors."""
    return FusedEO({name: EOTower(config) for name, config in towers.items()})
