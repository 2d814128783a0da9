"""encoders.clip: tiny open_clip models, local checkpoints by path, default targets on both towers, the
block-input taps and LadderCLIP (frozen tower, QLadder alone or with LoRA)."""

from __future__ import annotations

import pytest
import torch

import mm
from encoders.clip import (
    DEFAULT_TARGETS,
    CheckpointError,
    LadderCLIP,
    PretrainedUnavailableError,
    create_clip,
    load_clip_weights,
    save_clip_weights,
    tower_of,
    vision_block_inputs,
)
from mm.qladder import QLadderConfig

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def bundle():
    return create_clip("tiny-test", seed=0)


def test_tiny_clip_comes_with_tokenizer_preprocess_and_both_towers(bundle):
    from PIL import Image

    tokens = bundle.tokenizer(["a photo of a cat.", "a dog"])
    assert tokens.shape == (2, 16) and tokens.dtype == torch.long
    pixels = bundle.preprocess(Image.new("L", (50, 40), color=128))  # grayscale, any size -> RGB 32x32
    assert pixels.shape == (3, 32, 32)
    assert bundle.model.encode_image(pixels[None]).shape == (1, bundle.embed_dim)
    assert bundle.model.encode_text(tokens).shape == (2, bundle.embed_dim)
    assert bundle.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)


def test_default_targets_reach_qkv_of_both_towers(bundle):
    targets = mm.select_targets(bundle.model, mm.LoRAConfig(targets=DEFAULT_TARGETS))
    assert len(targets) == 12  # 2 towers x 2 blocks x q, k, v
    assert {tower_of(t) for t in targets} == {"vision", "text"}
    assert {t.rpartition(".")[2] for t in targets} == {"q_proj", "k_proj", "v_proj"}


def test_seed_makes_random_init_reproducible():
    a, b = create_clip("tiny-test", seed=3), create_clip("tiny-test", seed=3)
    torch.testing.assert_close(a.model.encode_image(IMAGES), b.model.encode_image(IMAGES))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_checkpoint_loads_back_by_path(bundle, tmp_path, suffix):
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        save_clip_weights(bundle.model, path, {"note": "test"})
    else:  # open_clip's own torch format, read with weights_only=True
        torch.save({"state_dict": bundle.model.state_dict()}, path)
    loaded = create_clip("tiny-test", str(path))
    assert loaded.pretrained == str(path)
    tokens = bundle.tokenizer(["a photo of a cat."])
    torch.testing.assert_close(loaded.model.encode_image(IMAGES), bundle.model.encode_image(IMAGES))
    torch.testing.assert_close(loaded.model.encode_text(tokens), bundle.model.encode_text(tokens))
    # a folder holding one checkpoint works too
    torch.testing.assert_close(create_clip("tiny-test", str(tmp_path)).model.encode_image(IMAGES),
                               bundle.model.encode_image(IMAGES))


def test_checkpoint_errors_name_the_file(bundle, tmp_path):
    with pytest.raises(CheckpointError, match="nowhere.safetensors: no such checkpoint"):
        create_clip("tiny-test", str(tmp_path / "nowhere.safetensors"))
    other = save_clip_weights(create_clip("tiny-digits", seed=0).model, tmp_path / "digits.safetensors")
    with pytest.raises(CheckpointError, match="digits.safetensors: cannot load into CLIP"):
        load_clip_weights(bundle.model, other)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        create_clip("tiny-test", str(garbage))


def test_names_and_tags_are_checked_before_any_download():
    with pytest.raises(KeyError, match="unknown CLIP model 'ViT-B-33'.*'ViT-B-32'"):
        create_clip("ViT-B-33")
    with pytest.raises(PretrainedUnavailableError, match="tiny random config"):
        create_clip("tiny-test", "openai")
    with pytest.raises(KeyError, match="unknown pretrained tag 'opneai'.*openai"):
        create_clip("ViT-B-32", "opneai")


def test_block_input_taps_are_the_inputs_of_every_vision_block(bundle):
    visual = bundle.model.visual
    with torch.no_grad(), vision_block_inputs(bundle.model) as captured:
        bundle.model.encode_image(IMAGES)
        expected, x = [], visual._embeds(IMAGES)
        for block in visual.transformer.resblocks:
            expected.append(x)
            x = block(x)
    assert len(captured) == 2 * len(expected)  # the manual pass above ran inside the taps too
    for got, want in zip(captured, expected, strict=False):
        torch.testing.assert_close(got, want)
    assert not visual.transformer.resblocks[0]._forward_pre_hooks  # hooks removed on exit


def test_ladder_clip_starts_at_the_frozen_model_and_trains_only_the_ladder(bundle):
    torch.manual_seed(0)
    model = LadderCLIP.build(bundle.model, QLadderConfig(num_queries=4))
    bundle.model.requires_grad_(False)
    frozen = bundle.model.encode_image(IMAGES)
    torch.testing.assert_close(model.encode_image(IMAGES), frozen, rtol=0, atol=0)
    with torch.no_grad():
        model.ladder.gate.fill_(0.5)
    model.encode_image(IMAGES).pow(2).sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(n.startswith("ladder.") for n in trained)
    assert "ladder.queries" in trained and "ladder.ladder.1.to_q.weight" in trained
    assert (model.encode_image(IMAGES) - frozen).abs().max() > 1e-3
    bundle.model.requires_grad_(True)


def test_ladder_with_lora_trains_both_and_reads_the_adapted_tower():
    clip = create_clip("tiny-test", seed=1).model
    mm.attach(clip, mm.LoRAConfig(targets=DEFAULT_TARGETS, r=2))
    model = LadderCLIP.build(clip, QLadderConfig(num_queries=4, layers=[1]))
    with torch.no_grad():
        model.ladder.gate.fill_(1.0)
        for _, layer in mm.adapted_layers(clip):
            layer.adapters["default"].lora_B.normal_()
    model.encode_image(IMAGES).sum().backward()
    grads = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {"clip", "ladder"}
    assert all("lora_" in n for n, p in clip.named_parameters() if p.grad is not None)
    with mm.disable_adapters(clip):  # the ladder sees the LoRA-adapted blocks
        without_lora = model.encode_image(IMAGES)
    assert (model.encode_image(IMAGES) - without_lora).abs().max() > 1e-3


def test_ladder_must_fit_the_tower(bundle):
    from mm.qladder import QLadder

    with pytest.raises(ValueError, match="depth 3, width 32; the vision tower has depth 2"):
        LadderCLIP(bundle.model, QLadder(QLadderConfig(), width=32, depth=3, heads=2))


@pytest.mark.slow
def test_registered_open_clip_architecture_builds_offline():
    big = create_clip("ViT-B-32")
    assert big.embed_dim == 512 and big.tokenizer(["a cat"]).shape == (1, 77)
    assert len(mm.select_targets(big.model, mm.LoRAConfig(targets=DEFAULT_TARGETS))) == 2 * 12 * 3
