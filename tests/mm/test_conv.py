"""LoRA on convolutions: the update is the layer's own (grouped) kernel, never larger than the layer, and
conv targets are reached only on purpose. The shared contract runs on the conv toys in test_contract.py."""

from __future__ import annotations

import pytest
import torch
from contract_cases import perturb
from torch import nn
from toys import CONV_TOYS, TOYS, TinyConvNet

import mm
from mm.conv import conv_lora_parameters, largest_fitting_rank
from mm.layer import AdaptedConv

GEOMETRIES = {
    "conv1d-stride-dilation": (nn.Conv1d(6, 8, 3, stride=2, padding=2, dilation=2), (2, 6, 17)),
    "conv1d-circular": (nn.Conv1d(6, 8, 5, padding=2, padding_mode="circular"), (2, 6, 11)),
    "conv2d-reflect": (nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect"), (2, 4, 7, 9)),
    "conv2d-same": (nn.Conv2d(4, 8, (3, 4), padding="same", dilation=(1, 2)), (2, 4, 8, 8)),
    "conv2d-1x1": (nn.Conv2d(8, 12, 1, bias=False), (2, 8, 5, 5)),
    "conv2d-groups2": (nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=2), (2, 8, 9, 9)),
    "conv2d-depthwise-x4": (nn.Conv2d(4, 16, 3, padding=1, groups=4, padding_mode="replicate"), (2, 4, 6, 6)),
    "conv3d-groups2": (nn.Conv3d(4, 8, (3, 3, 3), stride=(1, 2, 2), padding=1, groups=2), (2, 4, 4, 6, 6)),
}


def adapted(conv: nn.Module, r: int = 4, **options) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(conv).eval()
    mm.attach(model, mm.LoRAConfig(targets=["0"], r=r, alpha=2.0 * r, **options))
    perturb(model, scale=0.3)
    return model


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_update_is_the_layers_kernel_and_merges_exactly(geometry):
    conv, shape = GEOMETRIES[geometry]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    reference = conv(x).detach()
    model = adapted(conv)
    layer = model[0]
    assert isinstance(layer, AdaptedConv)
    delta = layer.adapters["default"].delta_weight(layer.base)
    assert delta.shape == layer.base.weight.shape
    unmerged = model(x)
    # The adapter's update is exactly the conv of its kernel delta with the layer's own geometry.
    torch.testing.assert_close(unmerged - reference, layer.base._conv_forward(x, delta, None), rtol=1e-4, atol=1e-5)
    assert (unmerged - reference).abs().max() > 1e-2
    mm.merge(model)
    torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-5)
    mm.unmerge(model)
    torch.testing.assert_close(model[0].base(x), reference, rtol=1e-5, atol=1e-5)


def test_group_sees_only_its_own_input_channels():
    conv = nn.Conv2d(8, 12, 3, padding=1, groups=2)
    model = adapted(conv)
    x = torch.randn(1, 8, 5, 5)
    changed = x.clone()
    changed[:, 4:] += 1.0  # only the second group's input
    diff = model(changed) - model(x)
    assert diff[:, :6].abs().max() == 0, "group 0's output moved with group 1's input"
    assert diff[:, 6:].abs().max() > 0


@pytest.mark.parametrize(("conv", "r"), [
    (nn.Conv2d(16, 16, 3, groups=16), 16),  # depthwise, one filter per channel: no rank fits
    (nn.Conv2d(4, 8, 3, groups=4), 8),
    (nn.Conv3d(1, 8, (5, 7, 7)), 8),  # the tiny lip stem: rank 8 is one too many
    (nn.Conv1d(2, 3, 1), 2),
    (nn.Conv2d(32, 64, 3), 64),
])
def test_rank_whose_adapter_outgrows_the_layer_is_refused(conv, r):
    layer_params = conv.weight.numel()
    assert conv_lora_parameters(conv, r) > layer_params
    model = nn.Sequential(conv)
    fit = largest_fitting_rank(conv)
    hint = f"use r <= {fit} or exclude it" if fit else r"no rank fits \(one filter per channel\)"
    with pytest.raises(mm.ConfigError, match=rf"lora: a rank-{r} adapter on layer '0', a {type(conv).__name__}"
                       rf"\(.*\), would have {conv_lora_parameters(conv, r)} parameters, more than the layer's "
                       rf"{layer_params}; {hint}"):
        mm.attach(model, mm.LoRAConfig(targets=["0"], r=r))
    assert type(model[0]) is type(conv), "a refused attach changed the model"
    if fit:  # the rank the message offers attaches, and is no larger than the layer
        mm.attach(model, mm.LoRAConfig(targets=["0"], r=fit))
        assert sum(p.numel() for p in model[0].adapters.parameters()) <= layer_params


def test_no_accepted_rank_outgrows_its_layer():
    convs = [nn.Conv2d(i, o, k, groups=g) for i, o, g in [(4, 4, 4), (4, 8, 4), (8, 8, 2), (3, 16, 1), (16, 4, 1)]
             for k in (1, 3)]
    accepted = 0
    for conv in convs:
        for r in range(1, 17):
            model = nn.Sequential(conv)
            try:
                mm.attach(model, mm.LoRAConfig(targets=["0"], r=r))
            except mm.ConfigError:
                continue
            accepted += 1
            assert sum(p.numel() for p in model[0].adapters.parameters()) <= conv.weight.numel()
            mm.delete_adapter(model, "default")
    assert accepted > 20


