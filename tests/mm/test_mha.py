"""SplitMultiheadAttention computes exactly what nn.MultiheadAttention does, for every call signature."""

from __future__ import annotations

import pytest
import torch
from contract_cases import perturb
from torch import nn

import mm
from mm.mha import SplitMultiheadAttention, UnsupportedModuleError


def _pair(batch_first: bool, kdim: int | None = None, vdim: int | None = None):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=vdim).eval()
    with torch.no_grad():  # non-zero biases so a bias slicing mistake shows
        for name, param in mha.named_parameters():
            if "bias" in name:
                param.normal_()
    return mha, SplitMultiheadAttention(mha).eval()


def _inputs(batch_first: bool, n=3, length=5, src=6, kdim=16, vdim=16):
    gen = torch.Generator().manual_seed(1)
    shape = (lambda s, d: (n, s, d)) if batch_first else (lambda s, d: (s, n, d))
    return (torch.randn(shape(length, 16), generator=gen), torch.randn(shape(src, kdim), generator=gen),
            torch.randn(shape(src, vdim), generator=gen))


MASKS = {
    "none": lambda n, length, src: {},
    "bool_2d": lambda n, length, src: {"attn_mask": torch.rand(length, src) > 0.7},
    "float_3d": lambda n, length, src: {"attn_mask": torch.randn(n * 4, length, src)},
    "padding": lambda n, length, src: {"key_padding_mask": torch.arange(src).expand(n, src) >= src - 2},
    "both": lambda n, length, src: {"attn_mask": torch.randn(length, src),
                                    "key_padding_mask": torch.arange(src).expand(n, src) >= src - 1},
}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", sorted(MASKS))
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
def test_split_attention_matches_torch(batch_first, mask, need_weights, average):
    mha, split = _pair(batch_first)
    q, k, v = _inputs(batch_first)
    torch.manual_seed(2)
    kwargs = MASKS[mask](3, 5, 6)
    kwargs.update(need_weights=need_weights, average_attn_weights=average)
    expected, expected_w = mha(q, k, v, **kwargs)
    got, got_w = split(q, k, v, **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if need_weights:
        torch.testing.assert_close(got_w, expected_w, rtol=1e-5, atol=1e-6)
    else:
        assert got_w is None


def test_separate_kdim_vdim_and_unbatched_inputs():
    mha, split = _pair(True, kdim=8, vdim=12)
    q, k, v = _inputs(True, kdim=8, vdim=12)
    torch.testing.assert_close(split(q, k, v)[0], mha(q, k, v)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split(q[0], k[0], v[0])[0], mha(q[0], k[0], v[0])[0], rtol=1e-5, atol=1e-5)


def test_split_shares_storage_and_round_trips_to_torch_module():
    mha, split = _pair(True)
    assert split.q_proj.weight.data_ptr() == mha.in_proj_weight.data_ptr()  # no copy of the weights
    torch.testing.assert_close(split.in_proj_weight, mha.in_proj_weight)
    back = split.to_mha().eval()
    q, k, v = _inputs(True)
    torch.testing.assert_close(back(q, k, v)[0], mha(q, k, v)[0])


def test_unsupported_attention_options_are_named():
    model = nn.Sequential()
    model.add_module("attn", nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(UnsupportedModuleError, match="attn: add_bias_kv"):
        mm.attach(model, mm.LoRAConfig(targets=["q_proj"]))


def test_is_causal_without_mask_is_refused_like_torch():
    _, split = _pair(True)
    q, k, v = _inputs(True)
    with pytest.raises(RuntimeError, match="is_causal"):
        split(q, k, v, is_causal=True)


def _tiny_clip():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32, vision_cfg={"layers": 2, "width": 32, "patch_size": 8, "image_size": 32, "head_width": 16},
        text_cfg={"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 2},
    )
    return model.eval()


def test_lora_on_open_clip_towers_reaches_packed_qkv():
    model = _tiny_clip()
    image, text = torch.randn(2, 3, 32, 32), torch.randint(0, 100, (2, 16))
    base_image, base_text = model.encode_image(image), model.encode_text(text)
    mm.attach(model, mm.LoRAConfig(targets=["q_proj", "k_proj", "v_proj"], r=4))
    assert len(list(mm.adapted_layers(model))) == 12  # 2 towers x 2 blocks x q, k, v
    torch.testing.assert_close(model.encode_image(image), base_image)
    perturb(model)
    adapted_image, adapted_text = model.encode_image(image), model.encode_text(text)
    assert (adapted_image - base_image).abs().max() > 1e-3
    assert (adapted_text - base_text).abs().max() > 1e-3
    mm.merge(model, unload=True)
    assert all(type(m) is not SplitMultiheadAttention for m in model.modules())
    torch.testing.assert_close(model.encode_image(image), adapted_image, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.encode_text(text), adapted_text, rtol=1e-5, atol=1e-5)


def _vit():
    from toys import TinyViT

    torch.manual_seed(0)
    return TinyViT().eval()


def _perturbed_output(targets: list[str], **options) -> tuple[torch.Tensor, list[str], dict]:
    model = _vit()
    mm.attach(model, mm.LoRAConfig(targets=targets, r=4, **options))
    perturb(model, seed=3)
    names = [name for name, _ in mm.adapted_layers(model)]
    state = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    return model(torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))), names, state


def test_target_naming_the_attention_module_adapts_its_four_views():
    got, names, state = _perturbed_output(["attn"])
    want, want_names, want_state = _perturbed_output(["q_proj", "k_proj", "v_proj", "out_proj"])
    assert names == want_names and len(names) == 8  # 2 blocks x q, k, v, out
    assert state.keys() == want_state.keys()
    for key in state:
        torch.testing.assert_close(state[key], want_state[key])
    torch.testing.assert_close(got, want)
    base = _vit()(torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4)))
    assert (got - base).abs().max() > 1e-4  # the adapters did change the output


def test_attention_target_by_regex_layer_index_and_exclusion():
    _, names, _ = _perturbed_output([], target_regex=r"blocks\.\d\.attn")
    assert len(names) == 8
    _, names, _ = _perturbed_output(["attn"], exclude=["blocks.0.attn"])
    assert names == [f"blocks.1.attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
    _, names, _ = _perturbed_output(["attn"], layers=[0])
    assert names == [f"blocks.0.attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")]


def test_attention_target_reaches_an_already_split_module():
    model = _vit()
    mm.attach(model, mm.LoRAConfig(targets=["mlp.c_fc", "blocks.0.attn.q_proj"], r=2), name="first")
    mm.attach(model, mm.LoRAConfig(targets=["attn"], r=2), name="second")
    second = [name for name, layer in mm.adapted_layers(model) if "second" in layer.adapters]
    assert second == [f"blocks.{i}.attn.{p}" for i in (0, 1) for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
    assert list(model.blocks[0].attn.q_proj.adapters) == ["first", "second"]


def test_attention_target_on_open_clip_blocks():
    model = _tiny_clip()
    mm.attach(model, mm.LoRAConfig(targets=["attn"], r=4))
    assert len(list(mm.adapted_layers(model))) == 16  # 2 towers x 2 blocks x q, k, v, out
