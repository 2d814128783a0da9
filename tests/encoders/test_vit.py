from __future__ import annotations

import pytest
import torch

import mm
from encoders.vit import DEFAULT_TARGETS, VisionTransformer, ViTConfig


def test_vit_default_targets_reach_every_block_projection():
    model = VisionTransformer(ViTConfig(depth=3))
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert model.features(torch.randn(2, 1, 8, 8)).shape == (2, model.feature_size)
    chosen = mm.select_targets(model, mm.LoRAConfig(targets=DEFAULT_TARGETS))
    assert len(chosen) == 3 * len(DEFAULT_TARGETS)


def test_bad_patch_size_is_named():
    with pytest.raises(ValueError, match="image_size 8 is not a multiple of patch_size 3"):
        VisionTransformer(ViTConfig(patch_size=3))
