"""A synthetic audio-visual speech set in ``data/avsr.py``'s layout, for tests and the AVSR demo.

Sentences are digit strings ("three one four") and short commands ("turn left"). Speech comes from
espeak-ng with varied voices, rates and pitches (22,050 Hz WAVs, so the dataset's resampling is used), or,
with ``engine="tones"``, from pure numpy: each word a fixed pair of harmonic "syllables" (for unit tests
where the speech content does not matter). Words are rendered one at a time and joined with random
pauses, so each word's time span is known: transcripts are written in LRS3's layout, text plus a
``WORD START END ASDSCORE`` table. The mouth-region frames are rendered at 25 fps: lips (an ellipse) whose
opening follows the audio's loudness envelope, with head jitter and pixel noise. Optional white noise at
a given SNR is added to the written audio.

    make_fake_avsr("/tmp/av", FakeAVConfig(splits={"train": 40, "test": 10}, engine="espeak", seed=0))
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from data.avsr import add_noise
from mm.config import ConfigError
from mm.errors import MMTuneError
from mm.state import atomic_write

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COMMANDS = ["turn left", "turn right", "go forward", "go back", "stop now", "lights on", "lights off",
            "open the door", "close the door", "play music", "volume up", "volume down"]
VOICES = ["en-us", "en-gb", "en-us+f3", "en-gb+m7", "en-us+m3", "en-gb+f2"]
TONE_RATE = 16_000
MANIFEST = "fake_av.json"


class GeneratedDataMismatchError(MMTuneError, FileExistsError):
    """A folder holds a generated set made with other settings than the ones asked for."""


@dataclass
class FakeAVConfig:
    """How ``make_fake_avsr`` generates a set (a recipe's ``synthetic`` section)."""

    splits: dict[str, int] = field(default_factory=dict, metadata={
        "help": "Utterances per split folder, e.g. {train: 200, test: 40} (empty: generate nothing)."})
    engine: Literal["espeak", "tones"] = field(default="espeak", metadata={"help": "Speech source."})
    seed: int = field(default=0, metadata={"help": "Seed of sentences, voices, jitter and noise."})
    crop_size: int = field(default=32, metadata={"help": "Side of the rendered mouth crops."})
    min_digits: int = field(default=2, metadata={"help": "Shortest digit string."})
    max_digits: int = field(default=4, metadata={"help": "Longest digit string."})
    command_fraction: float = field(default=0.3, metadata={"help": "Share of command sentences."})
    snr_db: float | None = field(default=None, metadata={"help": "Add white noise at this SNR to the audio."})
    video_format: Literal["npy", "mp4"] = field(default="npy", metadata={
        "help": "npy: .wav + frames .npy + .txt; mp4: LRS3's own files, an .mp4 (video and AAC audio) + .txt."})

    def __post_init__(self) -> None:
        if self.engine not in ("espeak", "tones"):
            raise ConfigError(f"synthetic: key 'engine' must be 'espeak' or 'tones', got {self.engine!r}")
        if not 1 <= self.min_digits <= self.max_digits:
            raise ConfigError(f"synthetic: keys 'min_digits'/'max_digits' need 1 <= min <= max, got "
                              f"{self.min_digits}, {self.max_digits}")
        if self.video_format not in ("npy", "mp4"):
            raise ConfigError(f"synthetic: key 'video_format' must be 'npy' or 'mp4', got {self.video_format!r}")
        if self.video_format == "mp4" and self.crop_size % 2:
            raise ConfigError(f"synthetic: video_format mp4 needs an even crop_size (4:2:0 video), got {self.crop_size}")
        if not 0.0 <= self.command_fraction <= 1.0:
            raise ConfigError(f"synthetic: key 'command_fraction' must be in [0, 1], got {self.command_fraction}")


def sentence(rng: np.random.Generator, config: FakeAVConfig) -> str:
    if rng.random() < config.command_fraction:
        return COMMANDS[rng.integers(len(COMMANDS))]
    count = int(rng.integers(config.min_digits, config.max_digits + 1))
    return " ".join(DIGITS[i] for i in rng.integers(0, 10, count))


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def speak_espeak(text: str, voice: str, words_per_minute: int, pitch: int) -> tuple[np.ndarray, int]:
    """espeak-ng's rendering of ``text`` as float32 mono and its sample rate (22,050 Hz)."""
    import soundfile

    if not espeak_available():
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng; `make install` does it); "
                           "or use engine='tones'")
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        command = ["espeak-ng", "-v", voice, "-s", str(words_per_minute), "-p", str(pitch), "-w", str(wav), text]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if done.returncode != 0 or not wav.is_file():
            raise RuntimeError(f"espeak-ng failed on {text!r} with voice {voice}: {done.stderr.strip()}")
        audio, rate = soundfile.read(str(wav), dtype="float32")
    return audio, rate


