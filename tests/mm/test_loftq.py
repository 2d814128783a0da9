"""LoftQ (init 'loftq' of LoRA): the base becomes its NF4-quantised residual and deq(Q) + s B A approximates W
better than quantising W alone; PEFT's own LoftQ steps (bitsandbytes NF4, its SVD split) give the same
factors for alpha = r; a bitsandbytes Linear4bit made from the new base holds exactly that Q."""

from __future__ import annotations

import pytest
import torch
from toys import TOYS

import mm
from mm.adapters.lora_inits import loftq_factors, quantise_dequantise

bnb = pytest.importorskip("bitsandbytes")


def _error(approx: torch.Tensor, weight: torch.Tensor) -> float:
    return float((approx - weight).norm() / weight.norm()) if not approx.requires_grad else _error(approx.detach(), weight)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_base_plus_low_rank_beats_plain_quantisation(bits):
    torch.manual_seed(0)
    weight = torch.randn(64, 48) * 0.05
    plain = _error(quantise_dequantise(weight, bits), weight)
    errors = []
    for iterations in (1, 4):
        dequantised, lora_a, lora_b = loftq_factors(weight, rank=8, scaling=2.0, bits=bits, iterations=iterations)
        errors.append(_error(dequantised + 2.0 * lora_b @ lora_a, weight))
    assert errors[0] < 0.9 * plain, f"LoftQ {errors[0]:.4f} vs plain {bits}-bit {plain:.4f}"
    assert errors[1] <= errors[0] * 1.001, f"more alternating steps made it worse: {errors}"


def test_attach_rewrites_the_base_and_keeps_the_approximation():
    toy = TOYS["mlp"]
    original, model = toy.build(), toy.build()
    mm.attach(model, mm.LoRAConfig(targets=["fc1", "fc2"], r=4, alpha=8.0, init="loftq", loftq_iter=2))
    for name in ("fc1", "fc2"):
        layer, weight = getattr(model, name), getattr(original, name).weight
        adapter = layer.adapters["default"]
        requantised = quantise_dequantise(layer.base.weight, 4)
        assert torch.equal(requantised, layer.base.weight), "the new base is not an exact NF4 weight"
        approx = layer.base.weight + adapter.delta_weight(layer.base)
        assert _error(approx, weight) < 0.9 * _error(quantise_dequantise(weight, 4), weight)


def test_linear4bit_from_the_new_base_holds_the_same_weights():
    toy = TOYS["mlp"]
    model = toy.build()
    mm.attach(model, mm.LoRAConfig(targets=["fc1"], r=4, init="loftq"))
    base = model.fc1.base
    layer = bnb.nn.Linear4bit(base.in_features, base.out_features, quant_type="nf4", compress_statistics=False)
    layer.weight = bnb.nn.Params4bit(base.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=False)
    layer = layer.to("cpu")
    from mm.quant import dequantised_weight

    assert torch.equal(dequantised_weight(layer), base.weight)


def test_matches_peft_loftq_steps_at_alpha_equal_r():
    """PEFT's loftq_init runs on CUDA only; its steps (bitsandbytes NF4 of the residual, _low_rank_decomposition)
    run here on the CPU, one iteration, and give our factors when s = alpha / r = 1 (PEFT leaves s out)."""
    from peft.utils.loftq_utils import _low_rank_decomposition

    torch.manual_seed(1)
    weight = torch.randn(40, 24) * 0.05
    params = bnb.nn.Params4bit(weight.clone(), requires_grad=False, compress_statistics=False, quant_type="nf4")
    params = params.to("cpu")
    peft_dequantised = bnb.functional.dequantize_4bit(params.data, params.quant_state)
    split = _low_rank_decomposition(weight - peft_dequantised, reduced_rank=6)
    dequantised, lora_a, lora_b = loftq_factors(weight, rank=6, scaling=1.0, bits=4, iterations=1)
    assert torch.equal(dequantised, peft_dequantised)
    torch.testing.assert_close(lora_b @ lora_a, split["L"] @ split["R"], rtol=1e-5, atol=1e-6)


def test_save_load_and_refusals(tmp_path):
    toy = TOYS["mlp"]
    model, x = toy.build(), toy.make_input()
    mm.attach(model, mm.LoRAConfig(targets=["fc1"], r=4, init="loftq"))
    path = mm.save_adapters(model, tmp_path / "loftq.safetensors")
    assert torch.equal(mm.load_adapters(toy.build(), path)(x), model(x))  # the fresh base is re-quantised alike
    with pytest.raises(TypeError, match="init 'loftq'"):
        mm.export_peft(model, tmp_path / "peft")
    with pytest.raises(mm.ConfigError, match="key 'loftq_bits' must be 4 or 8, got 2"):
        mm.LoRAConfig(targets=["fc1"], init="loftq", loftq_bits=2)


def test_a_quantised_base_is_refused_not_silently_left_unchanged():
    model = torch.nn.Sequential(bnb.nn.Linear4bit(12, 8, quant_type="nf4").to("cpu"))
    with pytest.raises(mm.ConfigError, match="init 'loftq' at 0: the layer is quantised"):
        mm.attach(model, mm.LoRAConfig(targets=["0"], r=2, init="loftq"))
    with pytest.raises(mm.ConfigError, match="init 'olora' at 0: the layer is quantised"):
        mm.attach(model, mm.LoRAConfig(targets=["0"], r=2, init="olora"))
    mm.attach(model, mm.LoRAConfig(targets=["0"], r=2, init="olora", residual="adapter"))  # base untouched: fine
