"""The CLIP prototype head: prompt ensembling and scaled-cosine logits (hand-computed and against open_clip's
own zero-shot classifier), cached prototypes for a frozen text side, gradients for an adapted one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from heads.clip_prototype import (
    ClipPrototypeHead,
    class_prompts,
    prototype_logits,
    prototypes_from_text_features,
)


def test_prompts_are_class_major_with_readable_names():
    prompts = class_prompts(["sea_lion", "cat"], ["a photo of a {}.", "art of a {}"])
    assert prompts == ["a photo of a sea lion.", "art of a sea lion", "a photo of a cat.", "art of a cat"]
    with pytest.raises(ValueError, match="exactly one '\\{\\}'"):
        class_prompts(["cat"], ["a photo"])
    with pytest.raises(ValueError, match="no class names"):
        class_prompts([], ["{}"])


def test_prototypes_average_unit_text_features_per_class_then_renormalise():
    features = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, -2.0], [-1.0, -1.0]])  # 2 classes x 2 templates
    expected = torch.stack([torch.tensor([0.5, 0.5]), torch.tensor([-0.5 / 2**0.5, -0.5 - 0.5 / 2**0.5])])
    torch.testing.assert_close(prototypes_from_text_features(features, 2), F.normalize(expected, dim=-1))
    with pytest.raises(ValueError, match="do not split into 3 classes"):
        prototypes_from_text_features(features, 3)


def test_logits_are_scaled_cosine_similarities():
    images, protos = torch.tensor([[2.0, 0.0], [1.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    logits = prototype_logits(images, protos, logit_scale=10.0)
    torch.testing.assert_close(logits, torch.tensor([[10.0, 0.0], [10 / 2**0.5, 10 / 2**0.5]]))


class CountingText(torch.nn.Module):
    """A text encoder stand-in: token ids -> features through a trainable table; counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(50, 4)
        self.calls = 0

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.table(tokens).mean(dim=1)


def _tokenizer(texts):
    return torch.tensor([[sum(map(ord, t)) % 50, len(t) % 50] for t in texts])


def test_frozen_text_side_encodes_prompts_once():
    text = CountingText()
    head = ClipPrototypeHead(["cat", "dog", "bird"], _tokenizer, text, logit_scale=100.0,
                             templates=["a {}", "the {}"])
    assert head.tokens.shape == (6, 2)
    images = torch.randn(5, 4)
    first = head(images)
    head(images)
    with torch.no_grad():
        head(images)
    assert text.calls == 1 and first.shape == (5, 3)
    head.refresh()
    head(images)
    assert text.calls == 2


def test_adapted_text_side_gets_gradients_and_fresh_prototypes():
    text = CountingText()
    head = ClipPrototypeHead(["cat", "dog"], _tokenizer, text, logit_scale=10.0, adapt_text=True)
    loss = F.cross_entropy(head(torch.randn(4, 4)), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    assert text.table.weight.grad is not None and text.table.weight.grad.abs().sum() > 0
    with torch.no_grad():
        text.table.weight.add_(1.0)
        before = text.calls
        head(torch.randn(2, 4))
        head(torch.randn(2, 4))
    assert text.calls == before + 1  # evaluation computes the changed prototypes once, then caches them


def test_zero_shot_head_matches_open_clips_classifier():
    open_clip = pytest.importorskip("open_clip")
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16, vision_cfg={"layers": 1, "width": 16, "patch_size": 8, "image_size": 16, "head_width": 8},
        text_cfg={"context_length": 12, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    ).eval()
    tokenizer = open_clip.SimpleTokenizer(context_length=12)
    classes, templates = ["cat", "dog", "sea lion"], ["a photo of a {}.", "a drawing of a {}."]
    head = ClipPrototypeHead(classes, tokenizer, model.encode_text, model.logit_scale.exp().item(), templates)
    reference = build_zero_shot_classifier(model, tokenizer, classes, templates)  # (dim, classes)
    torch.testing.assert_close(head.prototypes(), reference.t(), rtol=1e-5, atol=1e-6)
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        features = model.encode_image(images, normalize=True)
        expected = model.logit_scale.exp() * features @ reference
        torch.testing.assert_close(head(model.encode_image(images)), expected, rtol=1e-5, atol=1e-5)
