"""MM-LoRA: vision tokens get only the vision LoRA's update, text tokens only the language LoRA's."""

from __future__ import annotations

import pytest
import torch
from contract_cases import perturb
from torch import nn
from toys import tiny_llama

import mm
from mm.adapters.mm_lora import MMLoRAConfig
from mm.route import route


def adapted_linear(**options) -> tuple[nn.Module, mm.AdaptedLinear]:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(12, 10))
    mm.attach(model, MMLoRAConfig(targets=["proj"], **options))
    perturb(model, seed=3)
    return model, model.proj


def lora_update(lora, x: torch.Tensor) -> torch.Tensor:
    """(alpha / r) B A x written out, independent of the adapter's own code paths."""
    return lora.scaling * (x @ lora.lora_A.T @ lora.lora_B.T)


def test_each_token_gets_only_its_modality_update():
    model, layer = adapted_linear(r=4, alpha=8.0, vision_r=2, vision_alpha=6.0)
    adapter = layer.adapters["default"]
    x = torch.randn(3, 7, 12)
    mask = torch.rand(3, 7) < 0.4
    mask[0, 0], mask[0, 1] = True, False  # both modalities present
    with route(token_masks={"vision": mask}):
        out = model(x)
    base = layer.base(x)
    expected = torch.where(mask[..., None], base + lora_update(adapter.vision, x),
                           base + lora_update(adapter.language, x))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # ... and the other branch's update is really absent, not just small:
    assert (lora_update(adapter.language, x)[mask].abs().max() > 1e-3)
    assert (lora_update(adapter.vision, x)[~mask].abs().max() > 1e-3)
    with route(token_masks={"vision": mask}):
        torch.testing.assert_close(adapter.delta(x, layer.base), out - base, rtol=1e-5, atol=1e-6)


def test_gradients_stay_in_their_modality():
    model, layer = adapted_linear(r=4)
    adapter = layer.adapters["default"]
    x = torch.randn(2, 5, 12)
    mask = torch.tensor([[True, True, False, False, False], [False, True, False, True, False]])
    with route(token_masks={"vision": mask}):
        out = model(x)
    out[mask].pow(2).sum().backward()  # a loss on vision positions only
    assert adapter.vision.lora_B.grad.abs().sum() > 0 and adapter.vision.lora_A.grad.abs().sum() > 0
    assert adapter.language.lora_B.grad.abs().sum() == 0 and adapter.language.lora_A.grad.abs().sum() == 0


def test_branches_have_their_own_ranks_and_parameters():
    _, layer = adapted_linear(r=8, vision_r=2, language_r=6, alpha=4.0)
    adapter = layer.adapters["default"]
    assert adapter.vision.lora_A.shape == (2, 12) and adapter.vision.lora_B.shape == (10, 2)
    assert adapter.language.lora_A.shape == (6, 12) and adapter.language.lora_B.shape == (10, 6)
    assert adapter.vision.scaling == 2.0 and adapter.language.scaling == pytest.approx(4 / 6)
    trainable = sum(p.numel() for p in adapter.parameters() if p.requires_grad)
    assert trainable == (2 + 6) * (12 + 10)
    ids = {id(p) for p in adapter.vision.parameters()} & {id(p) for p in adapter.language.parameters()}
    assert not ids


def test_all_vision_or_all_language_equals_a_plain_lora_with_those_weights():
    """On a whole Llama: an all-True mask is the vision LoRA alone, all-False the language LoRA alone."""
    targets = ["q_proj", "v_proj", "down_proj"]
    model = tiny_llama()
    mm.attach(model, MMLoRAConfig(targets=targets, r=4, alpha=8.0))
    perturb(model, seed=5)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    for modality, fill in (("vision", True), ("language", False)):
        plain = tiny_llama()
        mm.attach(plain, mm.LoRAConfig(targets=targets, r=4, alpha=8.0))
        with torch.no_grad():
            for name, layer in mm.adapted_layers(plain):
                source = getattr(model.get_submodule(name).adapters["default"], modality)
                layer.adapters["default"].load_state_dict(source.state_dict())
        with route(token_masks={"vision": torch.full((2, 6), fill)}):
            routed = model(ids).logits
        torch.testing.assert_close(routed, plain(ids).logits, rtol=1e-5, atol=1e-5)
    mixed = torch.tensor([[True, True, True, False, False, False]] * 2)
    with route(token_masks={"vision": mixed}):
        split = model(ids).logits
    with route(token_masks={"vision": torch.zeros(2, 6, dtype=torch.bool)}):
        text_only = model(ids).logits
    # Causal attention: the first token sees only itself, so it differs (vision update); all later
    # tokens see the vision tokens before them, so they differ too.
    assert (split - text_only).abs().amax(-1).min() > 1e-4


def test_unrouted_policies():
    x = torch.randn(4, 12)
    for policy in ("language", "both"):
        model, layer = adapted_linear(r=4, unrouted=policy)
        adapter = layer.adapters["default"]
        expected = layer.base(x) + lora_update(adapter.language, x)
        if policy == "both":
            expected = expected + lora_update(adapter.vision, x)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    model, _ = adapted_linear(r=4, unrouted="error")
    with pytest.raises(RuntimeError, match=r"no route for this forward.*mm.route\(token_masks="):
        model(x)


def test_bad_masks_are_clear_errors():
    model, _ = adapted_linear(r=4)
    x = torch.randn(2, 3, 12)
    with pytest.raises(KeyError, match=r"no token mask 'vision' \(it has \['image'\]\).*\(2, 3\)"), \
            route(token_masks={"image": torch.ones(2, 3, dtype=torch.bool)}):
        model(x)
    with pytest.raises(KeyError, match="no token mask 'vision'"), route(scale="a4"):
        model(x)
    with pytest.raises(ValueError, match=r"has shape \(2, 4\), the layer input has leading shape \(2, 3\)"), \
            route(token_masks={"vision": torch.ones(2, 4, dtype=torch.bool)}):
        model(x)
    with pytest.raises(TypeError, match="must be a bool tensor"), route(token_masks={"vision": torch.ones(2, 3)}):
        model(x)


def test_custom_mask_key_and_config_checks():
    model, layer = adapted_linear(r=4, mask_key="image")
    x = torch.randn(1, 2, 12)
    with route(token_masks={"image": torch.tensor([[True, False]])}):
        out = model(x)
    adapter = layer.adapters["default"]
    torch.testing.assert_close(out[0, 0], layer.base(x)[0, 0] + lora_update(adapter.vision, x)[0, 0])
    with pytest.raises(mm.ConfigError, match="'vision_r' must be >= 1"):
        MMLoRAConfig(targets=["proj"], vision_r=0)
    with pytest.raises(mm.ConfigError, match="'unrouted'"):
        MMLoRAConfig(targets=["proj"], unrouted="vision")
    with pytest.raises(mm.NotMergeableError):
        mm.merge(model)
