"""Video files (``.mp4`` and anything else FFmpeg reads) through PyAV (``av``, FFmpeg bundled in its wheel).

``read_video_frames`` decodes the first video stream to grey levels (T, H, W) uint8 with its frame rate,
optionally only the frames in [start, end) seconds and only a mouth box (x, y, width, height in pixels).
``read_video_audio`` decodes the first audio stream to mono float32 at 16 kHz (LRS3 ships its audio only
inside the ``.mp4``). ``probe_video`` reads the container's header (frame count, rate, whether there is an
audio track) without decoding, so a dataset can check thousands of files when it is built. ``write_mp4``
encodes frames (and optional audio) for tests and synthetic sets. Unreadable files, a missing stream and a
box outside the picture are ``VideoReadError`` naming the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mm.errors import MMTuneError

SAMPLE_RATE = 16_000


class VideoReadError(MMTuneError, ValueError):
    """A video file cannot be used; the message names the file and why."""


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    fps: float
    has_audio: bool
    width: int
    height: int
    audio_seconds: float = 0.0  # the audio track's duration from the header (0: no track, or not declared)

    @property
    def seconds(self) -> float:
        return self.frames / self.fps


def _open(path: Path):
    import av

    try:
        return av.open(str(path))
    except Exception as err:  # PyAV raises FFmpeg's error types (InvalidDataError, FileNotFoundError, ...)
        raise VideoReadError(f"{path}: unreadable video ({err})") from None


def _video_stream(path: Path, container):
    """(the first video stream, its frame rate), or an error naming the file when either is missing."""
    if not container.streams.video:
        raise VideoReadError(f"{path}: no video stream")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        raise VideoReadError(f"{path}: the video stream has no frame rate")
    return stream, rate


def probe_video(path: str | Path) -> VideoInfo:
    """Frame count, frame rate, size and whether an audio track exists, from the header (no decoding)."""
    path = Path(path)
    with _open(path) as container:
        stream, rate = _video_stream(path, container)
        frames = stream.frames
        if not frames and stream.duration is not None and stream.time_base is not None:
            frames = round(float(stream.duration * stream.time_base) * float(rate))
        if not frames and container.duration:
            frames = round(container.duration / 1_000_000 * float(rate))
        audio_seconds = 0.0
        if container.streams.audio:
            track = container.streams.audio[0]
            if track.duration is not None and track.time_base is not None:
                audio_seconds = float(track.duration * track.time_base)
        return VideoInfo(int(frames), float(rate), bool(container.streams.audio), stream.width, stream.height,
                         audio_seconds)


def check_box(path: Path, box: Sequence[int], width: int, height: int) -> tuple[int, int, int, int]:
    if len(box) != 4 or any(int(v) != v for v in box):
        raise VideoReadError(f"{path}: mouth box must be 4 integers [x, y, width, height], got {list(box)}")
    x, y, w, h = (int(v) for v in box)
    if w < 1 or h < 1 or x < 0 or y < 0 or x + w > width or y + h > height:
        raise VideoReadError(f"{path}: mouth box [x={x}, y={y}, w={w}, h={h}] is not inside the {width}x{height} "
                             "picture")
    return x, y, w, h


def read_video_frames(path: str | Path, start: float | None = None, end: float | None = None,
                      box: Sequence[int] | None = None) -> tuple[np.ndarray, float]:
    """Grey frames (T, H, W) uint8 whose time is in [start, end) seconds (all when None), cropped to ``box``."""
    path = Path(path)
    with _open(path) as container:
        stream, rate = _video_stream(path, container)
        frames = []
        try:
            for index, frame in enumerate(container.decode(stream)):
                time = frame.time if frame.time is not None else index / float(rate)
                if start is not None and time < start - 1e-6:
                    continue
                if end is not None and time >= end - 1e-6:
                    break
                frames.append(frame.to_ndarray(format="gray"))
        except Exception as err:
            raise VideoReadError(f"{path}: unreadable video ({err})") from None
    if not frames:
        span = "" if start is None and end is None else f" in [{start}, {end}) s"
        raise VideoReadError(f"{path}: no video frame{span}")
    video = np.stack(frames)
    if box is not None:
        x, y, w, h = check_box(path, box, video.shape[2], video.shape[1])
        video = video[:, y : y + h, x : x + w]
    return np.ascontiguousarray(video), float(rate)


def read_video_audio(path: str | Path, start: float | None = None, end: float | None = None) -> np.ndarray:
    """The first audio track as mono float32 at 16 kHz, cut to [start, end) seconds when given."""
    import av

    path = Path(path)
    with _open(path) as container:
        if not container.streams.audio:
            raise VideoReadError(f"{path}: no audio track")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        chunks = []
        try:
            for frame in container.decode(container.streams.audio[0]):
                samples = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
                if frame.time is not None and frame.time < 0 and samples:  # encoder priming (an mp4 edit list)
                    samples[0] = samples[0][min(len(samples[0]), round(-frame.time * SAMPLE_RATE)):]
                chunks += samples
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
        except Exception as err:
            raise VideoReadError(f"{path}: unreadable audio track ({err})") from None
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    first = round((start or 0.0) * SAMPLE_RATE)
    last = len(audio) if end is None else round(end * SAMPLE_RATE)
    audio = audio[first:last]
    if audio.size == 0:
        raise VideoReadError(f"{path}: empty audio track" + ("" if start is None and end is None
                                                              else f" in [{start}, {end}) s"))
    return audio.astype(np.float32)


def write_mp4(path: str | Path, frames: np.ndarray, fps: float, audio: np.ndarray | None = None,
              sample_rate: int = SAMPLE_RATE, codec: str = "mpeg4") -> Path:
    """Encode (T, H, W) or (T, H, W, 3) uint8 frames (even H and W) and optional mono float audio in [-1, 1]
    (AAC) to ``path`` through a temporary file renamed into place. The AAC track starts with the encoder's
    1024 priming samples (64 ms at 16 kHz): this writer stores no edit list to hide them."""
    import os
    from fractions import Fraction

    import av

    path = Path(path)
    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=-1)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    with av.open(str(tmp), "w", format="mp4") as container:
        video = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        sound = None
        if audio is not None:
            sound = container.add_stream("aac", rate=sample_rate)
            sound.layout = "mono"
        for picture in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(video.encode())
        if sound is not None:
            block = av.AudioFrame.from_ndarray(np.asarray(audio, np.float32)[None], format="flt", layout="mono")
            block.sample_rate = sample_rate
            container.mux(sound.encode(block))
            container.mux(sound.encode())
    tmp.replace(path)
    return path
