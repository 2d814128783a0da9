"""Llama-MTSK Matryoshka LoRA: MS shares one LoRA, SS uses the scale's own, MSS sums both; the scale comes
from mm.route. Checked against plain LoRAs holding the same weights, and against HF PEFT."""

from __future__ import annotations

import pytest
import torch
from contract_cases import perturb
from toys import TOYS

import mm
from mm.adapters.mtsk import MatryoshkaLoRAConfig
from mm.route import route

SCALES = ["a4_v2", "a4_v5", "a16_v2", "a16_v5"]
LLAMA = TOYS["llama"]


def mtsk_model(strategy: str, seed: int = 0, **options):
    model = LLAMA.build()
    # The strategy tests compare with plain LoRAs of rank r, hence parametrisation 'lora' by default here;
    # the reference parametrisation has its own tests at the end.
    options.setdefault("parametrisation", "lora")
    config = MatryoshkaLoRAConfig(targets=options.pop("targets", LLAMA.targets), r=options.pop("r", 4),
                                  alpha=8.0, strategy=strategy, scales=options.pop("scales", SCALES), **options)
    mm.attach(model, config, "mtsk")
    perturb(model, seed=seed, scale=0.2)
    return model


def lora_parts(model, part: str) -> dict[str, torch.Tensor]:
    """The tensors of one sub-LoRA ('global_lora' or 'scale_loras.<s>') keyed as a plain LoRA's."""
    out = {}
    for key, value in model.state_dict().items():
        marker = f".adapters.mtsk.{part}."
        if marker in key:
            layer, tensor = key.split(marker)
            out[f"{layer}.adapters.default.{tensor}"] = value
    return out


