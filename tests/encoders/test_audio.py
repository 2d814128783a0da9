"""Whisper audio encoder: features equal WhisperFeatureExtractor's, padding does not leak, local loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from encoders.audio import (
    SAMPLE_RATE,
    AudioEncoderConfig,
    build_audio_encoder,
    output_lengths,
    tiny_whisper_config,
    whisper_log_mel,
)


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    tone = np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return (0.3 * tone + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_matches_whisper_feature_extractor(n_mels):
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=n_mels)
    clips = [speechlike(1.3, seed=1), speechlike(0.7, seed=2)]
    expected = extractor(clips, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
    batch = torch.zeros(2, len(clips[0]))
    for i, clip in enumerate(clips):
        batch[i, : len(clip)] = torch.from_numpy(clip)
    ours = whisper_log_mel(batch, n_mels, extractor.n_samples)
    assert ours.shape == (2, n_mels, 3000)
    np.testing.assert_allclose(ours.numpy(), expected, atol=2e-4)


def test_tiny_encoder_shapes_and_padding_independence():
    torch.manual_seed(0)
    encoder = build_audio_encoder(AudioEncoderConfig(window_seconds=2.0))
    short, long = torch.from_numpy(speechlike(0.5)), torch.from_numpy(speechlike(1.5, seed=3))
    batch = torch.zeros(2, len(long))
    batch[0, : len(short)], batch[1] = short, long
    lengths = torch.tensor([len(short), len(long)])
    with torch.no_grad():
        features, frames = encoder(batch, lengths)
        alone, alone_frames = encoder(short[None], lengths[:1])
    assert frames.tolist() == [25, 75] and features.shape == (2, 75, 64)
    assert encoder.max_frames == 100 and encoder.feature_size == 64
    torch.testing.assert_close(features[0, :25], alone[0, : int(alone_frames[0])], rtol=1e-5, atol=1e-5)


def test_too_long_audio_is_an_error():
    torch.manual_seed(0)
    encoder = build_audio_encoder(AudioEncoderConfig(window_seconds=1.0))
    with pytest.raises(ValueError, match="longer than the encoder's 1.00 s window"):
        encoder(torch.zeros(1, 20_000), torch.tensor([20_000]))


def test_output_lengths():
    assert output_lengths(torch.tensor([1, 320, 321, 10**7]), 100).tolist() == [1, 1, 2, 100]


def test_loads_a_whisper_checkpoint_from_a_local_folder(tmp_path):
    from transformers import WhisperForConditionalGeneration

    torch.manual_seed(1)
    full = WhisperForConditionalGeneration(tiny_whisper_config(AudioEncoderConfig(window_seconds=1.0))).eval()
    full.save_pretrained(tmp_path / "whisper")
    encoder = build_audio_encoder(AudioEncoderConfig(name=str(tmp_path / "whisper")))
    wave = torch.from_numpy(speechlike(0.8))[None]
    mel = whisper_log_mel(wave, 80, encoder.window_samples)
    with torch.no_grad():
        expected = full.model.encoder(input_features=mel).last_hidden_state[:, :40]
        ours, frames = encoder(wave, torch.tensor([wave.shape[1]]))
    assert int(frames[0]) == 40
    torch.testing.assert_close(ours, expected)


def test_unloadable_name_says_what_to_give(tmp_path):
    with pytest.raises(OSError, match="local folder holding config.json"):
        build_audio_encoder(AudioEncoderConfig(name=str(tmp_path / "missing")))


def test_tiny_encoder_checkpoint(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(2)
    config = AudioEncoderConfig(window_seconds=1.0, d_model=32, layers=1, ffn_dim=64)
    encoder = build_audio_encoder(config)
    save_file(encoder.state_dict(), str(tmp_path / "enc.safetensors"))
    torch.manual_seed(3)
    loaded = build_audio_encoder(AudioEncoderConfig(window_seconds=1.0, d_model=32, layers=1, ffn_dim=64,
                                                    checkpoint=str(tmp_path / "enc.safetensors")))
    wave = torch.from_numpy(speechlike(0.6))[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(wave, torch.tensor([wave.shape[1]]))[0],
                                   encoder(wave, torch.tensor([wave.shape[1]]))[0])
    with pytest.raises(ValueError, match="enc.safetensors: does not fit"):
        build_audio_encoder(AudioEncoderConfig(window_seconds=1.0, d_model=64, checkpoint=str(tmp_path / "enc.safetensors")))
    with pytest.raises(ValueError, match="not both"):
        build_audio_encoder(AudioEncoderConfig(name="x", checkpoint=str(tmp_path / "enc.safetensors")))
