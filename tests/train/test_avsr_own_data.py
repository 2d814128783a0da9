"""AVSR on a user's own files: a jsonl manifest of WAVs (no video) trained with ``mmtune train`` and evaluated
with ``mmtune eval --transcripts``; an LRS3-style folder of .mp4 files (audio from their track) for
video-only and audio-visual models; the audio encoder's window bounds the utterances."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile
import torch
import yaml

import mm
from train.engine.config import recipe_from_dict
from train.engine.task import get_task
from train.tasks.metrics_text import utterance_wer

WORDS = ["left", "right", "up", "down"]


def tone(seconds: float, pitch: float) -> np.ndarray:
    t = np.arange(int(seconds * 16_000)) / 16_000
    return (0.3 * np.sin(2 * np.pi * pitch * t)).astype(np.float32)


def write_manifest(root, split: str, count: int, seconds: float = 0.6) -> str:
    rows = []
    for i in range(count):
        name = f"{split}_{i}.wav"
        soundfile.write(str(root / name), tone(seconds, 200 + 50 * (i % 4)), 16_000)
        rows.append({"id": f"{split}{i}", "audio": name, "text": f"go {WORDS[i % 4]}"})
    (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"{split}.jsonl"


def recipe(root, out_dir, audio_rates=(4,), video_rates=(), **data) -> dict:
    pairs = [f"a{a}" for a in audio_rates] if not video_rates else [
        f"a{a}_v{v}" for a in audio_rates for v in video_rates] if audio_rates else [f"v{v}" for v in video_rates]
    return {
        "task": "avsr", "seed": 0,
        "model": {"audio": {"window_seconds": 1.0, "d_model": 32, "layers": 1, "ffn_dim": 64, "init_std": 0.3},
                  "video": {"stem_channels": 4, "widths": [4, 8, 8, 8], "blocks": [1, 1, 1, 1]},
                  "llm": {"hidden_size": 32, "intermediate_size": 64, "layers": 1}, "projector_hidden": 32,
                  "audio_rates": list(audio_rates), "video_rates": list(video_rates), "max_new_tokens": 4},
        "data": {"root": str(root), "crop_size": 16, **data},
        "adapters": {"mtsk": {"method": "mtsk", "strategy": "mss", "targets": ["q_proj", "v_proj"], "r": 4,
                              "scales": pairs}},
        "train": {"batch_size": 2, "max_steps": 2, "progress": False, "out_dir": str(out_dir)},
    }


def test_transcripts_of_an_evaluation_are_written_per_utterance(tmp_path):
    from train.commands.eval import write_transcripts
    from train.engine.loop import eval_batches

    data = tmp_path / "mine"
    data.mkdir()
    raw = recipe(data, tmp_path / "run", audio_rates=(4, 16), train_split=write_manifest(data, "train", 4),
                 eval_split=write_manifest(data, "test", 3))
    torch.manual_seed(0)
    task = get_task("avsr")(recipe_from_dict(raw, name="t", source="test"))
    metrics = task.evaluate(eval_batches(task.eval_dataset(), task.collate, 2, "cpu"))
    rows = task.transcripts
    assert [(r["pair"], r["id"]) for r in rows] == [(p, f"test{i}") for p in ("a4", "a16") for i in range(3)]
    for pair in ("a4", "a16"):
        mine = [r for r in rows if r["pair"] == pair]
        errors = sum(r["wer"] * len(r["reference"].split()) for r in mine)
        assert errors / 6 == pytest.approx(metrics[f"wer_{pair}"])  # per-utterance WERs add up to the corpus WER
    out = write_transcripts(tmp_path / "t.jsonl", rows) or tmp_path / "t.jsonl"
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows


@pytest.mark.slow
def test_train_and_eval_with_transcripts_on_a_wav_manifest(tmp_path, capsys):
    from train.cli import main

    data = tmp_path / "mine"
    data.mkdir()
    raw = recipe(data, tmp_path / "run", train_split=write_manifest(data, "train", 4),
                 eval_split=write_manifest(data, "test", 3))
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(path)]) == 0
    capsys.readouterr()
    out = tmp_path / "eval" / "transcripts.jsonl"
    assert main(["eval", "--config", str(path), "--transcripts", str(out)]) == 0
    assert "| a4 |" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["test0", "test1", "test2"]
    assert {r["pair"] for r in rows} == {"a4"} and {r["condition"] for r in rows} == {"clean"}
    assert [r["reference"] for r in rows] == ["go left", "go right", "go up"]
    for row in rows:
        assert row["wer"] == pytest.approx(utterance_wer(row["reference"], row["hypothesis"]))
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp file left behind


def test_lrs3_mp4_folder_for_video_only_and_audio_visual_models(tmp_path):
    from data.video import write_mp4

    for i in range(3):
        folder = tmp_path / "train" / f"spk{i}"
        folder.mkdir(parents=True)
        frames = np.full((15, 32, 32), 40 * i, np.uint8)
        write_mp4(folder / "00001.mp4", frames, 25, tone(0.6, 300))
        (folder / "00001.txt").write_text(f"Text:  GO {WORDS[i].upper()}\n")
    for rates in ({"audio_rates": (), "video_rates": (2,)}, {"audio_rates": (4,), "video_rates": (2,)}):
        raw = recipe(tmp_path, tmp_path / "run", **rates)
        torch.manual_seed(0)
        task = get_task("avsr")(recipe_from_dict(raw, name="t", source="test"))
        batch = task.collate([task.train_dataset()[i] for i in range(2)])
        assert batch["video"].shape == (2, 15, 16, 16)
        assert (batch["audio"].shape[1] > 8_000) == bool(rates["audio_rates"])  # the mp4's audio track
        loss, _ = task.training_step(batch)
        assert torch.isfinite(loss)


def test_the_audio_window_bounds_utterances(tmp_path, capsys):
    data = tmp_path / "mine"
    data.mkdir()
    split = write_manifest(data, "train", 4)
    soundfile.write(str(data / "long.wav"), tone(1.5, 300), 16_000)
    with (data / split).open("a") as handle:
        handle.write(json.dumps({"id": "long", "audio": "long.wav", "text": "go far"}) + "\n")
    raw = recipe(data, tmp_path / "run", train_split=split, long_utterances="skip")
    task = get_task("avsr")(recipe_from_dict(raw, name="t", source="test"))
    assert len(task.train_dataset()) == 4  # the 1.5 s clip does not fit the 1 s window: counted and said
    assert "left out 1 utterances longer than data.max_seconds=1" in capsys.readouterr().err
    raw["data"]["max_seconds"] = 2.0
    with pytest.raises(mm.ConfigError, match=r"data.max_seconds=2 is longer than .*window_seconds=1"):
        get_task("avsr")(recipe_from_dict(raw, name="t", source="test"))
