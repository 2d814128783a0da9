"""Audio-visual speech recognition data in an LRS3-like layout.

    <root>/<split>/<speaker>/<utterance>.wav   audio (any rate soundfile reads; resampled to 16 kHz)
    <root>/<split>/<speaker>/<utterance>.npy   mouth-crop frames (T, H, W) or (T, H, W, 3), uint8 or [0, 1]
                                  (or .mp4)    ... or a video file (needs PyAV, see below)
    <root>/<split>/<speaker>/<utterance>.txt   transcript: the file, or LRS3's "Text: ..." line (and its
                                               word timings table, returned as "words" when present)

Samples are dicts ``{"id", "audio" (S,) float32 at 16 kHz, "video" (T, crop, crop) grey levels in [0, 1]
at ``fps``, "text", "words" [(word, start s, end s), ...] or []}``. Video is resized to the fixed
mouth-crop size and resampled in time to ``fps`` (nearest frame). The dataset checks every utterance when it is built: missing, empty or unreadable files,
an empty transcript, and audio and video whose durations differ by more than ``max_av_mismatch_s`` are
errors naming the file, or, with ``on_error: skip``, are left out, counted in ``skipped`` and reported on
stderr (the count and the first few files with their reason); more than ``max_skipped_fraction`` of the
split skipped is an error. A ``.wav`` cut short (its header declares more audio than it holds) is an error
naming the WAV.

``.mp4`` is read with ``torchvision.io.read_video``, which needs the PyAV package; without it an ``.mp4``
is an error naming the file and the missing reader (``.npy`` frames need nothing).
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mm.config import ConfigError
from mm.errors import MMTuneError

SAMPLE_RATE = 16_000
AUDIO_SUFFIXES = (".wav", ".flac")
VIDEO_SUFFIXES = (".npy", ".mp4")


class AVSRDataError(MMTuneError, ValueError):
    """An utterance cannot be used; the message names the file and why."""


@dataclass
class AVSRDataConfig:
    root: str = field(default="", metadata={"help": "Dataset root holding one folder per split."})
    train_split: str = field(default="train", metadata={"help": "Folder of the training split."})
    eval_split: str = field(default="test", metadata={"help": "Folder of the evaluation split."})
    fps: float = field(default=25.0, metadata={"help": "Video frame rate after resampling (LRS3: 25)."})
    crop_size: int = field(default=88, metadata={"help": "Mouth crops are resized to crop_size x crop_size."})
    frames_fps: float = field(default=25.0, metadata={"help": "Frame rate of .npy frame files (they store none)."})
    max_av_mismatch_s: float = field(
        default=0.12, metadata={"help": "Largest allowed |audio duration - video duration| in seconds."})
    max_seconds: float = field(default=0.0, metadata={"help": "Longer utterances are errors/skipped (0: no limit)."})
    on_error: Literal["raise", "skip"] = field(
        default="raise", metadata={"help": "A bad utterance raises (naming the file) or is skipped, counted and "
                                           "reported on stderr (the count and the first few files with why)."})
    max_skipped_fraction: float = field(
        default=0.1, metadata={"help": "With on_error: skip, more than this share of a split's utterances "
                                       "skipped is an error (a wrong root or a broken copy, not a few bad files)."})
    snr_db: float | None = field(
        default=None, metadata={"help": "Add white noise at this SNR (dB) to the audio on load (null: clean); "
                                        "the noise is fixed per utterance and noise_seed."})
    noise_seed: int = field(default=0, metadata={"help": "Seed of the added noise."})

    def __post_init__(self) -> None:
        if self.fps <= 0 or self.frames_fps <= 0 or self.crop_size < 8:
            raise ConfigError(f"avsr data: keys 'fps', 'frames_fps' must be > 0 and 'crop_size' >= 8, got "
                              f"{self.fps}, {self.frames_fps}, {self.crop_size}")
        if self.on_error not in ("raise", "skip"):
            raise ConfigError(f"avsr data: key 'on_error' must be 'raise' or 'skip', got {self.on_error!r}")
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise ConfigError(f"avsr data: key 'max_skipped_fraction' must be in [0, 1], "
                              f"got {self.max_skipped_fraction!r}")


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


def _read_mp4(path: Path) -> tuple[np.ndarray, float]:
    try:
        import av  # noqa: F401  (torchvision.io.read_video needs it)
    except ImportError:
        raise AVSRDataError(f"{path}: reading .mp4 needs the PyAV package ('av'), which is not installed; "
                            "install it or store the mouth crops as frames .npy (T, H, W) uint8") from None
    from torchvision.io import read_video

    try:
        frames, _, info = read_video(str(path), pts_unit="sec", output_format="THWC")
    except Exception as err:
        raise AVSRDataError(f"{path}: unreadable video ({err})") from None
    if "video_fps" not in info:
        raise AVSRDataError(f"{path}: the video stream has no frame rate")
    return frames.numpy(), float(info["video_fps"])


def read_frames(path: Path, frames_fps: float) -> tuple[np.ndarray, float]:
    """Raw frames (T, H, W[, C]) and their frame rate."""
    if path.suffix == ".mp4":
        return _read_mp4(path)
    try:
        frames = np.load(path, allow_pickle=False)
    except Exception as err:
        raise AVSRDataError(f"{path}: unreadable frames ({err})") from None
    return frames, frames_fps


def _frames_shape(path: Path, frames_fps: float) -> tuple[tuple[int, ...], float]:
    if path.suffix == ".npy":
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False).shape, frames_fps
        except Exception as err:
            raise AVSRDataError(f"{path}: unreadable frames ({err})") from None
    frames, fps = read_frames(path, frames_fps)
    return frames.shape, fps


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


SKIPS_SHOWN = 3  # skipped files named in the report (the count covers all)


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Utterance:
    id: str
    audio: Path
    video: Path
    transcript: Path


def _find(stem: Path, suffixes: tuple[str, ...]) -> Path | None:
    return next((stem.with_suffix(s) for s in suffixes if stem.with_suffix(s).is_file()), None)


class AVSRDataset(torch.utils.data.Dataset):
    """The utterances of one split (sorted by path), checked on construction (see the module doc)."""

    def __init__(self, config: AVSRDataConfig, split: str, say: Callable[[str], None] | None = None) -> None:
        self.config = config
        say = say or _to_stderr
        folder = Path(config.root) / split
        if not folder.is_dir():
            raise AVSRDataError(f"{folder}: no such split folder (data.root={config.root!r}, split {split!r})")
        self.utterances: list[Utterance] = []
        self.skipped: dict[str, list[str]] = {}
        self.skip_reasons: dict[str, str] = {}  # utterance -> the full message (file and reason)
        media = (".txt", *AUDIO_SUFFIXES, *VIDEO_SUFFIXES)
        stems = sorted({p.with_suffix("") for p in folder.rglob("*") if p.suffix in media and p.is_file()})
        for stem in stems:
            try:
                self.utterances.append(self._check(folder, stem))
            except AVSRDataError as err:
                if config.on_error == "raise":
                    raise
                reason = str(err).split(": ", 1)[-1].split(" (")[0]
                self.skipped.setdefault(reason, []).append(str(stem))
                self.skip_reasons[str(stem)] = str(err)
        self._report_skipped(folder, say)

    def _report_skipped(self, folder: Path, say: Callable[[str], None]) -> None:
        """Says how many utterances were skipped and why (first few); too many, or all, is an error."""
        if not self.skipped_count:
            return
        total = self.skipped_count + len(self.utterances)
        first = "; ".join(list(self.skip_reasons.values())[:SKIPS_SHOWN])
        more = f"; and {self.skipped_count - SKIPS_SHOWN} more" if self.skipped_count > SKIPS_SHOWN else ""
        summary = f"{folder}: skipped {self.skipped_count} of {total} utterances (on_error: skip): {first}{more}"
        if not self.utterances:
            raise AVSRDataError(f"{folder}: no usable utterance; {summary.split(': ', 1)[1]}")
        limit = self.config.max_skipped_fraction
        if self.skipped_count > limit * total:
            raise AVSRDataError(f"{summary}; that is more than data.max_skipped_fraction={limit:g} of the split")
        say(summary)

    @property
    def skipped_count(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def _check(self, folder: Path, stem: Path) -> Utterance:
        transcript = stem.with_suffix(".txt")
        audio, video = _find(stem, AUDIO_SUFFIXES), _find(stem, VIDEO_SUFFIXES)
        if not transcript.is_file():
            raise AVSRDataError(f"{audio or video}: no transcript {transcript.name} beside it")
        if audio is None or video is None:
            what = "audio (.wav/.flac)" if audio is None else "video (.npy/.mp4)"
            raise AVSRDataError(f"{stem}: missing {what} beside the transcript")
        for path in (transcript, audio, video):
            if path.stat().st_size == 0:
                raise AVSRDataError(f"{path}: empty file")
        try:
            text = read_transcript(transcript)
        except UnicodeDecodeError as err:
            raise AVSRDataError(f"{transcript}: unreadable transcript ({err})") from None
        if not text:
            raise AVSRDataError(f"{transcript}: empty transcript")
        seconds = audio_duration(audio)
        shape, fps = _frames_shape(video, self.config.frames_fps)
        check_frames_shape(video, shape)
        mismatch = abs(seconds - shape[0] / fps)
        if mismatch > self.config.max_av_mismatch_s:
            raise AVSRDataError(f"{video}: audio/video length mismatch ({seconds:.3f} s of audio, "
                                f"{shape[0] / fps:.3f} s of video; tolerance {self.config.max_av_mismatch_s} s)")
        if self.config.max_seconds and seconds > self.config.max_seconds:
            raise AVSRDataError(f"{audio}: too long ({seconds:.2f} s > max_seconds {self.config.max_seconds})")
        return Utterance(str(stem.relative_to(folder)), audio, video, transcript)

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int) -> dict[str, Any]:
        utt, config = self.utterances[index], self.config
        audio = read_audio(utt.audio)
        if config.snr_db is not None:
            rng = np.random.default_rng([config.noise_seed, zlib.crc32(utt.id.encode())])
            audio = add_noise(audio, config.snr_db, rng)
        frames, fps = read_frames(utt.video, config.frames_fps)
        check_frames_shape(utt.video, frames.shape)
        return {"id": utt.id, "audio": torch.from_numpy(audio), "text": read_transcript(utt.transcript),
                "words": read_word_timings(utt.transcript),
                "video": normalise_video(frames, fps, config.fps, config.crop_size)}


def collate_avsr(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Zero-padded ``audio`` (B, S) and ``video`` (B, T, H, W) with their lengths; ``text`` and ``id`` lists."""
    audio_lengths = torch.tensor([len(s["audio"]) for s in samples])
    video_lengths = torch.tensor([len(s["video"]) for s in samples])
    audio = torch.zeros(len(samples), int(audio_lengths.max()))
    video = torch.zeros(len(samples), int(video_lengths.max()), *samples[0]["video"].shape[1:])
    for i, sample in enumerate(samples):
        audio[i, : len(sample["audio"])] = sample["audio"]
        video[i, : len(sample["video"])] = sample["video"]
    return {"audio": audio, "audio_lengths": audio_lengths, "video": video, "video_lengths": video_lengths,
            "text": [s["text"] for s in samples], "id": [s["id"] for s in samples],
            "words": [s.get("words", []) for s in samples]}
