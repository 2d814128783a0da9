"""Readers of audio-visual speech files for data/avsr.py: transcripts (LRS3's text and word timings), WAV/FLAC
(checked for truncation, resampled to 16 kHz mono), frames .npy and video files (PyAV, data/video.py) with
their audio track, cut to [start, end) seconds and a mouth box; video normalised to grey mouth crops.
Every failure is an ``AVSRDataError`` naming the file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mm.errors import MMTuneError

SAMPLE_RATE = 16_000
AUDIO_SUFFIXES = (".wav", ".flac")
VIDEO_SUFFIXES = (".npy", ".mp4", ".mov", ".mkv", ".avi", ".webm")


class AVSRDataError(MMTuneError, ValueError):
    """An utterance cannot be used; the message names the file and why."""



def read_transcript(path: Path) -> str:
    """The words of a transcript file: LRS3's "Text: WORDS" line if there is one, else the whole file."""
    text = path.read_text(encoding="utf-8", errors="strict")
    for line in text.splitlines():
        if line.startswith("Text:"):
            return " ".join(line[len("Text:"):].split())
    return " ".join(text.split())


def read_word_timings(path: Path) -> list[tuple[str, float, float]]:
    """LRS3's word alignment table ("WORD START END ASDSCORE" then one line per word); [] if absent."""
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        first = next(i for i, line in enumerate(lines) if line.split()[:3] == ["WORD", "START", "END"])
    except StopIteration:
        return []
    words = []
    for number, line in enumerate(lines[first + 1:], start=first + 2):
        parts = line.split()
        if not parts:
            continue
        try:
            words.append((parts[0], float(parts[1]), float(parts[2])))
        except (IndexError, ValueError):
            raise AVSRDataError(f"{path}: line {number}: expected 'WORD START END ...', got {line!r}") from None
    return words


def check_wav_complete(path: Path) -> None:
    """A ``.wav`` whose header declares more audio bytes than the file holds is an error naming it.

    libsndfile reads such a file without complaint (it returns what is there), so a copy cut short would
    otherwise surface later as an audio/video length mismatch blamed on the video beside it. Sizes of 0 and
    0xFFFFFFFF mean "unknown" (streamed writers) and are not checked."""
    import struct

    if path.suffix.lower() != ".wav":
        return
    size = path.stat().st_size
    with path.open("rb") as handle:
        if handle.read(12)[8:12] != b"WAVE":
            return  # not RIFF/WAVE: soundfile names what it is
        position = 12
        while position + 8 <= size:
            handle.seek(position)
            kind, length = struct.unpack("<4sI", handle.read(8))
            if kind == b"data":
                held = size - position - 8
                if length not in (0, 0xFFFFFFFF) and held < length:
                    raise AVSRDataError(f"{path}: truncated WAV: its header declares {length} bytes of audio, "
                                        f"the file holds {held}")
                return
            position += 8 + length + (length & 1)  # chunks are padded to an even size


def read_audio(path: Path) -> np.ndarray:
    """Mono float32 audio at 16 kHz (channels averaged, other rates resampled)."""
    import soundfile

    check_wav_complete(path)
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises its own error types for corrupt files
        raise AVSRDataError(f"{path}: unreadable audio ({err})") from None
    if data.size == 0:
        raise AVSRDataError(f"{path}: empty audio")
    mono = data.mean(axis=1)
    if rate != SAMPLE_RATE:
        import torchaudio

        mono = torchaudio.functional.resample(torch.from_numpy(mono), rate, SAMPLE_RATE).numpy()
    return mono.astype(np.float32)


def audio_duration(path: Path) -> float:
    import soundfile

    check_wav_complete(path)
    try:
        info = soundfile.info(str(path))
    except Exception as err:
        raise AVSRDataError(f"{path}: unreadable audio ({err})") from None
    if info.frames == 0:
        raise AVSRDataError(f"{path}: empty audio")
    return info.frames / info.samplerate


def _video_module(path: Path):
    """data.video, or an error naming the file when PyAV (pinned in pyproject) is missing."""
    try:
        import av  # noqa: F401
    except ImportError:
        raise AVSRDataError(f"{path}: reading .mp4 needs the PyAV package ('av'), which is not installed; "
                            "install it or store the mouth crops as frames .npy (T, H, W) uint8") from None
    from data import video

    return video


def _span(start: float | None, end: float | None, rate: float, count: int) -> slice:
    return slice(round((start or 0.0) * rate), count if end is None else round(end * rate))


