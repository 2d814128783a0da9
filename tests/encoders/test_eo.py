"""EO towers: any number of bands, RGB kernels adapted to N bands, fused towers, adapters attach."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import mm
from encoders.eo import EOCheckpointError, EOTower, EOTowerConfig, adapt_rgb_kernels, build_eo_encoder

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
    with pytest.raises(EOCheckpointError, match="missing.pt: checkpoint not found"):
        EOTower(EOTowerConfig(in_chans=4, checkpoint=str(tmp_path / "missing.pt"), **TINY_VIT))
    path = tmp_path / "other.safetensors"
    save_file({"something.weight": torch.zeros(2)}, str(path))
    with pytest.raises(EOCheckpointError, match="no 'patch_embed.proj.weight'"):
        EOTower(EOTowerConfig(in_chans=4, checkpoint=str(path), **TINY_VIT))
    rgb = EOTower(EOTowerConfig(in_chans=5, **TINY_VIT))
    five = tmp_path / "five.safetensors"
    save_file({k: v.contiguous() for k, v in rgb.backbone.state_dict().items()}, str(five))
    with pytest.raises(EOCheckpointError, match="stem takes 5 bands, the tower 4; name them with checkpoint_bands"):
        EOTower(EOTowerConfig(in_chans=4, checkpoint=str(five), **TINY_VIT))


SSL4EO_S2_BANDS = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]


def test_a_torchgeo_style_13_band_resnet_checkpoint_under_a_moco_prefix_loads_by_band_name(tmp_path):
    """torchgeo's SSL4EO-S12 ResNet weights are timm state dicts over the 13 Sentinel-2 L1C bands; MoCo and
    Lightning checkpoints keep the same keys under a prefix inside ``state_dict``."""
    torch.manual_seed(0)
    source = EOTower(EOTowerConfig(arch="resnet", model="resnet10t", in_chans=13))
    state = {f"module.encoder_q.{k}": v for k, v in source.backbone.state_dict().items()}
    state["module.encoder_q.fc.weight"] = torch.zeros(128, source.feature_size)  # a MoCo projection: dropped
    path = tmp_path / "ssl4eo_moco.pth"
    torch.save({"state_dict": state, "epoch": 99}, path)
    mine = ["B2", "B3", "B4", "B8"]
    tower = EOTower(EOTowerConfig(arch="resnet", model="resnet10t", in_chans=4, checkpoint=str(path),
                                  checkpoint_bands=SSL4EO_S2_BANDS, band_names=mine))
    stem = source.backbone.conv1[0].weight if isinstance(source.backbone.conv1, torch.nn.Sequential) \
        else source.backbone.conv1.weight
    own = tower.backbone.conv1[0].weight if isinstance(tower.backbone.conv1, torch.nn.Sequential) \
        else tower.backbone.conv1.weight
    picked = stem[:, [SSL4EO_S2_BANDS.index(b) for b in mine]] * (13 / 4)
    assert torch.allclose(own, picked)
    layer = "layer4.0.conv1.weight"
    assert torch.equal(tower.backbone.state_dict()[layer], source.backbone.state_dict()[layer])
    with pytest.raises(EOCheckpointError, match=r"bands \['VV'\] are not among the checkpoint's"):
        EOTower(EOTowerConfig(arch="resnet", model="resnet10t", in_chans=1, checkpoint=str(path),
                              checkpoint_bands=SSL4EO_S2_BANDS, band_names=["VV"]))


def test_feature_maps_for_a_segmentation_decoder():
    vit = EOTower(EOTowerConfig(in_chans=3, feature_levels=2, **TINY_VIT))
    assert [m.shape for m in vit.feature_maps(torch.randn(2, 3, 16, 16))] == [(2, 32, 2, 2)] * 2
    assert vit.feature_channels == [32, 32]
    resnet = EOTower(EOTowerConfig(arch="resnet", model="resnet10t", in_chans=3, feature_levels=3))
    maps = resnet.feature_maps(torch.randn(2, 3, 32, 32))
    assert [m.shape[1] for m in maps] == resnet.feature_channels and [m.shape[-1] for m in maps] == [4, 2, 1]


def test_fused_towers_concatenate_and_adapters_attach_to_default_targets():
    torch.manual_seed(0)
    encoder = build_eo_encoder({"s1grd": EOTowerConfig(in_chans=4, **TINY_VIT),
                                "s2srm": EOTowerConfig(in_chans=12, **TINY_VIT)})
    batch = {"s1grd": torch.randn(3, 4, 16, 16), "s2srm": torch.randn(3, 12, 16, 16)}
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


def test_resnet_tower_adapts_its_block_convs_and_linear_neck():
    tower = EOTower(EOTowerConfig(arch="resnet", model="resnet10t", in_chans=5))
    x = torch.randn(2, 5, 32, 32)
    tower.eval()
    assert torch.allclose(tower(x), tower.backbone(x))  # the neck starts as the identity
    mm.attach(tower, mm.LoRAConfig(targets=tower.default_targets, r=4))
    adapted = [n for n, _ in mm.adapted_layers(tower)]
    assert adapted[-1] == "neck" and len(adapted) == 4 * 2 + 1  # 4 stages x (conv1, conv2) + the neck
    assert torch.allclose(tower(x), tower.backbone(x), atol=1e-5)  # LoRA starts as the identity update
