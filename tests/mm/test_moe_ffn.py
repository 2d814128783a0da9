"""MixLoRA's whole-FFN experts: ``y = sum_j g_j FFN_j(x)`` against slow per-token references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from contract_cases import perturb
from toys import TinyMLP, TinyViT, tiny_llama

import mm
from mm.adapters.mixlora import MixLoRAConfig
from mm.adapters.moe import aux_loss
from mm.route import route

LLAMA_MLP = ["gate_proj", "up_proj", "down_proj"]


def _scaling(adapter) -> float:
    """alpha / r (alpha / sqrt(r) with rsLoRA) from the adapter's config: the reference does not read the
    ``scaling`` the code under test computed, so a wrong scaling there shows up here."""
    config = adapter.config
    return config.alpha / (math.sqrt(config.r) if config.rslora else config.r)


def _proj(layer, vector, experts: dict[str, int]):
    """One token through one projection with the given expert of each named adapter: W v + b + sum s B_e A_e v."""
    out = F.linear(vector, layer.base.weight, layer.base.bias)
    for name, adapter in layer.adapters.items():
        if name in experts:
            e = experts[name]
            out = out + _scaling(adapter) * (adapter.lora_B[e] @ (adapter.lora_A[e] @ vector))
        elif name in layer.active:  # a plain LoRA beside the mixture
            out = out + _scaling(adapter) * (adapter.lora_B @ (adapter.lora_A @ vector))
    return out


def _top_k(router, vector, k):
    probs = torch.softmax(router.weight @ vector, dim=-1)
    chosen = sorted(range(probs.numel()), key=lambda e: -float(probs[e].detach()))[:k]
    gates = probs[chosen]
    return chosen, gates / gates.sum()


def _reference(x, ffn, router, k, name="default"):
    """Per token: route, then the gate-weighted sum of each chosen expert's whole FFN."""
    rows = []
    for vector in x.reshape(-1, x.shape[-1]):
        chosen, gates = _top_k(router, vector, k)
        rows.append(sum(g * ffn(vector, {name: e}) for e, g in zip(chosen, gates, strict=True)))
    return torch.stack(rows).view(*x.shape[:-1], -1)


def _llama_ffn(mlp):
    return lambda v, ex: _proj(mlp.down_proj, F.silu(_proj(mlp.gate_proj, v, ex)) * _proj(mlp.up_proj, v, ex), ex)


@pytest.mark.parametrize("dispatch", ["auto", "masked", "grouped"])
def test_llama_mlp_is_the_gate_weighted_sum_of_whole_ffn_experts(dispatch):
    model = tiny_llama()
    mm.attach(model, MixLoRAConfig(targets=LLAMA_MLP, r=4, alpha=8.0, num_experts=5, top_k=2, dispatch=dispatch))
    perturb(model, scale=0.3)
    mlp = model.model.layers[1].mlp
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = mlp(x)
        expected = _reference(x, _llama_ffn(mlp), mlp.gate_proj.adapters["default"].router, k=2)
        mixed_inside = model.model.layers[1].mlp.down_proj.base(F.silu(mlp.gate_proj.base(x)) * mlp.up_proj.base(x))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (got - mixed_inside).abs().max() > 1e-3, "experts change nothing"


def test_open_clip_mlp_top3_is_the_sum_of_whole_ffn_experts():
    vit = TinyViT().eval()
    mm.attach(vit, MixLoRAConfig(targets=["c_fc", "c_proj"], r=4, alpha=4.0, num_experts=4, top_k=3))
    perturb(vit, scale=0.3)
    mlp = vit.blocks[0].mlp
    x = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(1))
    ffn = lambda v, ex: _proj(mlp.c_proj, F.gelu(_proj(mlp.c_fc, v, ex)), ex)  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), _reference(x, ffn, mlp.c_fc.adapters["default"].router, k=3),
                                   rtol=1e-4, atol=1e-5)


def test_frozen_projections_run_once_per_token_not_once_per_choice():
    """MixLoRA's shared-W computation: the base weights see T rows, whatever top_k is."""
    model = tiny_llama()
    mm.attach(model, MixLoRAConfig(targets=LLAMA_MLP, r=2, num_experts=8, top_k=4))
    rows = {}
    for proj in LLAMA_MLP:
        layer = getattr(model.model.layers[0].mlp, proj)
        layer.base.register_forward_hook(lambda m, args, out, p=proj: rows.__setitem__(p, args[0].shape))
    model(torch.randint(0, 64, (2, 5)))
    assert rows == {"gate_proj": (2, 5, 32), "up_proj": (2, 5, 32), "down_proj": (2, 5, 64)}


def test_plain_lora_beside_the_mixture_on_the_same_projections_is_exact():
    model = tiny_llama()
    mm.attach(model, mm.LoRAConfig(targets=LLAMA_MLP, r=2, alpha=4.0), "plain")
    mm.attach(model, MixLoRAConfig(targets=LLAMA_MLP, r=2, alpha=4.0, num_experts=3, top_k=2), "mix")
    perturb(model, scale=0.3)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = _reference(x, _llama_ffn(mlp), mlp.gate_proj.adapters["mix"].router, k=2, name="mix")
        torch.testing.assert_close(mlp(x), expected, rtol=1e-4, atol=1e-5)


