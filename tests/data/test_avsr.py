"""AVSR data: LRS3-like layout, resampling, video normalisation, checks that name the file, the fake maker."""

from __future__ import annotations

import re

import numpy as np
import pytest
import soundfile
import torch

from data.avsr import (
    AVSRDataConfig,
    AVSRDataError,
    AVSRDataset,
    add_noise,
    collate_avsr,
    normalise_video,
    read_transcript,
    read_word_timings,
)
from data.fake_av import (
    COMMANDS,
    DIGITS,
    FakeAVConfig,
    loudness_envelope,
    make_fake_avsr,
    render_mouth,
    speak,
)


def write(folder, name, seconds=1.0, rate=16_000, frames=25, text="one two", shape=(32, 32)):
    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    soundfile.write(str(folder / f"{name}.wav"), (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), rate)
    np.save(folder / f"{name}.npy", np.full((frames, *shape), 128, np.uint8))
    (folder / f"{name}.txt").write_text(text)


def config(root, **options) -> AVSRDataConfig:
    return AVSRDataConfig(root=str(root), crop_size=16, **options)


def test_reads_resamples_and_normalises(tmp_path):
    write(tmp_path / "train" / "spk0", "a", seconds=1.0, rate=22_050, frames=25, shape=(40, 48))
    write(tmp_path / "train" / "spk1", "b", seconds=0.6, rate=16_000, frames=15)
    ds = AVSRDataset(config(tmp_path), "train")
    assert [u.id for u in ds.utterances] == ["spk0/a", "spk1/b"]
    sample = ds[0]
    assert sample["audio"].dtype == torch.float32 and abs(len(sample["audio"]) - 16_000) <= 1
    assert sample["video"].shape == (25, 16, 16)
    torch.testing.assert_close(sample["video"], torch.full((25, 16, 16), 128 / 255))
    assert sample["text"] == "one two"
    batch = collate_avsr([ds[0], ds[1]])
    assert batch["audio"].shape == (2, 16_000) and batch["audio_lengths"].tolist() == [16_000, 9_600]
    assert batch["video"].shape == (2, 25, 16, 16) and batch["video_lengths"].tolist() == [25, 15]
    assert batch["text"] == ["one two", "one two"] and batch["id"] == ["spk0/a", "spk1/b"]


def test_video_colour_and_frame_rate_are_normalised():
    frames = np.zeros((50, 20, 20, 3), np.uint8)
    frames[..., 0] = np.arange(50)[:, None, None]  # red channel carries the frame index
    video = normalise_video(frames, source_fps=50.0, fps=25.0, crop_size=10)
    assert video.shape == (25, 10, 10)
    expected = 0.299 * np.arange(0, 50, 2) / 255  # every other frame, as grey levels
    np.testing.assert_allclose(video[:, 5, 5].numpy(), expected, atol=1e-5)


