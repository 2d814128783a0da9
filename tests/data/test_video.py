"""Video files through PyAV (data/video.py): real .mp4 files with an AAC audio track, written and read back."""

from __future__ import annotations

import numpy as np
import pytest

from data.video import VideoReadError, probe_video, read_video_audio, read_video_frames, write_mp4

RATE = 16_000


def ramp_video(frames: int = 20, height: int = 32, width: int = 48) -> np.ndarray:
    """Frame i is grey level 10 * i, with a brighter 8x10 patch (the 'mouth') at x=10, y=8."""
    video = np.repeat((10 * np.arange(frames, dtype=np.uint8))[:, None, None], height, 1).repeat(width, 2)
    video[:, 8:16, 10:20] = np.minimum(255, video[:, 8:16, 10:20].astype(int) + 50)
    return video


def burst_audio(seconds: float = 0.8, onset: float = 0.4) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (np.where(t >= onset, 0.5, 0.0) * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


@pytest.fixture
def clip(tmp_path):
    return write_mp4(tmp_path / "clip.mp4", ramp_video(), 25, burst_audio())


def test_probe_reads_the_header(clip):
    info = probe_video(clip)
    assert (info.frames, info.fps, info.width, info.height, info.has_audio) == (20, 25.0, 48, 32, True)
    assert info.seconds == pytest.approx(0.8)
    assert 0.75 < info.audio_seconds < 0.95  # AAC rounds up to whole 1024-sample frames


def test_frames_decode_in_order_with_span_and_box(clip):
    frames, fps = read_video_frames(clip)
    assert frames.shape == (20, 32, 48) and frames.dtype == np.uint8 and fps == 25.0
    background = frames[:, 28, 40].astype(int)
    assert np.all(np.abs(background - 10 * np.arange(20)) <= 6)  # lossy codec: grey levels within a few
    part, _ = read_video_frames(clip, start=0.2, end=0.4)
    assert len(part) == 5 and abs(int(part[0, 28, 40]) - 50) <= 6  # frames 5..9
    mouth, _ = read_video_frames(clip, box=[10, 8, 10, 8])
    assert mouth.shape == (20, 8, 10)
    assert mouth[:, 2:6, 2:8].mean() > frames[:, 20:, 30:].mean() + 30  # the bright patch, not the background


def test_audio_track_is_mono_16k_and_keeps_its_timing(clip):
    audio = read_video_audio(clip)
    assert audio.dtype == np.float32 and audio.ndim == 1 and abs(len(audio) - 0.8 * RATE) < 2048
    onset = np.argmax(np.abs(audio) > 0.25) / RATE
    assert 0.38 < onset < 0.48  # the burst at 0.4 s (plus at most the AAC priming of 64 ms)
    assert len(read_video_audio(clip, 0.2, 0.4)) == int(0.2 * RATE)


def test_bad_files_are_named(tmp_path, clip):
    garbage = tmp_path / "bad.mp4"
    garbage.write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a movie")
    with pytest.raises(VideoReadError, match=r"bad.mp4: unreadable video"):
        probe_video(garbage)
    silent = write_mp4(tmp_path / "silent.mp4", ramp_video(4), 25)
    with pytest.raises(VideoReadError, match=r"silent.mp4: no audio track"):
        read_video_audio(silent)
    with pytest.raises(VideoReadError, match=r"clip.mp4: mouth box \[x=40, y=8, w=10, h=8\] is not inside the 48x32"):
        read_video_frames(clip, box=[40, 8, 10, 8])
    with pytest.raises(VideoReadError, match=r"clip.mp4: no video frame in \[5.0, 6.0\) s"):
        read_video_frames(clip, start=5.0, end=6.0)