def read_frames(path: Path, frames_fps: float, start: float | None = None, end: float | None = None,
                box: Sequence[int] | None = None) -> tuple[np.ndarray, float]:
    """Raw frames (T, H, W[, C]) in [start, end) seconds, cut to ``box`` [x, y, w, h], and their frame rate."""
    if path.suffix.lower() != ".npy":
        video = _video_module(path)
        try:
            return video.read_video_frames(path, start, end, box)
        except video.VideoReadError as err:
            raise AVSRDataError(str(err)) from None
    try:
        frames = np.load(path, allow_pickle=False)
    except Exception as err:
        raise AVSRDataError(f"{path}: unreadable frames ({err})") from None
    check_frames_shape(path, frames.shape)
    frames = frames[_span(start, end, frames_fps, len(frames))]
    if box is not None:
        from data.video import VideoReadError, check_box

        try:
            x, y, w, h = check_box(path, box, frames.shape[2], frames.shape[1])
        except VideoReadError as err:
            raise AVSRDataError(str(err)) from None
        frames = frames[:, y : y + h, x : x + w]
    return frames, frames_fps


def frames_shape(path: Path, frames_fps: float) -> tuple[tuple[int, ...], float]:
    if path.suffix.lower() == ".npy":
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False).shape, frames_fps
        except Exception as err:
            raise AVSRDataError(f"{path}: unreadable frames ({err})") from None
    video = _video_module(path)
    try:
        info = video.probe_video(path)
    except video.VideoReadError as err:
        raise AVSRDataError(str(err)) from None
    return (info.frames, info.height, info.width), info.fps


def track_duration(path: Path) -> float:
    """Seconds of audio in a .wav/.flac, or in the audio track of a video file."""
    if path.suffix.lower() in AUDIO_SUFFIXES:
        return audio_duration(path)
    video = _video_module(path)
    try:
        info = video.probe_video(path)
    except video.VideoReadError as err:
        raise AVSRDataError(str(err)) from None
    if not info.has_audio:
        raise AVSRDataError(f"{path}: no audio track (and no .wav/.flac beside it)")
    return info.audio_seconds or info.seconds


def read_track(path: Path, start: float | None = None, end: float | None = None) -> np.ndarray:
    """Mono float32 16 kHz audio in [start, end) seconds from a .wav/.flac or a video file's audio track."""
    if path.suffix.lower() in AUDIO_SUFFIXES:
        audio = read_audio(path)
        return audio[_span(start, end, SAMPLE_RATE, len(audio))]
    video = _video_module(path)
    try:
        return video.read_video_audio(path, start, end)
    except video.VideoReadError as err:
        raise AVSRDataError(str(err)) from None


def check_frames_shape(path: Path, shape: tuple[int, ...]) -> None:
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3)):
        raise AVSRDataError(f"{path}: frames must be (T, H, W) or (T, H, W, 1|3), got shape {shape}")
    if shape[0] == 0 or min(shape[1:3]) == 0:
        raise AVSRDataError(f"{path}: empty video (shape {shape})")


def normalise_video(frames: np.ndarray, source_fps: float, fps: float, crop_size: int) -> torch.Tensor:
    """(T, H, W[, C]) -> (T', crop, crop) float grey levels in [0, 1] at ``fps``."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).float()
    if frames.dtype == np.uint8 or float(video.max()) > 1.0:
        video = video / 255.0
    if video.dim() == 4:  # ITU-R BT.601 luma
        weights = torch.tensor([0.299, 0.587, 0.114]) if video.shape[-1] == 3 else torch.ones(1)
        video = (video * weights).sum(-1)
    count = max(1, round(video.shape[0] * fps / source_fps))
    if count != video.shape[0]:
        index = torch.clamp((torch.arange(count) * source_fps / fps).long(), max=video.shape[0] - 1)
        video = video[index]
    if video.shape[1:] != (crop_size, crop_size):
        video = torch.nn.functional.interpolate(video[:, None], size=(crop_size, crop_size), mode="bilinear",
                                                antialias=True, align_corners=False)[:, 0]
    return video.clamp(0.0, 1.0)


def add_noise(audio: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """``audio`` plus white Gaussian noise whose power is the clip's mean power / 10^(snr/10)."""
    power = float(np.mean(audio.astype(np.float64) ** 2))
    noise = rng.standard_normal(audio.shape) * np.sqrt(power / 10 ** (snr_db / 10))
    return (audio + noise).astype(np.float32)
