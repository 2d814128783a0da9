"""The README's demo: its contrastive loss, and the whole run (pretrain, cache, few-shot table) shortened."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from train.tasks.demo import DemoSettings, multi_positive_clip_loss, run_demo


def test_multi_positive_loss_is_the_clip_loss_when_every_class_appears_once():
    gen = torch.Generator().manual_seed(0)
    images, texts = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    labels = torch.arange(4)
    logits = 10.0 * F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).t()
    clip = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    torch.testing.assert_close(multi_positive_clip_loss(images, texts, labels, labels, torch.tensor(10.0)), clip)


def test_multi_positive_loss_rewards_matching_any_caption_of_the_class():
    captions = torch.eye(4)  # classes 0, 0, 1, 1: two captions each
    caption_labels = torch.tensor([0, 0, 1, 1])
    aligned = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    swapped = aligned.flip(0)
    image_labels, scale = torch.tensor([0, 1]), torch.tensor(10.0)
    good = multi_positive_clip_loss(aligned, captions, image_labels, caption_labels, scale)
    assert good < multi_positive_clip_loss(swapped, captions, image_labels, caption_labels, scale)
    # captions of a class absent from the batch have no positive and do not turn the loss into nan
    assert torch.isfinite(multi_positive_clip_loss(aligned[:1], captions, image_labels[:1], caption_labels, scale))


@pytest.mark.slow
def test_demo_pretrains_caches_and_prints_the_few_shot_table(tmp_path):
    lines: list[str] = []
    settings = DemoSettings(cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "out"), pretrain_epochs=12,
                            shots=[4], seeds=[1], progress=False)
    results = run_demo(settings, log=lines.append)
    assert results["classes"] == ["five", "six", "seven", "eight", "nine"]
    assert results["base_zero_shot"] > 0.6  # pretraining worked on the classes it saw
    by_method = {r["method"]: r for r in results["records"]}
    assert set(by_method) == {"zero-shot", "linear-probe", "lora", "block_lora", "qladder"}
    assert by_method["lora"]["accuracy"] > by_method["zero-shot"]["accuracy"]
    assert by_method["block_lora"]["trainable_params"] < by_method["lora"]["trainable_params"]
    assert "\n| lora | " in "\n".join(lines)
    assert json.loads((tmp_path / "out" / "fewshot_results.json").read_text())["classes"] == results["classes"]
    assert list((tmp_path / "cache").glob("*.safetensors"))

    again: list[str] = []
    run_demo(DemoSettings(**{**settings.__dict__, "methods": ["zero-shot"]}), log=again.append)
    assert any("using the cached pretrained" in line for line in again)