def tone_word(word: str, speed: float) -> np.ndarray:
    """Numpy "speech" for one word: two harmonic syllables at pitches fixed by the word."""
    word_rng = np.random.default_rng(zlib.crc32(word.encode()))
    pieces = []
    for f0 in word_rng.uniform(110, 260, 2):
        n = int(0.12 * speed * TONE_RATE)
        t = np.arange(n) / TONE_RATE
        wave = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in (1, 2, 3))
        pieces.append((0.3 * np.hanning(n) * wave).astype(np.float32))
    return np.concatenate(pieces)


def trim_silence(audio: np.ndarray, threshold: float = 0.02) -> np.ndarray:
    """``audio`` without its leading and trailing samples quieter than ``threshold`` x its peak."""
    loud = np.flatnonzero(np.abs(audio) > threshold * max(float(np.abs(audio).max()), 1e-8))
    return audio[loud[0]: loud[-1] + 1] if loud.size else audio


def speak(words: list[str], config: FakeAVConfig, rng: np.random.Generator,
          voice: str = "en-us") -> tuple[np.ndarray, int, list]:
    """A sentence rendered word by word (so each word's time span is known), with random pauses between.

    Returns float32 mono audio, its sample rate and ``[(word, start_s, end_s), ...]``.
    """
    if config.engine == "espeak":
        wpm, pitch = int(rng.integers(130, 190)), int(rng.integers(30, 71))
        rendered = [speak_espeak(w, voice, wpm, pitch) for w in words]
        rate = rendered[0][1]
        clips = [trim_silence(audio) for audio, _ in rendered]
    else:
        speed, rate = rng.uniform(0.85, 1.15), TONE_RATE
        clips = [tone_word(w, speed) for w in words]
    pieces, spans, cursor = [], [], 0
    for i, (word, clip) in enumerate(zip(words, clips, strict=True)):
        pause = np.zeros(int((rng.uniform(0.08, 0.2) if i == 0 else rng.uniform(0.03, 0.12)) * rate), np.float32)
        pieces += [pause, clip.astype(np.float32)]
        cursor += len(pause)
        spans.append((word, cursor / rate, (cursor + len(clip)) / rate))
        cursor += len(clip)
    pieces.append(np.zeros(int(rng.uniform(0.08, 0.2) * rate), np.float32))
    return np.concatenate(pieces), rate, spans


def loudness_envelope(audio: np.ndarray, rate: int, frames: int) -> np.ndarray:
    """RMS of each video frame's stretch of audio, smoothed and scaled to [0, 1]."""
    edges = np.linspace(0, len(audio), frames + 1).astype(int)
    rms = np.array([np.sqrt(np.mean(audio[a:b] ** 2)) if b > a else 0.0 for a, b in zip(edges, edges[1:], strict=False)])
    rms = np.convolve(rms, [0.25, 0.5, 0.25], mode="same")
    return np.clip(rms / max(rms.max(), 1e-8), 0.0, 1.0)