def test_rank_that_does_not_split_over_groups_is_refused():
    model = nn.Sequential(nn.Conv2d(8, 16, 3, groups=4))
    with pytest.raises(mm.ConfigError, match=r"layer '0' is a Conv2d\(8->16, kernel \(3, 3\), groups 4\): key 'r' "
                       r"must be a multiple of 4 .*got 6"):
        mm.attach(model, mm.LoRAConfig(targets=["0"], r=6))


def test_all_linear_leaves_convolutions_and_all_conv_takes_them():
    vit = TOYS["vit"].build()  # a Conv2d patch embedding and linear layers
    mm.attach(vit, mm.LoRAConfig(targets=["all-linear"]))
    assert "patch_embed" not in dict(mm.adapted_layers(vit))
    mm.attach(vit, mm.LoRAConfig(targets=["all-conv"], r=2), "conv")
    convs = [n for n, layer in mm.adapted_layers(vit) if "conv" in layer.adapters]
    assert convs == ["patch_embed"]
    net = CONV_TOYS["conv2d-depthwise"].build()
    with pytest.raises(mm.ConfigError, match="adapter on layer 'mix'"):  # a 1x1 conv too small for rank 4
        mm.attach(net, mm.LoRAConfig(targets=["all-conv"], r=4))
    mm.attach(net, mm.LoRAConfig(targets=["all-conv"], exclude=["mix"], r=4))
    assert [n for n, _ in mm.adapted_layers(net)] == ["conv1", "conv2"]


class LinearAndConvProj(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch_embed, self.attn = nn.Module(), nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, 8, 2, stride=2)
        self.attn.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn.proj(self.patch_embed.proj(x).flatten(2).transpose(1, 2))


def test_a_suffix_that_names_linear_layers_does_not_reach_same_named_convs():
    model = LinearAndConvProj()
    mm.attach(model, mm.LoRAConfig(targets=["proj"]))
    assert [n for n, _ in mm.adapted_layers(model)] == ["attn.proj"]
    mm.attach(model, mm.LoRAConfig(targets=["patch_embed.proj"], r=2), "stem")
    assert isinstance(model.patch_embed.proj, AdaptedConv)
    regex = mm.attach(LinearAndConvProj(), mm.LoRAConfig(target_regex=r".*proj", r=2))
    assert [n for n, _ in mm.adapted_layers(regex)] == ["attn.proj"]


class PaddedConv(nn.Conv2d):
    """A conv whose forward is not torch's (as timm's Conv2dSame): an adapter could not match it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.pad(x, (0, 1, 0, 1)))


def test_conv_subclass_with_its_own_forward_is_not_adaptable():
    model = nn.Sequential(PaddedConv(3, 4, 2), nn.Conv2d(4, 4, 3))
    assert mm.wrap.adaptable_layers(model) == ["1"]
    with pytest.raises(mm.AttachError, match="match no adaptable layer"):
        mm.attach(model, mm.LoRAConfig(targets=["0"]))


def test_load_into_a_differently_shaped_conv_names_the_tensor(tmp_path):
    toy = CONV_TOYS["conv2d"]
    model = toy.build()
    mm.attach(model, mm.LoRAConfig(targets=toy.targets, r=4))
    path = mm.save_adapters(model, tmp_path / "conv.safetensors")
    other = TinyConvNet(nn.Conv2d(3, 8, 5, padding=2), nn.Conv2d(8, 8, (3, 1), stride=2))
    with pytest.raises(mm.AdapterStateError, match=r"conv\.safetensors: adapter 'default' does not fit the model; "
                       r"shape mismatch: conv1\.lora_A: file \(4, 3, 3, 3\) vs model \(4, 3, 5, 5\)"):
        mm.load_adapters(other, path)
    assert not list(mm.adapted_layers(other))


def test_per_row_adapters_on_a_conv_match_each_adapter_alone():
    toy = CONV_TOYS["conv2d-grouped"]
    model, x = toy.build(), toy.make_input()
    for seed, name in enumerate(("a", "b")):
        mm.attach(model, mm.LoRAConfig(targets=toy.targets, r=4), name)
        perturb(model, name, seed=seed)
    alone = {}
    for name in ("a", "b"):
        mm.set_active(model, name)
        alone[name] = toy.run(model, x)
    with mm.route(row_adapters=["b", "a"]):
        mixed = toy.run(model, x)
    torch.testing.assert_close(mixed, torch.stack([alone["b"][0], alone["a"][1]]), rtol=1e-5, atol=1e-6)


def test_bf16_conv_adapter_trains_in_the_layers_dtype_and_merges():
    conv = nn.Conv2d(4, 8, 3, padding=1).to(torch.bfloat16)
    model = adapted(conv)
    assert model[0].adapters["default"].lora_A.dtype == torch.bfloat16
    x = torch.randn(2, 4, 6, 6, dtype=torch.bfloat16)
    unmerged = model(x)
    mm.merge(model)
    assert (model(x).float() - unmerged.float()).abs().max() < 0.1
