"""A small Vision Transformer built on ``nn.MultiheadAttention`` blocks laid out as open_clip's towers
(``attn`` with packed q/k/v, ``mlp.c_fc`` / ``mlp.c_proj``), so what adapts here adapts a CLIP tower too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

#: Adapter targets that reach every projection of every block.
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"]


@dataclass
class ViTConfig:
    image_size: int = 8
    patch_size: int = 2
    channels: int = 1
    width: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 2.0
    num_classes: int = 10


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    """Patch embedding, a class token, pre-norm blocks and a linear head on the class token."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        if config.image_size % config.patch_size:
            raise ValueError(f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")
        self.config = config
        tokens = (config.image_size // config.patch_size) ** 2
        self.conv1 = nn.Conv2d(config.channels, config.width, config.patch_size, stride=config.patch_size)
        self.class_embedding = nn.Parameter(torch.zeros(config.width))
        self.positional_embedding = nn.Parameter(torch.randn(tokens + 1, config.width) * 0.02)
        self.blocks = nn.ModuleList(
            ResidualAttentionBlock(config.width, config.heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.ln_post = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.num_classes)

    @property
    def feature_size(self) -> int:
        return self.config.width

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x[:, 0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))