def test_lrs3_transcript_format(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("Text:  THE QUICK  FOX\nConf:  5\n\nWORD START END ASDSCORE\nTHE 0.1 0.2 3.1\n"
                    "QUICK 0.25 0.5 2.0\n")
    assert read_transcript(path) == "THE QUICK FOX"
    assert read_word_timings(path) == [("THE", 0.1, 0.2), ("QUICK", 0.25, 0.5)]
    path.write_text("  plain   words\n")
    assert read_transcript(path) == "plain words" and read_word_timings(path) == []
    path.write_text("Text: A\n\nWORD START END ASDSCORE\nA zero 0.2 1.0\n")
    with pytest.raises(AVSRDataError, match=r"t.txt: line 4: expected 'WORD START END"):
        read_word_timings(path)


@pytest.mark.parametrize("engine", ["tones", "espeak"])
def test_word_spans_cover_the_spoken_words(engine):
    """Words are rendered one by one: the loud audio lies inside the returned spans, the pauses are quiet."""
    audio, rate, spans = speak(["seven", "two", "lights"], FakeAVConfig(engine=engine), np.random.default_rng(3))
    assert [w for w, _, _ in spans] == ["seven", "two", "lights"]
    inside = np.zeros(len(audio), bool)
    for _, start, end in spans:
        assert 0 < start < end <= len(audio) / rate
        inside[int(start * rate): int(end * rate)] = True
    energy = audio.astype(np.float64) ** 2
    assert energy[~inside].sum() < 0.01 * energy[inside].sum()
    assert all(b[1] >= a[2] for a, b in zip(spans, spans[1:], strict=False))  # in order, not overlapping


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "u.wav").write_bytes(b""), r"u.wav: empty file"),
    (lambda f: (f / "u.wav").write_bytes(b"RIFF not a wave file at all"), r"u.wav: unreadable audio"),
    (lambda f: np.save(f / "u.npy", np.zeros((60, 32, 32), np.uint8)), r"u.npy: audio/video length mismatch"),
    (lambda f: np.save(f / "u.npy", np.zeros((0, 32, 32), np.uint8)), r"u.npy: empty video"),
    (lambda f: np.save(f / "u.npy", np.zeros((25, 32), np.uint8)), r"u.npy: frames must be"),
    (lambda f: (f / "u.npy").unlink(), r"u: missing video"),
    (lambda f: (f / "u.txt").write_text("  \n"), r"u.txt: empty transcript"),
    (lambda f: (f / "u.npy").write_bytes(b"garbage"), r"u.npy: unreadable frames"),
])
def test_bad_utterances_name_the_file_or_are_skipped(tmp_path, capsys, damage, message):
    folder = tmp_path / "train" / "spk0"
    write(folder, "u")
    write(folder, "v")
    damage(folder)
    with pytest.raises(AVSRDataError, match=message):
        AVSRDataset(config(tmp_path), "train")
    with pytest.raises(AVSRDataError, match="skipped 1 of 2 utterances.*more than data.max_skipped_fraction=0.1"):
        AVSRDataset(config(tmp_path, on_error="skip"), "train")
    capsys.readouterr()
    ds = AVSRDataset(config(tmp_path, on_error="skip", max_skipped_fraction=0.5), "train")
    assert [u.id for u in ds.utterances] == ["spk0/v"] and ds.skipped_count == 1
    (skipped,) = ds.skipped.values()
    assert skipped[0].endswith("spk0/u")
    (report,) = capsys.readouterr().err.splitlines()  # the skip is said, with the file and its reason
    assert "skipped 1 of 2 utterances (on_error: skip)" in report
    assert re.search(message, report), report


def test_mismatch_within_tolerance_passes_and_too_long_is_refused(tmp_path):
    write(tmp_path / "train" / "s", "u", seconds=1.0, frames=27)  # 80 ms off: within 0.12 s
    assert len(AVSRDataset(config(tmp_path), "train")) == 1
    with pytest.raises(AVSRDataError, match="u.wav: too long"):
        AVSRDataset(config(tmp_path, max_seconds=0.5), "train")
    with pytest.raises(AVSRDataError, match="no such split folder"):
        AVSRDataset(config(tmp_path), "test")