def test_two_mixtures_active_on_one_block_nest_as_a_product():
    model = TinyMLP()
    mm.attach(model, MixLoRAConfig(targets=["fc1", "fc2"], r=2, num_experts=3, top_k=2), "a")
    mm.attach(model, MixLoRAConfig(targets=["fc1", "fc2"], r=2, num_experts=4, top_k=2), "b")
    perturb(model, scale=0.3)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(3))
    routers = {n: model.fc1.adapters[n].router for n in "ab"}

    def block(v, ex):
        return _proj(model.fc2, F.gelu(_proj(model.fc1, v, ex)), ex)

    rows = []
    for v in x:
        (ea, ga), (eb, gb) = _top_k(routers["a"], v, 2), _top_k(routers["b"], v, 2)
        rows.append(sum(ga[i] * gb[j] * block(v, {"a": ea[i], "b": eb[j]}) for i in range(2) for j in range(2)))
    with torch.no_grad():
        got = model.fc2(model.act(model.fc1(x)))
    torch.testing.assert_close(got, torch.stack(rows), rtol=1e-4, atol=1e-5)


def test_attention_projections_mix_inside_each_projection():
    """q/k/v/o all read the block width: nothing folds, so top-k mixes per projection (no k rows)."""
    model = tiny_llama()
    mm.attach(model, MixLoRAConfig(targets=["q_proj", "k_proj", "v_proj", "o_proj"], r=2, num_experts=3, top_k=2))
    attn = model.model.layers[0].self_attn
    assert not any(getattr(attn, p).adapters["default"].expands_output for p in ("q_proj", "k_proj", "v_proj"))
    out = model(torch.randint(0, 64, (2, 5)), labels=torch.randint(0, 64, (2, 5)))
    (out.loss + aux_loss(model)).backward()
    assert attn.q_proj.adapters["default"].router.weight.grad is not None


def test_gradients_match_the_slow_reference():
    model = TinyMLP()
    mm.attach(model, MixLoRAConfig(targets=["fc1", "fc2"], r=2, num_experts=3, top_k=2))
    perturb(model, scale=0.3)
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(6))
    router = model.fc1.adapters["default"].router
    fast = model.fc2(model.act(model.fc1(x))).pow(2).sum()
    slow = _reference(x, lambda v, ex: _proj(model.fc2, F.gelu(_proj(model.fc1, v, ex)), ex), router, k=2)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 5  # A and B of fc1 and fc2, and the router
    for got, expected in zip(torch.autograd.grad(fast, params), torch.autograd.grad(slow.pow(2).sum(), params),
                             strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_per_row_routing_refuses_whole_ffn_mixtures_clearly():
    model = TinyMLP()
    mm.attach(model, MixLoRAConfig(targets=["fc1", "fc2"], r=2, num_experts=3, top_k=2))
    with route(row_adapters=("default", None)), pytest.raises(ValueError, match="whole-FFN mixture"):
        model(torch.randn(2, 12))


def test_gpt2_conv1d_mlp_is_the_sum_of_whole_ffn_experts():
    """GPT-2 stores its MLP as transformers Conv1D (weight (in, out)); its attention c_proj mixes per projection."""
    from toys import tiny_gpt2

    model = tiny_gpt2()
    mm.attach(model, MixLoRAConfig(targets=["c_fc", "c_proj"], r=2, alpha=4.0, num_experts=3, top_k=2))
    perturb(model, scale=0.3)
    block = model.transformer.h[0]
    assert block.mlp.c_fc.adapters["default"].expands_output and block.mlp.c_proj.adapters["default"].folds_input
    assert not block.attn.c_proj.adapters["default"].expands_output
    mlp = block.mlp.eval()
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(7))

    def conv1d(layer, v, ex):
        a = layer.adapters["default"]
        e = ex["default"]
        return v @ layer.base.weight + layer.base.bias + _scaling(a) * (a.lora_B[e] @ (a.lora_A[e] @ v))

    ffn = lambda v, ex: conv1d(mlp.c_proj, mlp.act(conv1d(mlp.c_fc, v, ex)), ex)  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), _reference(x, ffn, mlp.c_fc.adapters["default"].router, k=2),
                                   rtol=1e-4, atol=1e-5)
    model(torch.randint(0, 64, (2, 5)))  # the whole model runs with the attention mixture beside


def test_per_row_routing_of_other_adapters_beside_a_whole_ffn_mixture_still_works():
    model = TinyMLP()
    mm.attach(model, MixLoRAConfig(targets=["fc1", "fc2"], r=2, num_experts=3, top_k=2), "mix")
    mm.attach(model, mm.LoRAConfig(targets=["fc1", "fc2"], r=2), "plain")
    perturb(model, scale=0.3)
    x = torch.randn(2, 12, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        with route(row_adapters=("plain", None)):
            got = model(x)
        mm.set_active(model, "plain")
        expected_plain = model(x[:1])
        with mm.disable_adapters(model):
            expected_base = model(x[1:])
    torch.testing.assert_close(got, torch.cat([expected_plain, expected_base]))
