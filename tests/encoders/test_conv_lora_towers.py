"""LoRA on the convolutions of real towers: the EO ResNet (timm) and the lip-reading 3D stem + ResNet trunk.

Each attaches to the convs, trains one step (only adapter parameters move), and merges exactly.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mm
from encoders.eo import EOTower, EOTowerConfig
from encoders.video import build_video_encoder, tiny_video_config
from mm.layer import AdaptedConv


def _train_step_moves_only_adapters(model: nn.Module, run, inputs) -> None:
    params = dict(model.named_parameters())
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    assert trainable and all(".adapters." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.SGD(trainable.values(), lr=0.5)
    for _ in range(2):  # B starts at 0, so A moves from the second step on
        optimizer.zero_grad()
        run(model, inputs).pow(2).mean().backward()
        optimizer.step()
    moved = {n for n, p in params.items() if not torch.equal(p, before[n])}
    assert moved == set(trainable), f"frozen that moved: {sorted(moved - set(trainable))[:3]}; " \
                                    f"adapters that did not: {sorted(set(trainable) - moved)[:3]}"


def _merges_exactly(model: nn.Module, run, inputs) -> None:
    with torch.no_grad():
        unmerged = run(model, inputs)
        mm.merge(model, unload=True)
        assert not any(isinstance(m, AdaptedConv) for m in model.modules())
        merged = run(model, inputs)
    rel = (merged - unmerged).norm() / unmerged.norm()
    assert rel < 1e-5, f"merged output differs by {rel:.2e}"


@pytest.mark.slow  # timm's smallest ResNet (resnet10t, 5M parameters): building and two steps take seconds
def test_eo_resnet_tower_convs_take_lora_train_and_merge():
    torch.manual_seed(0)
    tower = EOTower(EOTowerConfig(arch="resnet", model="resnet10t", in_chans=5)).eval()  # BN statistics fixed
    with torch.no_grad():  # timm zero-inits each block's last BN scale, which would cut the blocks' convs off
        for module in tower.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 32, 32)
    base = tower(x).detach()
    mm.attach(tower, mm.LoRAConfig(targets=["all-conv"], r=4, alpha=8.0))
    convs = [n for n, layer in mm.adapted_layers(tower) if isinstance(layer, AdaptedConv)]
    assert "backbone.conv1.0" in convs and "backbone.layer4.0.conv2" in convs and len(convs) >= 10
    torch.testing.assert_close(tower(x), base)  # B = 0: the base tower at init

    def run(model, images):
        return model(images)

    _train_step_moves_only_adapters(tower, run, x)
    assert (tower(x) - base).abs().max() > 1e-4
    _merges_exactly(tower, run, x)


def test_lip_video_3d_stem_and_trunk_take_lora_train_and_merge():
    torch.manual_seed(0)
    encoder = build_video_encoder(tiny_video_config())
    frames, lengths = torch.rand(2, 3, 16, 16), torch.tensor([3, 2])
    # The tiny stem (1 -> 8 channels, 5x7x7) is too small for rank 8; the error says which rank fits.
    with pytest.raises(mm.ConfigError, match=r"layer 'stem.0', a Conv3d\(1->8, kernel \(5, 7, 7\)\).*use r <= 7"):
        mm.attach(encoder, mm.LoRAConfig(targets=["stem.0"], r=8))
    mm.attach(encoder, mm.LoRAConfig(targets=["stem.0", "conv1", "conv2"], r=4, alpha=8.0))
    assert isinstance(encoder.stem[0], AdaptedConv) and encoder.stem[0].kernel_size == (5, 7, 7)
    assert isinstance(encoder.layer4[0].conv2, AdaptedConv)

    def run(model, inputs):
        return model(*inputs)[0]

    _train_step_moves_only_adapters(encoder, run, (frames, lengths))
    _merges_exactly(encoder, run, (frames, lengths))
