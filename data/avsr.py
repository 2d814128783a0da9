"""Audio-visual speech recognition data: the LRS3 folder layout or a manifest, audio-only, video-only or both.

Folder layout (``data.train_split`` / ``data.eval_split`` name a folder under ``data.root``):

    <root>/<split>/<speaker>/<utterance>.wav   audio (any rate soundfile reads; resampled to 16 kHz)
    <root>/<split>/<speaker>/<utterance>.mp4   video, and the audio when there is no .wav (LRS3 ships only .mp4)
                                  (or .npy)    ... or mouth-crop frames (T, H, W) or (T, H, W, 3), uint8 or [0, 1]
    <root>/<split>/<speaker>/<utterance>.txt   transcript: the file, or LRS3's "Text: ..." line (and its
                                               word timings table, returned as "words" when present)

Manifest (a split ending in ``.csv`` or ``.jsonl``, relative to ``data.root`` or absolute): one utterance per
row with audio, video, text and optional start/end seconds and mouth crop (data/av_manifest.py).

An audio-only task (``model.video_rates: []``) needs no video file and a video-only task no audio file
(``AVSRDataset(..., need_audio=, need_video=)``). Samples are dicts ``{"id", "audio" (S,) float32 at 16 kHz,
"video" (T, crop, crop) grey levels in [0, 1] at ``fps``, "text", "words" [(word, start s, end s), ...] or
[]}``; a modality the task does not use is empty (0 samples / 0 frames). Video is cut to the mouth box
(the manifest's ``crop``, else ``data.mouth_box``, else the whole picture), resized to ``crop_size`` and
resampled in time to ``fps`` (nearest frame); ``.mp4`` is decoded by PyAV (data/video.py).

The dataset checks every utterance when it is built: missing, empty or unreadable files, an empty
transcript, and audio and video whose durations differ by more than ``max_av_mismatch_s`` are errors naming
the file, or, with ``on_error: skip``, are left out, counted in ``skipped`` and reported on stderr (the count
and the first few files with their reason); more than ``max_skipped_fraction`` of the split skipped is an
error. A ``.wav`` cut short (its header declares more audio than it holds) is an error naming the WAV.
Utterances longer than ``max_seconds`` follow ``long_utterances``: ``error`` (a bad utterance, as above),
``skip`` (left out, counted and reported apart from the broken files) or ``chunk`` (cut at word boundaries
into pieces of at most ``max_seconds`` using LRS3's word timings; one without timings is skipped and counted).
"""

from __future__ import annotations

import dataclasses
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from data.av_io import (  # noqa: F401  (re-exported: the readers are part of this module's interface)
    AUDIO_SUFFIXES,
    SAMPLE_RATE,
    VIDEO_SUFFIXES,
    AVSRDataError,
    add_noise,
    audio_duration,
    check_frames_shape,
    check_wav_complete,
    frames_shape,
    normalise_video,
    read_audio,
    read_frames,
    read_track,
    read_transcript,
    read_word_timings,
    track_duration,
)
from mm.config import ConfigError


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
    max_seconds: float = field(default=0.0, metadata={
        "help": "Longest utterance in seconds (0: no limit; the AVSR task then uses the audio encoder's window); "
                "longer ones follow long_utterances."})
    long_utterances: Literal["error", "skip", "chunk"] = field(default="error", metadata={
        "help": "An utterance longer than max_seconds is bad (error: on_error decides), left out and counted "
                "(skip), or cut at word boundaries into pieces <= max_seconds (chunk; needs LRS3 word timings)."})
    mouth_box: list[int] | None = field(default=None, metadata={
        "help": "Fixed mouth box [x, y, width, height] in the video's pixels, cut before resizing to crop_size "
                "(a manifest row's crop wins; null: the whole picture)."})
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
        if self.long_utterances not in ("error", "skip", "chunk"):
            raise ConfigError(f"avsr data: key 'long_utterances' must be 'error', 'skip' or 'chunk', "
                              f"got {self.long_utterances!r}")
        if self.long_utterances == "chunk" and self.max_seconds <= 0:
            raise ConfigError("avsr data: key 'long_utterances' is 'chunk' but 'max_seconds' is 0 (no length to "
                              "chunk to)")
        box = self.mouth_box
        if box is not None and (not isinstance(box, list | tuple) or len(box) != 4 or any(
                isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in box) or min(box[2:]) < 1):
            raise ConfigError(f"avsr data: key 'mouth_box' expects [x, y, width, height] integers (width, "
                              f"height >= 1), got {box!r}")
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise ConfigError(f"avsr data: key 'max_skipped_fraction' must be in [0, 1], "
                              f"got {self.max_skipped_fraction!r}")


SKIPS_SHOWN = 3  # skipped files named in the report (the count covers all)


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Utterance:
    id: str
    audio: Path | None  # a .wav/.flac or a video file's audio track; None when the task uses no audio
    video: Path | None  # frames .npy or a video file; None when the task uses no video
    transcript: Path | None  # the .txt of the folder layout (None for a manifest row)
    text: str = ""
    start: float | None = None  # seconds into the files (a manifest segment or a chunk)
    end: float | None = None
    box: tuple[int, int, int, int] | None = None  # the mouth box; None: data.mouth_box
    words: list[tuple[str, float, float]] = field(default_factory=list)  # timed from ``start``
    where: str = ""  # the manifest line that listed it, for error messages


