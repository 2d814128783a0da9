"""Lip-reading front end: a 3D stem + ResNet-18 trunk per frame."""

from __future__ import annotations

import pytest
import torch

import mm
from encoders.video import VideoEncoderConfig, build_video_encoder, tiny_video_config


def test_default_trunk_is_resnet18_shaped():
    from torchvision.models import resnet18

    encoder = build_video_encoder(VideoEncoderConfig())
    reference = resnet18(weights=None).state_dict()
    trunk = {k: v for k, v in encoder.state_dict().items() if k.startswith("layer")}
    assert trunk.keys() == {k for k in reference if k.startswith("layer")}
    assert all(trunk[k].shape == reference[k].shape for k in trunk)
    assert encoder.feature_size == 512
    assert encoder.stem[0].weight.shape == (64, 1, 5, 7, 7)


def test_one_feature_per_frame_and_padding_independence():
    torch.manual_seed(0)
    encoder = build_video_encoder(tiny_video_config())
    clips = torch.rand(2, 12, 32, 32)
    lengths = torch.tensor([7, 12])
    with torch.no_grad():
        features, out_lengths = encoder(clips, lengths)
        alone, _ = encoder(clips[:1, :7], lengths[:1])
    assert features.shape == (2, 12, 32) and out_lengths.tolist() == [7, 12]
    torch.testing.assert_close(features[0, :7], alone[0], rtol=1e-5, atol=1e-5)
    # Frames carry their own content: changing frame 3 changes features near it, not far away.
    changed = clips.clone()
    changed[1, 3] = 1 - changed[1, 3]
    with torch.no_grad():
        moved = encoder(changed, lengths)[0]
    diff = (moved[1] - features[1]).abs().amax(-1)
    assert diff[3] > 1e-3 and diff[9:].max() == 0  # the 5-frame stem reaches 2 frames each side


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    encoder = build_video_encoder(tiny_video_config())
    path = tmp_path / "lip.safetensors"
    save_file(encoder.state_dict(), str(path))
    loaded = build_video_encoder(VideoEncoderConfig(checkpoint=str(path), stem_channels=8, widths=[8, 16, 16, 32],
                                                    blocks=[1, 1, 1, 1]))
    x = torch.rand(1, 5, 32, 32)
    torch.testing.assert_close(loaded(x, torch.tensor([5]))[0], encoder(x, torch.tensor([5]))[0])
    with pytest.raises(ValueError, match="lip.safetensors: does not fit"):
        build_video_encoder(VideoEncoderConfig(checkpoint=str(path), stem_channels=8, widths=[8, 16, 16, 64],
                                               blocks=[1, 1, 1, 1]))


def test_bad_config_and_input():
    with pytest.raises(mm.ConfigError, match="'widths' and 'blocks'"):
        VideoEncoderConfig(widths=[8, 16])
    encoder = build_video_encoder(tiny_video_config())
    with pytest.raises(ValueError, match="batch, time, height, width"):
        encoder(torch.rand(2, 3, 12, 32, 32), torch.tensor([12, 12]))