def plain_lora_with(*parts: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A base model with one plain LoRA per part, all active: their updates add up."""
    model = LLAMA.build()
    for i, part in enumerate(parts):
        name = f"p{i}"
        mm.attach(model, mm.LoRAConfig(targets=LLAMA.targets, r=4, alpha=8.0), name)
        with torch.no_grad():
            state = model.state_dict()
            for key, value in part.items():
                state[key.replace(".adapters.default.", f".adapters.{name}.")].copy_(value)
    mm.set_active(model, [f"p{i}" for i in range(len(parts))])
    return model


def run(model, scale: str | None):
    x = LLAMA.make_input()
    with route(scale=scale):
        return LLAMA.run(model, x)


def test_ms_one_global_lora_whatever_the_scale():
    model = mtsk_model("ms")
    outputs = [run(model, s) for s in SCALES]
    for out in outputs[1:]:
        assert torch.equal(out, outputs[0])
    expected = LLAMA.run(plain_lora_with(lora_parts(model, "global_lora")), LLAMA.make_input())
    torch.testing.assert_close(outputs[0], expected, rtol=1e-6, atol=1e-6)
    assert not any(".scale_loras." in k for k in model.state_dict())


@pytest.mark.parametrize("scale", SCALES)
def test_ss_uses_only_the_scale_lora(scale):
    model = mtsk_model("ss")
    expected = LLAMA.run(plain_lora_with(lora_parts(model, f"scale_loras.{scale}")), LLAMA.make_input())
    torch.testing.assert_close(run(model, scale), expected, rtol=1e-6, atol=1e-6)
    assert not any(".global_lora." in k for k in model.state_dict())


@pytest.mark.parametrize("scale", SCALES)
def test_mss_sums_global_and_scale_lora(scale):
    model = mtsk_model("mss")
    plain = plain_lora_with(lora_parts(model, "global_lora"), lora_parts(model, f"scale_loras.{scale}"))
    torch.testing.assert_close(run(model, scale), LLAMA.run(plain, LLAMA.make_input()), rtol=1e-6, atol=1e-6)


def test_scales_differ_and_gradients_reach_only_the_active_scale():
    model = mtsk_model("mss")
    outs = {s: run(model, s) for s in SCALES}
    assert (outs["a4_v2"] - outs["a16_v5"]).abs().max() > 1e-3, "scales give the same output"
    with route(scale="a16_v2"):
        LLAMA.run(model, LLAMA.make_input()).pow(2).mean().backward()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        reached = param.grad is not None and param.grad.abs().sum() > 0
        should = ".global_lora." in name or ".scale_loras.a16_v2." in name
        assert reached == should, f"{name}: gradient {'missing' if should else 'leaked'}"


def test_default_scale_and_missing_or_unknown_scale():
    model = mtsk_model("ss", default_scale="a16_v5")
    torch.testing.assert_close(run(model, None), run(model, "a16_v5"), rtol=0, atol=0)
    no_default = mtsk_model("ss")
    with pytest.raises(RuntimeError, match=r"no scale for this forward.*mm.route\(scale=...\)"):
        run(no_default, None)
    with pytest.raises(KeyError, match="unknown scale 'a8_v2'.*a4_v2"):
        run(no_default, "a8_v2")
    ms = mtsk_model("ms", scales=[])
    torch.testing.assert_close(run(ms, None), run(ms, "anything"), rtol=0, atol=0)


def test_merge_inside_a_route_serves_that_scale():
    model = mtsk_model("mss")
    expected = run(model, "a4_v5")
    with route(scale="a4_v5"):
        mm.merge(model)
    assert not any(layer.active and name not in layer.merged for _, layer in mm.adapted_layers(model)
                   for name in layer.active)
    torch.testing.assert_close(run(model, None), expected, rtol=1e-5, atol=1e-5)


def test_save_load_keeps_every_scale(tmp_path):
    model = mtsk_model("mss")
    expected = {s: run(model, s) for s in SCALES}
    path = mm.save_adapters(model, tmp_path / "mtsk.safetensors")
    fresh = LLAMA.build()
    mm.load_adapters(fresh, path)
    config = mm.adapter_config(fresh, "mtsk")
    assert config.strategy == "mss" and config.scales == SCALES
    for scale, out in expected.items():
        assert torch.equal(run(fresh, scale), out)


def test_trainable_count_per_strategy():
    counts = {s: sum(p.numel() for p in mtsk_model(s).parameters() if p.requires_grad) for s in ("ms", "ss", "mss")}
    assert counts["ss"] == len(SCALES) * counts["ms"]
    assert counts["mss"] == counts["ss"] + counts["ms"]


@pytest.mark.parametrize("options, message", [
    ({"strategy": "ss"}, "'scales' must list"),
    ({"strategy": "mss", "scales": ["a4", "a4"]}, "repeats"),
    ({"strategy": "ss", "scales": ["a.4"]}, "contain '.'"),
    ({"strategy": "ss", "scales": ["a4"], "default_scale": "a8"}, "'default_scale' 'a8'"),
    ({"strategy": "big"}, "'strategy'"),
    ({"parametrisation": "reference", "rslora": True}, r"keys \['rslora'\] do not apply"),
    ({"parametrisation": "reference", "freeze_a": True}, "'freeze_a'"),
    ({"parametrisation": "pissa"}, "'parametrisation'"),
])
def test_config_errors_name_the_key(options, message):
    with pytest.raises(mm.ConfigError, match=message):
        mm.AdapterConfig.from_dict({"method": "mtsk", "targets": ["q_proj"], **options})


def test_mss_at_a_scale_equals_peft_lora_of_double_rank():
    """Global + specific LoRA (rank r each, scale alpha/r) == one PEFT LoRA of rank 2r, alpha 2*alpha, whose
    A stacks both A's and B both B's: an independent implementation of the update MSS computes."""
    peft = pytest.importorskip("peft")
    model = mtsk_model("mss", seed=4)
    expected = run(model, "a16_v2")
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA.targets, init_lora_weights=False)
    peft_model = peft.get_peft_model(LLAMA.build(), config).eval()
    ours = model.state_dict()
    with torch.no_grad():
        for key, param in peft_model.named_parameters():
            if ".lora_" not in key:
                continue
            layer = key.removeprefix("base_model.model.").split(".lora_")[0]
            a_or_b = "lora_A" if ".lora_A." in key else "lora_B"
            parts = [ours[f"{layer}.adapters.mtsk.{p}.{a_or_b}"] for p in ("global_lora", "scale_loras.a16_v2")]
            param.copy_(torch.cat(parts, dim=0 if a_or_b == "lora_A" else 1))
    torch.testing.assert_close(LLAMA.run(peft_model, LLAMA.make_input()), expected, rtol=1e-5, atol=1e-5)


# ---- the reference parametrisation (Omni-AVSR's Llama_MatryLoRA.py): r divides the width, A = 0 at init


def reference_model(strategy: str = "mss", r: int = 4):
    model = LLAMA.build()
    config = MatryoshkaLoRAConfig(targets=["q_proj", "v_proj"], r=r, alpha=8.0, strategy=strategy, scales=SCALES)
    assert config.parametrisation == "reference"  # the default
    mm.attach(model, config, "mtsk")
    return model


def test_reference_is_the_default_bottleneck_is_width_over_r_and_scale_alpha_over_r():
    model = reference_model("mss", r=4)
    layers = dict(mm.adapted_layers(model))
    assert {name.rsplit(".", 1)[-1] for name in layers} == {"q_proj", "v_proj"}
    for layer in layers.values():
        adapter = layer.adapters["mtsk"]
        for lora in [adapter.global_lora, *adapter.scale_loras.values()]:
            assert lora.lora_A.shape == (layer.in_features // 4, layer.in_features)  # hidden 32 / RANK 4 = 8
            assert lora.lora_B.shape == (layer.out_features, layer.in_features // 4)
            assert lora.scaling == pytest.approx(8.0 / 4)


def test_reference_zero_inits_A_not_B_so_output_is_the_base_and_A_trains_first():
    x = LLAMA.make_input()
    expected = LLAMA.run(LLAMA.build(), x)
    model = reference_model("mss")
    for scale in SCALES:
        torch.testing.assert_close(run(model, scale), expected, rtol=0, atol=0)
    loras = [lora for _, layer in mm.adapted_layers(model) for lora in
             [layer.adapters["mtsk"].global_lora, *layer.adapters["mtsk"].scale_loras.values()]]
    assert all(torch.count_nonzero(lora.lora_A) == 0 and torch.count_nonzero(lora.lora_B) > 0 for lora in loras)
    with route(scale="a4_v5"):
        LLAMA.run(model, x).pow(2).mean().backward()
    active = [layer.adapters["mtsk"].scale_loras["a4_v5"] for _, layer in mm.adapted_layers(model)]
    assert all(lora.lora_A.grad.abs().sum() > 0 for lora in active)  # with A = 0 only A gets a gradient
    assert all(lora.lora_B.grad is None or lora.lora_B.grad.abs().sum() == 0 for lora in active)


def test_reference_width_not_divisible_rounds_and_a_zero_bottleneck_is_an_error():
    model = reference_model("ms", r=5)  # round(32 / 5) = 6, the authors' round()
    assert {layer.adapters["mtsk"].global_lora.lora_A.shape[0] for _, layer in mm.adapted_layers(model)} == {6}
    with pytest.raises(mm.ConfigError, match=r"r=80 divides an input width of 32 to a bottleneck of 0"):
        reference_model("ms", r=80)