def _find(stem: Path, suffixes: tuple[str, ...]) -> Path | None:
    return next((stem.with_suffix(s) for s in suffixes if stem.with_suffix(s).is_file()), None)


class AVSRDataset(torch.utils.data.Dataset):
    """The utterances of one split (sorted by path, or in manifest order), checked on construction (see the
    module doc). ``need_audio`` / ``need_video`` False: that modality's files are not looked for."""

    def __init__(self, config: AVSRDataConfig, split: str, say: Callable[[str], None] | None = None,
                 need_audio: bool = True, need_video: bool = True) -> None:
        from data.av_manifest import is_manifest

        if not need_audio and not need_video:
            raise ValueError("AVSRDataset needs audio, video or both")
        self.config, self.need_audio, self.need_video = config, need_audio, need_video
        say = say or _to_stderr
        self.utterances: list[Utterance] = []
        self.skipped: dict[str, list[str]] = {}
        self.skip_reasons: dict[str, str] = {}  # utterance -> the full message (file and reason)
        self.long_reasons: dict[str, str] = {}  # too long utterances left out (long_utterances: skip / chunk)
        self.chunked: dict[str, int] = {}  # utterance -> pieces it was cut into
        where = Path(split) if Path(split).is_absolute() else Path(config.root) / split
        for label, make in self._candidates(where, is_manifest(split)):
            try:
                utterance = make()
                self.utterances += self._fit_length(label, utterance, self._measure(utterance))
            except AVSRDataError as err:
                if config.on_error == "raise":
                    raise
                reason = str(err).split(": ", 1)[-1].split(" (")[0]
                self.skipped.setdefault(reason, []).append(label)
                self.skip_reasons[label] = str(err)
        self._report_long(where, say)
        self._report_skipped(where, say)

    def _candidates(self, where: Path, manifest: bool) -> list[tuple[str, Callable[[], Utterance]]]:
        if manifest:
            from data.av_manifest import ManifestError, read_manifest

            try:
                rows = read_manifest(where)
            except ManifestError as err:
                raise AVSRDataError(str(err)) from None
            return [(f"{where}:{row.line}", lambda row=row: self._from_row(where, row)) for row in rows]
        if not where.is_dir():
            raise AVSRDataError(f"{where}: no such split folder (data.root={self.config.root!r}, split "
                                f"{where.name!r}; a manifest split ends in .csv or .jsonl)")
        media = {".txt", *AUDIO_SUFFIXES, *VIDEO_SUFFIXES}
        stems = sorted({p.with_suffix("") for p in where.rglob("*") if p.suffix.lower() in media and p.is_file()})
        return [(str(stem), lambda stem=stem: self._from_stem(where, stem)) for stem in stems]

    def _from_stem(self, folder: Path, stem: Path) -> Utterance:
        transcript = stem.with_suffix(".txt")
        audio, video = _find(stem, AUDIO_SUFFIXES), _find(stem, VIDEO_SUFFIXES)
        if not transcript.is_file():
            raise AVSRDataError(f"{audio or video}: no transcript {transcript.name} beside it")
        if self.need_audio and audio is None and (video is None or video.suffix == ".npy"):
            raise AVSRDataError(f"{stem}: missing audio (.wav/.flac, or a video file with an audio track) beside "
                                "the transcript")
        if self.need_video and video is None:
            raise AVSRDataError(f"{stem}: missing video ({'/'.join(VIDEO_SUFFIXES)}) beside the transcript")
        if transcript.stat().st_size == 0:
            raise AVSRDataError(f"{transcript}: empty file")
        try:
            text = read_transcript(transcript)
        except UnicodeDecodeError as err:
            raise AVSRDataError(f"{transcript}: unreadable transcript ({err})") from None
        if not text:
            raise AVSRDataError(f"{transcript}: empty transcript")
        return Utterance(str(stem.relative_to(folder)), (audio or video) if self.need_audio else None,
                         video if self.need_video else None, transcript, text, words=read_word_timings(transcript))

    def _from_row(self, manifest: Path, row) -> Utterance:
        where = f"{manifest}: line {row.line}"
        audio = row.audio or (row.video if row.video is not None and row.video.suffix != ".npy" else None)
        if self.need_audio and audio is None:
            raise AVSRDataError(f"{where}: no audio: give 'audio', or a 'video' file with an audio track")
        if self.need_video and row.video is None:
            raise AVSRDataError(f"{where}: no 'video', and the task reads video (model.video_rates)")
        for path in (audio if self.need_audio else None, row.video if self.need_video else None):
            if path is not None and not path.is_file():
                raise AVSRDataError(f"{path}: no such file (listed at {where})")
        return Utterance(row.id, audio if self.need_audio else None, row.video if self.need_video else None, None,
                         row.text, row.start, row.end, row.crop, where=where)

    def _measure(self, utt: Utterance) -> float:
        """Checks the files of ``utt`` (sizes, readability, box, segment, audio/video agreement); its seconds."""
        for path in (utt.audio, utt.video):
            if path is not None and path.stat().st_size == 0:
                raise AVSRDataError(f"{path}: empty file")
        audio_seconds = track_duration(utt.audio) if utt.audio is not None else None
        video_seconds = None
        if utt.video is not None:
            shape, fps = frames_shape(utt.video, self.config.frames_fps)
            check_frames_shape(utt.video, shape)
            video_seconds = shape[0] / fps
            box = utt.box or self.config.mouth_box
            if box is not None:
                from data.video import VideoReadError, check_box

                try:
                    check_box(utt.video, box, shape[2], shape[1])
                except VideoReadError as err:
                    raise AVSRDataError(f"{err}{' (' + utt.where + ')' if utt.where else ''}") from None
        tolerance = self.config.max_av_mismatch_s
        if audio_seconds is not None and video_seconds is not None and abs(audio_seconds - video_seconds) > tolerance:
            raise AVSRDataError(f"{utt.video}: audio/video length mismatch ({audio_seconds:.3f} s of audio, "
                                f"{video_seconds:.3f} s of video; tolerance {tolerance} s)")
        total = audio_seconds if audio_seconds is not None else video_seconds
        first = utt.start or 0.0
        if first >= total or (utt.end is not None and utt.end > total + tolerance):
            raise AVSRDataError(f"{utt.audio or utt.video}: segment [{first}, {utt.end}] s is not inside its "
                                f"{total:.3f} s ({utt.where})")
        return (utt.end if utt.end is not None else total) - first

    def _fit_length(self, label: str, utt: Utterance, seconds: float) -> list[Utterance]:
        """``[utt]``, or its chunks, or [] for a too long utterance left out (see ``long_utterances``)."""
        limit, policy = self.config.max_seconds, self.config.long_utterances
        if not limit or seconds <= limit:
            return [utt]
        message = f"{utt.audio or utt.video}: too long ({seconds:.2f} s > max_seconds {limit:g})"
        if policy == "error":
            raise AVSRDataError(message)
        if policy == "chunk":
            from data.av_manifest import chunk_by_words

            pieces = chunk_by_words(utt.words, limit, seconds)
            if pieces:
                self.chunked[label] = len(pieces)
                offset = utt.start or 0.0
                return [dataclasses.replace(utt, id=f"{utt.id}#{k}", text=" ".join(w for w, _, _ in words),
                                            start=offset + begin, end=offset + finish,
                                            words=[(w, s - begin, e - begin) for w, s, e in words])
                        for k, (begin, finish, words) in enumerate(pieces)]
            message += ("; no word timings to cut it at" if not utt.words
                        else "; a word is longer than max_seconds")
        self.long_reasons[label] = message
        return []

    def _report_long(self, where: Path, say: Callable[[str], None]) -> None:
        limit = self.config.max_seconds
        if self.chunked:
            say(f"{where}: cut {len(self.chunked)} utterances longer than data.max_seconds={limit:g} into "
                f"{sum(self.chunked.values())} pieces at word boundaries (data.long_utterances: chunk)")
        if self.long_reasons:
            first = "; ".join(list(self.long_reasons.values())[:SKIPS_SHOWN])
            more = f"; and {len(self.long_reasons) - SKIPS_SHOWN} more" if len(self.long_reasons) > SKIPS_SHOWN else ""
            total = len(self.long_reasons) + len(self.utterances)
            say(f"{where}: left out {len(self.long_reasons)} utterances longer than data.max_seconds={limit:g} "
                f"(data.long_utterances: {self.config.long_utterances}; {total - len(self.long_reasons)} remain): "
                f"{first}{more}")
            if not self.utterances and not self.skipped_count:
                raise AVSRDataError(f"{where}: no usable utterance: all {len(self.long_reasons)} are longer than "
                                    f"data.max_seconds={limit:g}; raise it or use data.long_utterances: chunk")

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

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int) -> dict[str, Any]:
        utt, config = self.utterances[index], self.config
        audio = np.zeros(0, np.float32)
        if utt.audio is not None:
            audio = read_track(utt.audio, utt.start, utt.end)
            if config.snr_db is not None:
                rng = np.random.default_rng([config.noise_seed, zlib.crc32(utt.id.encode())])
                audio = add_noise(audio, config.snr_db, rng)
        video = torch.zeros(0, config.crop_size, config.crop_size)
        if utt.video is not None:
            frames, fps = read_frames(utt.video, config.frames_fps, utt.start, utt.end, utt.box or config.mouth_box)
            check_frames_shape(utt.video, frames.shape)
            video = normalise_video(frames, fps, config.fps, config.crop_size)
        return {"id": utt.id, "audio": torch.from_numpy(audio), "text": utt.text, "words": list(utt.words),
                "video": video}


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
