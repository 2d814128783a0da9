"""Audio encoder: Whisper's encoder (transformers) over Whisper log-mel features.

``build_audio_encoder(config)`` loads a Whisper checkpoint by hub name or local folder (any of
``WhisperModel`` / ``WhisperForConditionalGeneration``; only the encoder is kept), or builds a tiny one
from the config's sizes for tests and CPU demos (random, or from a local safetensors ``checkpoint``). Features are computed here, in torch, exactly as
``WhisperFeatureExtractor`` computes them (checked by a test): 16 kHz audio, 25 ms Hann windows every
10 ms, Slaney mel filters to 8 kHz, log10, floor at max - 8, then (x + 4) / 4.

Whisper takes a fixed window (30 s for the released models): shorter clips are zero-padded to it and the
output is cut back to each clip's own length, ``ceil(samples / 320)`` frames at 50 per second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from encoders.errors import EncoderError, EncoderLoadError

SAMPLE_RATE = 16_000
N_FFT = 400
HOP = 160
#: Whisper's two convolutions halve the mel frame rate: one output frame per 320 samples (20 ms).
SAMPLES_PER_FRAME = 2 * HOP
FRAMES_PER_SECOND = SAMPLE_RATE / SAMPLES_PER_FRAME

#: Adapter targets reaching every projection of every encoder layer.
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@dataclass
class AudioEncoderConfig:
    name: str | None = field(
        default=None, metadata={"help": "Whisper hub name or local folder (null: a tiny random encoder from "
                                        "the sizes below). Offline machines need a local folder."})
    checkpoint: str | None = field(
        default=None, metadata={"help": "Local safetensors state dict for the encoder built from the sizes "
                                        "below (e.g. the tiny encoder scripts/repro_avsr.py pretrains)."})
    num_mel_bins: int = field(default=80, metadata={"help": "Tiny encoder: mel bins (Whisper: 80, large-v3: 128)."})
    d_model: int = field(default=64, metadata={"help": "Tiny encoder: width."})
    layers: int = field(default=2, metadata={"help": "Tiny encoder: layers."})
    heads: int = field(default=4, metadata={"help": "Tiny encoder: attention heads."})
    ffn_dim: int = field(default=128, metadata={"help": "Tiny encoder: MLP width."})
    window_seconds: float = field(default=4.0, metadata={"help": "Tiny encoder: input window (Whisper: 30 s)."})
    init_std: float = field(default=0.02, metadata={"help": "Tiny encoder: std of the random weights (Whisper's "
                                                            "0.02 lets the positional embedding swamp the input)."})


def whisper_log_mel(waveforms: torch.Tensor, n_mels: int, n_samples: int) -> torch.Tensor:
    """(batch, samples) 16 kHz audio -> (batch, n_mels, n_samples // 160) Whisper log-mel features.

    Each row is zero-padded (or cut) to ``n_samples`` first, as the Whisper feature extractor pads to its
    window, so the STFT's edge frames and the per-clip maximum match it.
    """
    import torchaudio

    if waveforms.dim() != 2:
        raise ValueError(f"waveforms must be (batch, samples), got shape {tuple(waveforms.shape)}")
    waveforms = waveforms.float()
    if waveforms.shape[1] < n_samples:
        waveforms = nn.functional.pad(waveforms, (0, n_samples - waveforms.shape[1]))
    waveforms = waveforms[:, :n_samples]
    window = torch.hann_window(N_FFT, device=waveforms.device)
    stft = torch.stft(waveforms, N_FFT, HOP, window=window, return_complex=True)
    power = stft[..., :-1].abs().pow(2)  # Whisper drops the last frame: n_samples / hop frames
    filters = torchaudio.functional.melscale_fbanks(
        N_FFT // 2 + 1, 0.0, SAMPLE_RATE / 2, n_mels, SAMPLE_RATE, norm="slaney", mel_scale="slaney")
    log_spec = (filters.T.to(power) @ power).clamp(min=1e-10).log10()
    floor = log_spec.amax(dim=(1, 2), keepdim=True) - 8.0
    return (torch.maximum(log_spec, floor) + 4.0) / 4.0


def output_lengths(sample_lengths: torch.Tensor, max_frames: int) -> torch.Tensor:
    """Encoder frames covering each clip: ceil(samples / 320), at most the window's frames."""
    return torch.clamp((sample_lengths + SAMPLES_PER_FRAME - 1) // SAMPLES_PER_FRAME, min=1, max=max_frames)


class WhisperAudioEncoder(nn.Module):
    """``forward(waveforms, lengths) -> (features (B, T, d_model), frame lengths (B,))`` at 50 frames/s."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        config = encoder.config
        self.n_mels = int(config.num_mel_bins)
        self.max_frames = int(config.max_source_positions)
        self.window_samples = self.max_frames * SAMPLES_PER_FRAME
        self.feature_size = int(config.d_model)

    @property
    def window_seconds(self) -> float:
        return self.window_samples / SAMPLE_RATE

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if int(lengths.max()) > self.window_samples:
            raise EncoderError(f"audio of {int(lengths.max()) / SAMPLE_RATE:.2f} s is longer than the encoder's "
                               f"{self.window_seconds:.2f} s window; cut the clips (data.max_seconds) or use a "
                               "larger window (model.audio.window_seconds)")
        # Zero the samples past each clip's end: a padded batch must encode as each clip alone would.
        keep = torch.arange(waveforms.shape[1], device=waveforms.device)[None] < lengths[:, None]
        mel = whisper_log_mel(waveforms * keep, self.n_mels, self.window_samples)
        hidden = self.encoder(input_features=mel.to(next(self.encoder.parameters()).dtype)).last_hidden_state
        frames = output_lengths(lengths, self.max_frames)
        return hidden[:, : int(frames.max())], frames


def tiny_whisper_config(config: AudioEncoderConfig):
    from transformers import WhisperConfig

    frames = math.ceil(config.window_seconds * FRAMES_PER_SECOND)
    return WhisperConfig(
        num_mel_bins=config.num_mel_bins, d_model=config.d_model, encoder_layers=config.layers,
        encoder_attention_heads=config.heads, encoder_ffn_dim=config.ffn_dim, decoder_layers=1,
        decoder_attention_heads=config.heads, decoder_ffn_dim=config.ffn_dim, max_source_positions=frames,
        max_target_positions=32, vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1, init_std=config.init_std, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)


def build_audio_encoder(config: AudioEncoderConfig) -> WhisperAudioEncoder:
    """A Whisper encoder from ``config.name`` (hub name or local folder), or tiny from the sizes: random
    (seeded by the caller's torch RNG) or loaded from ``config.checkpoint``."""
    from transformers.models.whisper.modeling_whisper import WhisperEncoder, WhisperModel

    if config.name is None:
        encoder = WhisperAudioEncoder(WhisperEncoder(tiny_whisper_config(config)))
        if config.checkpoint:
            from encoders.errors import load_encoder_state

            state = load_encoder_state(config.checkpoint, "the audio encoder")
            try:
                encoder.load_state_dict(state)
            except RuntimeError as err:
                raise EncoderError(f"{config.checkpoint}: does not fit the audio encoder sizes of the config "
                                   f"({' '.join(str(err).split())[:600]})") from None
        return encoder.eval()
    if config.checkpoint:
        raise EncoderError("audio encoder: give 'name' (a Whisper model) or 'checkpoint' (a tiny encoder's "
                           "state dict), not both")
    try:
        model = WhisperModel.from_pretrained(config.name, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise EncoderLoadError(f"audio encoder {config.name!r}: cannot load a Whisper model from it ({err}). "
                               "Give a local folder holding config.json and the weights (no hub downloads on "
                               "this machine)") from None
    return WhisperAudioEncoder(model.get_encoder().eval())