def test_mp4_without_a_reader_names_the_file_and_reader(tmp_path):
    folder = tmp_path / "train" / "s"
    write(folder, "u")
    (folder / "u.npy").unlink()
    (folder / "u.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    try:
        import av  # noqa: F401
    except ImportError:
        with pytest.raises(AVSRDataError, match=r"u.mp4: reading .mp4 needs the PyAV package \('av'\)"):
            AVSRDataset(config(tmp_path), "train")
    else:
        with pytest.raises(AVSRDataError, match=r"u.mp4: unreadable video"):
            AVSRDataset(config(tmp_path), "train")


def test_noise_has_the_asked_snr_and_is_fixed_per_utterance(tmp_path):
    clean = np.sin(np.linspace(0, 400, 32_000)).astype(np.float32)
    noisy = add_noise(clean, 5.0, np.random.default_rng(0))
    snr = 10 * np.log10(np.mean(clean**2) / np.mean((noisy - clean) ** 2))
    assert abs(snr - 5.0) < 0.2
    write(tmp_path / "train" / "s", "u")
    ds = AVSRDataset(config(tmp_path, snr_db=0.0), "train")
    first, again = ds[0]["audio"], ds[0]["audio"]
    assert torch.equal(first, again)
    clean_ds = AVSRDataset(config(tmp_path), "train")
    assert (first - clean_ds[0]["audio"]).abs().max() > 0.1


def test_tone_fake_set_and_mouth_follows_loudness(tmp_path):
    root = make_fake_avsr(tmp_path / "fake", FakeAVConfig(splits={"train": 4, "test": 2}, engine="tones"))
    ds = AVSRDataset(AVSRDataConfig(root=str(root), crop_size=32), "train")
    assert len(ds) == 4 and len(AVSRDataset(AVSRDataConfig(root=str(root), crop_size=32), "test")) == 2
    sample = ds[0]
    assert abs(len(sample["audio"]) / 16_000 - len(sample["video"]) / 25) < 0.05
    assert [w for w, _, _ in sample["words"]] == sample["text"].split()
    assert sample["text"] in COMMANDS or all(w in DIGITS for w in sample["text"].split())
    # Again with the same settings: nothing is rewritten.
    stamp = (root / "fake_av.json").stat().st_mtime_ns
    make_fake_avsr(root, FakeAVConfig(splits={"train": 4, "test": 2}, engine="tones"))
    assert (root / "fake_av.json").stat().st_mtime_ns == stamp
    audio, rate, _ = speak("one two three".split(), FakeAVConfig(engine="tones"), np.random.default_rng(0))
    opening = loudness_envelope(audio, rate, 40)
    frames = render_mouth(opening, 32, np.random.default_rng(0))
    dark = (frames < 60).sum(axis=(1, 2))
    assert np.corrcoef(opening, dark)[0, 1] > 0.8


def test_espeak_fake_set(tmp_path):
    """Needs espeak-ng (the Makefile installs it): real synthesised speech at 22,050 Hz, read at 16 kHz."""
    root = make_fake_avsr(tmp_path / "fake", FakeAVConfig(splits={"train": 3}, engine="espeak", seed=1))
    wav = next(root.rglob("*.wav"))
    assert soundfile.info(str(wav)).samplerate == 22_050
    ds = AVSRDataset(AVSRDataConfig(root=str(root), crop_size=24), "train")
    sample = ds[0]
    assert sample["video"].shape[1:] == (24, 24) and sample["audio"].abs().max() > 0.05
    assert abs(len(sample["audio"]) / 16_000 - len(sample["video"]) / 25) < 0.05


def test_generated_root_is_not_overwritten_when_foreign(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a generated set"):
        make_fake_avsr(tmp_path, FakeAVConfig(splits={"train": 1}, engine="tones"))


# ---------------------------------------------------------------------------- own data: one modality, mp4, manifests


def tone(seconds: float, rate: int = 16_000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)


def test_audio_only_and_video_only_need_no_dummy_files(tmp_path, capsys):
    folder = tmp_path / "train" / "s"
    folder.mkdir(parents=True)
    soundfile.write(str(folder / "a.wav"), tone(1.0), 16_000)
    (folder / "a.txt").write_text("one two")
    np.save(folder / "v.npy", np.full((25, 32, 32), 200, np.uint8))
    (folder / "v.txt").write_text("three")
    audio_only = AVSRDataset(config(tmp_path, on_error="skip", max_skipped_fraction=0.5), "train", need_video=False)
    assert [u.id for u in audio_only.utterances] == ["s/a"]  # v has no audio: counted and said
    assert "s/v: missing audio" in capsys.readouterr().err
    sample = audio_only[0]
    assert len(sample["audio"]) == 16_000 and sample["video"].shape == (0, 16, 16)
    video_only = AVSRDataset(config(tmp_path, on_error="skip", max_skipped_fraction=0.5), "train", need_audio=False)
    assert [u.id for u in video_only.utterances] == ["s/v"]
    assert video_only[0]["audio"].numel() == 0 and video_only[0]["video"].shape == (25, 16, 16)
    batch = collate_avsr([video_only[0]])
    assert batch["audio"].shape == (1, 0) and batch["video_lengths"].tolist() == [25]
    with pytest.raises(AVSRDataError, match=r"s/a: missing video"):
        AVSRDataset(config(tmp_path), "train", need_audio=False)


def test_lrs3_mp4_layout_reads_audio_from_the_video_file(tmp_path):
    from data.video import write_mp4

    folder = tmp_path / "test" / "spk"
    folder.mkdir(parents=True)
    frames = np.zeros((20, 32, 48), np.uint8)
    frames[:, 8:24, 16:32] = 220  # the mouth box
    write_mp4(folder / "00001.mp4", frames, 25, tone(0.8))
    (folder / "00001.txt").write_text("Text:  TURN LEFT\nConf:  4\n\nWORD START END ASDSCORE\nTURN 0.1 0.3 1.0\n"
                                      "LEFT 0.4 0.7 1.0\n")
    ds = AVSRDataset(config(tmp_path, mouth_box=[16, 8, 16, 16]), "test")
    sample = ds[0]
    assert sample["text"] == "TURN LEFT" and sample["words"][1] == ("LEFT", 0.4, 0.7)
    assert abs(len(sample["audio"]) - 0.8 * 16_000) < 2048 and float(sample["audio"].abs().max()) > 0.2
    assert sample["video"].shape == (20, 16, 16) and float(sample["video"].mean()) > 0.8  # only the bright box
    whole = AVSRDataset(config(tmp_path), "test")[0]["video"]
    assert float(whole.mean()) < 0.4
    with pytest.raises(AVSRDataError, match=r"00001.mp4: mouth box \[x=40, y=8, w=16, h=16\] is not inside"):
        AVSRDataset(config(tmp_path, mouth_box=[40, 8, 16, 16]), "test")


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_manifest_with_segments_and_crops(tmp_path, kind):
    import json

    from data.video import write_mp4

    media = tmp_path / "media"
    media.mkdir()
    soundfile.write(str(media / "talk.wav"), tone(2.0), 16_000)
    frames = (np.arange(50, dtype=np.uint8)[:, None, None] * 5).repeat(32, 1).repeat(32, 2)
    write_mp4(media / "talk.mp4", frames, 25)
    rows = [{"id": "first", "audio": "media/talk.wav", "video": "media/talk.mp4", "text": "one two", "end": 1.0},
            {"id": "second", "audio": "media/talk.wav", "video": "media/talk.mp4", "text": "three", "start": 1.0,
             "end": 1.6, "crop": [0, 0, 16, 16]}]
    manifest = tmp_path / f"train.{kind}"
    if kind == "jsonl":
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        manifest.write_text("id,audio,video,text,start,end,crop\nfirst,media/talk.wav,media/talk.mp4,one two,,1.0,\n"
                            "second,media/talk.wav,media/talk.mp4,three,1.0,1.6,0 0 16 16\n")
    ds = AVSRDataset(config(tmp_path, train_split=f"train.{kind}"), f"train.{kind}")
    assert [u.id for u in ds.utterances] == ["first", "second"]
    first, second = ds[0], ds[1]
    assert len(first["audio"]) == 16_000 and len(second["audio"]) == int(0.6 * 16_000)
    assert first["video"].shape[0] == 25 and second["video"].shape[0] == 15
    assert float(second["video"][0].mean()) == pytest.approx(25 * 5 / 255, abs=0.03)  # frame 25 onwards
    assert second["text"] == "three"


@pytest.mark.parametrize("line, message", [
    ('{"audio": "x.wav"}', r"train.jsonl: line 1: key 'text' expects a non-empty transcript"),
    ('{"text": "a"}', r"train.jsonl: line 1: give 'audio' or 'video'"),
    ('{"audio": "x.wav", "text": "a", "start": 2, "end": 1}', r"line 1: key 'end' \(1.0\) must be after 'start'"),
    ('{"audio": "x.wav", "text": "a", "crop": [1, 2]}', r"line 1: key 'crop' expects 4 integers"),
    ('{"audio": "x.wav", "text": "a", "speaker": 3}', r"line 1: unknown key\(s\) \['speaker'\]"),
    ('not json', r"train.jsonl: line 1: not JSON"),
])
def test_bad_manifest_rows_name_file_line_and_key(tmp_path, line, message):
    (tmp_path / "train.jsonl").write_text(line + "\n")
    with pytest.raises(AVSRDataError, match=message):
        AVSRDataset(config(tmp_path), "train.jsonl", need_video=False)


def test_manifest_file_errors_are_counted_when_skipping(tmp_path, capsys):
    soundfile.write(str(tmp_path / "ok.wav"), tone(0.5), 16_000)
    (tmp_path / "train.jsonl").write_text('{"audio": "ok.wav", "text": "one"}\n{"audio": "gone.wav", "text": "two"}\n')
    with pytest.raises(AVSRDataError, match=r"gone.wav: no such file \(listed at .*train.jsonl: line 2\)"):
        AVSRDataset(config(tmp_path), "train.jsonl", need_video=False)
    ds = AVSRDataset(config(tmp_path, on_error="skip", max_skipped_fraction=0.5), "train.jsonl", need_video=False)
    assert len(ds) == 1 and "skipped 1 of 2 utterances" in capsys.readouterr().err


def lrs3_words(folder, name, words, seconds):
    """A WAV of ``seconds`` and an LRS3 transcript whose words are (word, start, end)."""
    folder.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(folder / f"{name}.wav"), tone(seconds), 16_000)
    table = "".join(f"{w} {s} {e} 1.0\n" for w, s, e in words)
    (folder / f"{name}.txt").write_text(f"Text:  {' '.join(w for w, _, _ in words)}\n\nWORD START END ASDSCORE\n{table}")


def test_long_utterances_are_chunked_at_words_or_counted(tmp_path, capsys):
    folder = tmp_path / "train" / "s"
    words = [("ONE", 0.1, 0.6), ("TWO", 0.8, 1.4), ("THREE", 1.6, 2.2), ("FOUR", 2.5, 3.2), ("FIVE", 3.4, 3.9)]
    lrs3_words(folder, "long", words, 4.0)
    lrs3_words(folder, "short", [("SIX", 0.1, 0.5)], 1.0)
    soundfile.write(str(folder / "plain.wav"), tone(3.0), 16_000)
    (folder / "plain.txt").write_text("seven eight nine")  # too long and no word timings to cut at
    options = dict(max_seconds=1.5, max_skipped_fraction=0.0)
    ds = AVSRDataset(config(tmp_path, long_utterances="chunk", **options), "train", need_video=False)
    assert [u.id for u in ds.utterances] == ["s/long#0", "s/long#1", "s/long#2", "s/short"]
    assert [ds[i]["text"] for i in range(3)] == ["ONE TWO", "THREE", "FOUR FIVE"]
    assert [len(ds[i]["audio"]) for i in range(3)] == [int(1.5 * 16_000), int(0.9 * 16_000), int(1.5 * 16_000)]
    assert ds[1]["words"] == [("THREE", 0.0, pytest.approx(0.6))]
    report = capsys.readouterr().err
    assert "cut 1 utterances longer than data.max_seconds=1.5 into 3 pieces" in report
    assert re.search(r"left out 1 utterances longer than data.max_seconds=1.5 .*plain.wav: too long \(3.00 s > "
                     r"max_seconds 1.5\); no word timings to cut it at", report)
    skipping = AVSRDataset(config(tmp_path, long_utterances="skip", **options), "train", need_video=False)
    assert [u.id for u in skipping.utterances] == ["s/short"]
    assert "left out 2 utterances longer than data.max_seconds=1.5 (data.long_utterances: skip; 1 remain)" in \
        capsys.readouterr().err
    with pytest.raises(AVSRDataError, match=r"long.wav: too long"):
        AVSRDataset(config(tmp_path, **options), "train", need_video=False)


def test_chunking_needs_a_length():
    from mm.config import ConfigError

    with pytest.raises(ConfigError, match="'long_utterances' is 'chunk' but 'max_seconds' is 0"):
        AVSRDataConfig(root="x", long_utterances="chunk")
    with pytest.raises(ConfigError, match="'mouth_box' expects"):
        AVSRDataConfig(root="x", mouth_box=[0, 0, 0, 4])


def test_fake_set_in_lrs3_mp4_files(tmp_path):
    """video_format mp4: one .mp4 (frames + AAC audio) and one .txt per utterance, read like LRS3."""
    config = FakeAVConfig(splits={"train": 3}, engine="tones", video_format="mp4")
    root = make_fake_avsr(tmp_path / "fake", config)
    assert not list(root.rglob("*.wav")) and not list(root.rglob("*.npy")) and len(list(root.rglob("*.mp4"))) == 3
    npy_root = make_fake_avsr(tmp_path / "npy", FakeAVConfig(splits={"train": 3}, engine="tones"))
    mp4_set = AVSRDataset(AVSRDataConfig(root=str(root), crop_size=32), "train")
    npy_set = AVSRDataset(AVSRDataConfig(root=str(npy_root), crop_size=32), "train")
    for mine, reference in zip(mp4_set, npy_set, strict=True):
        assert mine["text"] == reference["text"] and mine["words"] == reference["words"]
        assert abs(len(mine["video"]) - len(reference["video"])) <= 1
        assert float((mine["video"][:5] - reference["video"][:5]).abs().mean()) < 0.05  # lossy, same mouths
        assert abs(len(mine["audio"]) - len(reference["audio"])) <= 2048  # AAC frames of 1024 samples
    from mm.config import ConfigError

    with pytest.raises(ConfigError, match="video_format mp4 needs an even crop_size"):
        FakeAVConfig(video_format="mp4", crop_size=33)
