"""Bad audio-visual data (WAV, frames .npy, transcripts, a generated set) for the AVSR readers and
``mmtune train``: an error naming the culprit file (the WAV when the WAV is cut short, not the video beside
it), or with ``on_error: skip`` a skip that is counted and said with its file and reason, and stops past
``max_skipped_fraction``; other sample rates and channel counts work. Nothing on disk is changed.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile
from corpus import assert_clear_error, assert_kept, run_mmtune, snapshot

from data.avsr import AVSRDataConfig, AVSRDataError, AVSRDataset, check_wav_complete
from data.fake_av import FakeAVConfig, GeneratedDataMismatchError, make_fake_avsr

RECIPE = "configs/avsr/audio_only.yaml"


def write(folder: Path, name: str, seconds: float = 1.0, rate: int = 16_000, channels: int = 1,
          frames: int = 25, text: str = "one two") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    soundfile.write(str(folder / f"{name}.wav"), np.stack([tone] * channels, -1), rate, subtype="PCM_16")
    np.save(folder / f"{name}.npy", np.full((frames, 32, 32), 128, np.uint8))
    (folder / f"{name}.txt").write_text(text)


def speakers(root: Path, count: int) -> Path:
    """``count`` good utterances u00.. under root/train/spk0."""
    folder = root / "train" / "spk0"
    for i in range(count):
        write(folder, f"u{i:02d}")
    return folder


def config(root: Path, **options) -> AVSRDataConfig:
    return AVSRDataConfig(root=str(root), crop_size=16, **options)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ---------------------------------------------------------------------------- clear errors


def test_truncated_wav_is_blamed_on_the_wav_not_the_video(tmp_path):
    folder = speakers(tmp_path, 2)
    truncate(folder / "u01.wav")
    before = snapshot(tmp_path)
    with pytest.raises(AVSRDataError, match=r"u01.wav: truncated WAV: its header declares 32000 bytes") as err:
        AVSRDataset(config(tmp_path), "train")
    assert ".npy" not in str(err.value)
    assert_kept(before, tmp_path)


def test_wav_with_unknown_streamed_length_is_not_called_truncated(tmp_path):
    folder = speakers(tmp_path, 1)
    wav = folder / "u00.wav"
    data = bytearray(wav.read_bytes())
    at = data.index(b"data") + 4
    data[at: at + 4] = struct.pack("<I", 0xFFFFFFFF)  # what a streaming writer leaves
    wav.write_bytes(bytes(data))
    check_wav_complete(wav)


def test_missing_transcript_names_the_audio(tmp_path):
    folder = speakers(tmp_path, 2)
    (folder / "u01.txt").unlink()
    with pytest.raises(AVSRDataError, match=r"u01.wav: no transcript u01.txt beside it"):
        AVSRDataset(config(tmp_path), "train")


def test_transcript_that_is_not_utf8_is_named(tmp_path):
    folder = speakers(tmp_path, 2)
    (folder / "u00.txt").write_bytes(b"\xff\xfe caf\xe9")
    with pytest.raises(AVSRDataError, match=r"u00.txt: unreadable transcript"):
        AVSRDataset(config(tmp_path), "train")


def test_pickled_frames_file_is_named(tmp_path):
    folder = speakers(tmp_path, 2)
    np.save(folder / "u00.npy", np.array([{"frames": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(AVSRDataError, match=r"u00.npy: unreadable frames"):
        AVSRDataset(config(tmp_path), "train")


def test_too_many_skips_stop_with_the_count_and_the_first_files(tmp_path):
    folder = speakers(tmp_path, 5)
    for name in ("u01", "u03"):
        truncate(folder / f"{name}.wav")
    with pytest.raises(AVSRDataError, match=r"skipped 2 of 5 utterances .*u01.wav: truncated WAV.*u03.wav: "
                                            r"truncated WAV.*more than data.max_skipped_fraction=0.1"):
        AVSRDataset(config(tmp_path, on_error="skip"), "train")


def test_every_utterance_skipped_is_an_error_naming_the_split(tmp_path):
    folder = speakers(tmp_path, 4)
    for wav in folder.glob("*.wav"):
        wav.write_bytes(b"")
    with pytest.raises(AVSRDataError, match=r"train: no usable utterance; skipped 4 of 4 .*u00.wav: empty file.*"
                                            r"and 1 more"):
        AVSRDataset(config(tmp_path, on_error="skip", max_skipped_fraction=1.0), "train")


def test_regenerating_a_generated_set_with_other_settings_is_refused(tmp_path):
    root = make_fake_avsr(tmp_path / "synth", FakeAVConfig(splits={"train": 2}, engine="tones"))
    before = snapshot(root)
    with pytest.raises(GeneratedDataMismatchError, match=r"synth: holds a synthetic set generated with other "
                                                         r"settings \(seed: 0 there, 3 asked\)"):
        make_fake_avsr(root, FakeAVConfig(splits={"train": 2}, engine="tones", seed=3))
    assert_kept(before, root)
    assert snapshot(root) == before  # nothing regenerated, nothing added


# ---------------------------------------------------------------------------- counted skips


def test_skip_is_counted_and_said_with_file_and_reason(tmp_path, capsys):
    folder = speakers(tmp_path, 10)
    truncate(folder / "u04.wav")
    ds = AVSRDataset(config(tmp_path, on_error="skip"), "train")
    assert len(ds) == 9 and ds.skipped_count == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"{tmp_path / 'train'}: skipped 1 of 10 utterances (on_error: skip): ")
    assert f"{folder / 'u04.wav'}: truncated WAV" in line


# ---------------------------------------------------------------------------- works


@pytest.mark.parametrize("rate, channels", [(8_000, 1), (44_100, 1), (16_000, 2)],
                         ids=["8kHz", "44.1kHz", "stereo"])
def test_other_rates_and_channel_counts_are_resampled_to_16k_mono(tmp_path, rate, channels):
    write(tmp_path / "train" / "s", "u", rate=rate, channels=channels)
    sample = AVSRDataset(config(tmp_path), "train")[0]
    assert sample["audio"].dim() == 1 and abs(len(sample["audio"]) - 16_000) <= 2
    assert 0.15 < float(sample["audio"].abs().max()) < 0.35  # the tone's amplitude, not clipped or summed


# ---------------------------------------------------------------------------- through mmtune train


def _train(root: Path, out: Path, capsys, *extra: str):
    return run_mmtune(["train", "--config", RECIPE, f"data.root={root}", "synthetic.splits={}",
                       f"train.out_dir={out}", "train.max_steps=1", *extra], capsys)


def test_train_on_a_truncated_wav_is_one_line_naming_it(tmp_path, capsys):
    folder = speakers(tmp_path / "data", 2)
    truncate(folder / "u00.wav")
    before = snapshot(tmp_path / "data")
    result = _train(tmp_path / "data", tmp_path / "run", capsys, "data.on_error=raise")
    assert_clear_error(result, "train", str(folder / "u00.wav"), "truncated WAV")
    assert_kept(before, tmp_path / "data")


def test_train_on_a_missing_split_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    result = _train(tmp_path / "data", tmp_path / "run", capsys)
    assert_clear_error(result, "train", str(tmp_path / "data" / "train"), "no such split folder")


def test_train_on_a_generated_set_made_with_other_settings_is_one_line(tmp_path, capsys):
    root = make_fake_avsr(tmp_path / "synth", FakeAVConfig(splits={"train": 2, "test": 1}, engine="tones"))
    before = snapshot(root)
    result = run_mmtune(["train", "--config", RECIPE, f"data.root={root}", "synthetic.splits={train: 2, test: 1}",
                         "synthetic.engine=tones", "synthetic.seed=7", f"train.out_dir={tmp_path / 'run'}"], capsys)
    assert_clear_error(result, "train", str(root), "seed: 0 there, 7 asked", "not regenerated in place")
    assert_kept(before, root)


@pytest.mark.parametrize("value", ["2.0", "-0.1"])
def test_bad_max_skipped_fraction_names_the_key(capsys, value):
    result = run_mmtune(["train", "--config", RECIPE, "--check", f"data.max_skipped_fraction={value}"], capsys)
    assert_clear_error(result, "train", "max_skipped_fraction")
