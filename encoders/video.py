"""Lip-reading front end: a 3D-convolution stem over the mouth-crop clip, then a ResNet-18 trunk applied to
every frame, one feature vector per frame (the visual front end of Stafylakis & Tzimiropoulos 2017 used by
the LRS3 lip-reading models: conv3d 5x7x7 stride (1,2,2) + max-pool, then ResNet-18 without its stem).

Built from torchvision's ``BasicBlock``; with the default widths the trunk's layers carry the same names and
shapes as ``torchvision.models.resnet18``'s ``layer1..layer4``. Weights load from a local safetensors state
dict (``checkpoint``); tests use a tiny random configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from encoders.errors import EncoderError
from mm.config import ConfigError

#: Grey-level mean and std of LRS3 mouth crops (the normalisation the lip-reading recipes use).
LIP_MEAN, LIP_STD = 0.421, 0.165


@dataclass
class VideoEncoderConfig:
    checkpoint: str | None = field(
        default=None, metadata={"help": "Local safetensors state dict of this front end (null: random init)."})
    stem_channels: int = field(default=64, metadata={"help": "Channels of the 3D stem (ResNet-18: 64)."})
    widths: list[int] = field(default_factory=lambda: [64, 128, 256, 512],
                              metadata={"help": "Channels of the four ResNet stages (ResNet-18: 64..512)."})
    blocks: list[int] = field(default_factory=lambda: [2, 2, 2, 2],
                              metadata={"help": "BasicBlocks per stage (ResNet-18: 2 each)."})

    def __post_init__(self) -> None:
        if len(self.widths) != 4 or len(self.blocks) != 4 or min(self.widths + self.blocks) < 1:
            raise ConfigError(f"video encoder: keys 'widths' and 'blocks' need four positive values, got "
                             f"{self.widths} and {self.blocks}")


def tiny_video_config() -> VideoEncoderConfig:
    return VideoEncoderConfig(stem_channels=8, widths=[8, 16, 16, 32], blocks=[1, 1, 1, 1])


def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    from torchvision.models.resnet import BasicBlock

    downsample = None
    if stride != 1 or in_planes != planes:
        downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
    layers = [BasicBlock(in_planes, planes, stride=stride, downsample=downsample)]
    layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class LipReadingFrontEnd(nn.Module):
    """``forward(frames (B, T, H, W) in [0, 1], lengths (B,)) -> (features (B, T, C), lengths)``."""

    def __init__(self, config: VideoEncoderConfig) -> None:
        super().__init__()
        stem = config.stem_channels
        self.stem = nn.Sequential(
            nn.Conv3d(1, stem, kernel_size=(5, 7, 7), stride=(1, 2, 2), padding=(2, 3, 3), bias=False),
            nn.BatchNorm3d(stem), nn.ReLU(inplace=True),
            nn.MaxPool3d(kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)))
        in_planes = stem
        for i, (width, blocks) in enumerate(zip(config.widths, config.blocks, strict=True)):
            self.add_module(f"layer{i + 1}", _stage(in_planes, width, blocks, stride=1 if i == 0 else 2))
            in_planes = width
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_size = config.widths[-1]

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if frames.dim() != 4:
            raise ValueError(f"frames must be (batch, time, height, width) grey levels, got {tuple(frames.shape)}")
        batch, time = frames.shape[:2]
        # Frames past a clip's end are zeroed so the stem's 5-frame kernel sees the same as for the clip alone.
        keep = (torch.arange(time, device=frames.device)[None] < lengths[:, None]).to(frames.dtype)
        x = ((frames - LIP_MEAN) / LIP_STD * keep[:, :, None, None]).unsqueeze(1)  # (B, 1, T, H, W)
        x = self.stem(x)
        x = x.transpose(1, 2).flatten(0, 1)  # every frame through the 2D trunk: (B*T, C, H', W')
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.pool(x).flatten(1).view(batch, time, -1), lengths


def build_video_encoder(config: VideoEncoderConfig) -> LipReadingFrontEnd:
    """The front end, random (seeded by the caller's torch RNG) or loaded from ``config.checkpoint``."""
    encoder = LipReadingFrontEnd(config)
    if config.checkpoint:
        from encoders.errors import load_encoder_state

        state = load_encoder_state(config.checkpoint, "the video front end")
        own = encoder.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        wrong = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
                 for k in own if k in state and state[k].shape != own[k].shape]
        if missing or unexpected or wrong:
            raise EncoderError(f"{config.checkpoint}: does not fit the video front end: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}, mis-shaped {wrong[:5]}")
        encoder.load_state_dict(state)
    return encoder.eval()