def render_mouth(opening: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """(T, size, size) uint8 mouth crops: skin, lips whose gap follows ``opening``, jitter and noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    frames = np.empty((len(opening), size, size), np.float32)
    shade = rng.uniform(0.5, 0.7)
    for t, open_t in enumerate(opening):
        cy, cx = rng.normal(0, 0.02, 2)
        width = 0.32 + 0.04 * open_t
        height = 0.05 + 0.22 * open_t
        lips = ((x - cx) / (width + 0.06)) ** 2 + ((y - cy) / (height + 0.06)) ** 2 <= 1
        gap = ((x - cx) / width) ** 2 + ((y - cy) / height) ** 2 <= 1
        image = shade + 0.1 * y  # skin with a vertical shading gradient
        image = np.where(lips, 0.35, image)
        frames[t] = np.where(gap & (open_t > 0.05), 0.08, image)
    frames += rng.normal(0, 0.03, frames.shape)
    return (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)


def lrs3_transcript(spans: list[tuple[str, float, float]]) -> str:
    """LRS3's transcript layout: the text, then one line per word with its start and end in seconds."""
    lines = ["Text:  " + " ".join(w for w, _, _ in spans), "Conf:  5", "", "WORD START END ASDSCORE"]
    lines += [f"{w} {start:.3f} {end:.3f} 5.0" for w, start, end in spans]
    return "\n".join(lines) + "\n"


def write_utterance(folder: Path, name: str, transcript: str, audio: np.ndarray, rate: int,
                    frames: np.ndarray, video_format: str = "npy", fps: float = 25.0) -> None:
    import soundfile

    folder.mkdir(parents=True, exist_ok=True)
    if video_format == "mp4":  # LRS3's own layout: the speech is the video file's audio track
        from data.video import write_mp4

        write_mp4(folder / f"{name}.mp4", frames, fps, audio, sample_rate=rate)
        atomic_write(folder / f"{name}.txt", lambda tmp: Path(tmp).write_text(transcript))
        return
    atomic_write(folder / f"{name}.wav", lambda tmp: soundfile.write(tmp, audio, rate, format="WAV", subtype="PCM_16"))
    atomic_write(folder / f"{name}.txt", lambda tmp: Path(tmp).write_text(transcript))

    def save_frames(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, frames)

    atomic_write(folder / f"{name}.npy", save_frames)


def make_fake_avsr(root: str | Path, config: FakeAVConfig, fps: float = 25.0) -> Path:
    """Generate ``config.splits`` under ``root`` (skipped if ``root`` already holds this exact set).

    A root holding a set generated with other settings is an error listing the differences: a run's data is
    never regenerated in place (that would silently change what an earlier run trained or is evaluated on).
    """
    root = Path(root)
    wanted = {**asdict(config), "fps": fps}
    if config.video_format == "npy":
        del wanted["video_format"]  # sets generated before the key existed hold no such entry
    manifest = root / MANIFEST
    if manifest.is_file():
        try:
            found = json.loads(manifest.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise GeneratedDataMismatchError(f"{manifest}: not valid JSON ({err}); delete the folder to "
                                             "regenerate it") from None
        if found == wanted:
            return root
        differences = ", ".join(f"{key}: {found.get(key)!r} there, {wanted.get(key)!r} asked"
                                for key in sorted(set(found) | set(wanted)) if found.get(key) != wanted.get(key))
        raise GeneratedDataMismatchError(
            f"{root}: holds a synthetic set generated with other settings ({differences}); it is not "
            "regenerated in place: set another data.root, or delete the folder to regenerate it")
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root}: exists and is not a generated set ({MANIFEST} missing); pick another root")
    for split_index, (split, count) in enumerate(sorted(config.splits.items())):
        rng = np.random.default_rng([config.seed, split_index, zlib.crc32(split.encode())])
        for i in range(count):
            speaker = int(rng.integers(len(VOICES)))
            audio, rate, spans = speak(sentence(rng, config).split(), config, rng, VOICES[speaker])
            if config.snr_db is not None:
                audio = add_noise(audio, config.snr_db, rng)
            peak = float(np.abs(audio).max())
            audio = audio * (0.9 / peak) if peak > 0.9 else audio  # PCM_16 must not clip
            count_frames = max(1, round(len(audio) / rate * fps))
            frames = render_mouth(loudness_envelope(audio, rate, count_frames), config.crop_size, rng)
            write_utterance(root / split / f"spk{speaker}", f"{split}_{i:05d}", lrs3_transcript(spans), audio, rate,
                            frames, config.video_format, fps)
    atomic_write(manifest, lambda tmp: Path(tmp).write_text(json.dumps(wanted)))
    return root
