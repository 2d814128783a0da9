"""EO towers: any number of bands, RGB kernels adapted to N bands, fused towers, adapters attach."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import mm
from encoders.eo import EOTower, EOTowerConfig, adapt_rgb_kernels, build_eo_encoder

TINY_VIT = dict(arch="vit", model="vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=32, depth=2,
                num_heads=2)


@pytest.mark.parametrize(("mode", "bands"), [("average", 1), ("average", 2), ("average", 5), ("average", 13),
                                             ("repeat", 6), ("repeat", 12)])  # repeat: whole RGB cycles
def test_adapted_kernels_answer_a_grey_scene_as_rgb_does(mode, bands):
    torch.manual_seed(0)
    rgb = torch.randn(6, 3, 4, 4)
    grey = torch.rand(2, 1, 9, 9)
    expected = F.conv2d(grey.expand(-1, 3, -1, -1), rgb)
    adapted = adapt_rgb_kernels(rgb, bands, mode)
    assert adapted.shape == (6, bands, 4, 4)
    assert torch.allclose(F.conv2d(grey.expand(-1, bands, -1, -1), adapted), expected, atol=1e-5)


def test_vit_tower_takes_any_band_count_and_loads_an_rgb_checkpoint(tmp_path):
    torch.manual_seed(0)
    rgb_tower = EOTower(EOTowerConfig(in_chans=3, **{**TINY_VIT, "img_size": 32}))  # pretrained at 32 px
    path = tmp_path / "rgb.safetensors"
    save_file({k: v.contiguous() for k, v in rgb_tower.backbone.state_dict().items()}, str(path))
    tower = EOTower(EOTowerConfig(in_chans=7, checkpoint=str(path), **TINY_VIT))
    assert tower(torch.randn(2, 7, 16, 16)).shape == (2, 32) == (2, tower.feature_size)
    stem = rgb_tower.backbone.patch_embed.proj.weight
    assert torch.allclose(tower.backbone.patch_embed.proj.weight, adapt_rgb_kernels(stem, 7))
    block = "blocks.1.attn.qkv.weight"
    assert torch.equal(tower.backbone.state_dict()[block], rgb_tower.backbone.state_dict()[block])
    assert tower.backbone.pos_embed.shape[1] == 1 + 4  # resampled from a 4x4 to a 2x2 patch grid


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt: checkpoint not found"):
        EOTower(EOTowerConfig(in_chans=4, checkpoint=str(tmp_path / "missing.pt"), **TINY_VIT))
    path = tmp_path / "other.safetensors"
    save_file({"something.weight": torch.zeros(2)}, str(path))
    with pytest.raises(KeyError, match="no 'patch_embed.proj.weight'"):
        EOTower(EOTowerConfig(in_chans=4, checkpoint=str(path), **TINY_VIT))


def test_fused_towers_concatenate_and_adapters_attach_to_default_targets():
    torch.manual_seed(0)
    encoder = build_eo_encoder({"s1grd": EOTowerConfig(in_chans=4, **TINY_VIT),
                                "s2msi": EOTowerConfig(in_chans=12, **TINY_VIT)})
    batch = {"s1grd": torch.randn(3, 4, 16, 16), "s2msi": torch.randn(3, 12, 16, 16)}
    encoder.eval()
    before = encoder(batch)
    assert before.shape == (3, 64) and encoder.feature_size == 64
    mm.attach(encoder, mm.LoRAConfig(targets=encoder.default_targets, r=2))
    adapted = [n for n, _ in mm.adapted_layers(encoder)]
    assert len(adapted) == 2 * 2 * 4  # towers x blocks x (qkv, proj, fc1, fc2)
    assert torch.allclose(encoder(batch), before, atol=1e-6)  # LoRA starts as the identity update
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters." in n for n in trainable)
    with pytest.raises(KeyError, match="lacks modality"):
        encoder({"s1grd": batch["s1grd"]})


def test_resnet_tower_exposes_a_linear_neck_for_adapters():
    tower = EOTower(EOTowerConfig(arch="resnet", model="resnet10t", in_chans=5))
    x = torch.randn(2, 5, 32, 32)
    tower.eval()
    assert torch.allclose(tower(x), tower.backbone(x))  # the neck starts as the identity
    mm.attach(tower, mm.LoRAConfig(targets=tower.default_targets, r=4))
    assert [n for n, _ in mm.adapted_layers(tower)] == ["neck"]
