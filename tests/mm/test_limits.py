"""mm.limits / mm.poly_attention / mm.limits_path: the norms of Hu et al. (2024) and the near-linear path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from contract_cases import perturb
from torch import nn
from toys import tiny_gpt2, tiny_llama

import mm
from mm.limits import measure_limits
from mm.limits_path import below_threshold, disable_polynomial_attention, enable_polynomial_attention
from mm.poly_attention import degree_for, feature_rank, features, polynomial_attention, taylor_remainder


def _taylor_kernel_attention(q, k, v, scale, degree, causal):
    """The same approximation written the quadratic way: sum_j (scale q.k)^j / j!, normalised."""
    logits = scale * q @ k.transpose(-1, -2)
    kernel = sum(logits**j / math.factorial(j) for j in range(degree + 1))
    kernel = kernel.tril() if causal else kernel
    return (kernel @ v) / kernel.sum(-1, keepdim=True)


def test_features_inner_product_is_the_taylor_polynomial_of_exp():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(7, 3, generator=gen, dtype=torch.float64)
    fx, fy = features(x, 4), features(y, 4)
    assert fx.shape == (5, feature_rank(3, 4)) == (5, 35)
    s = x @ y.T
    torch.testing.assert_close(fx @ fy.T, 1 + s + s**2 / 2 + s**3 / 6 + s**4 / 24)


@pytest.mark.parametrize("causal", [False, True])
def test_linear_cost_backward_is_the_exact_gradient_of_the_kernel(causal):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 37, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = polynomial_attention(q, k, v, degree=4, causal=causal, chunk=8)  # 37 = 4 chunks + a partial one
    ref = _taylor_kernel_attention(q, k, v, 0.5, 4, causal)
    torch.testing.assert_close(out, ref)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    ours = torch.autograd.grad(out, (q, k, v), grad_out)
    theirs = torch.autograd.grad(ref, (q, k, v), grad_out)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)


def _gradient_error(bound: float, length: int = 256, dim: int = 4, degree: int = 6) -> float:
    """Relative error of dL/dq, dL/dk, dL/dv against exact softmax attention, entries of q, k in [-B, B]
    in Alman & Song's scaling (softmax(q k^T / d))."""
    gen = torch.Generator().manual_seed(2)
    q, k = ((torch.rand(length, dim, generator=gen, dtype=torch.float64) * 2 - 1) * bound for _ in range(2))
    v = torch.randn(length, dim, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(length, dim, generator=gen, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    approx = torch.autograd.grad(polynomial_attention(*leaves, scale=1 / dim, degree=degree), leaves, grad_out)
    exact = torch.autograd.grad(F.scaled_dot_product_attention(*leaves, scale=1 / dim), leaves, grad_out)
    return max(float((a - e).norm() / e.norm()) for a, e in zip(approx, exact, strict=True))


def test_gradient_is_close_below_the_threshold_and_breaks_above_it():
    threshold = math.sqrt(math.log(256))  # ~2.35
    errors = {scale: _gradient_error(scale * threshold) for scale in (0.25, 0.5, 1.0, 2.0, 3.0)}
    assert errors[0.25] < 1e-4 and errors[0.5] < 1e-3  # well below: within the stated tolerance
    assert errors[3.0] > 0.1  # well above: the polynomial no longer stands in for exp
    ordered = [errors[s] for s in sorted(errors)]
    assert ordered == sorted(ordered)  # the error grows with the entry bound


def test_remainder_bound_holds_and_picks_the_degree():
    for r in (0.5, 1.0, 2.0):
        for degree in (2, 4, 6):
            x = torch.linspace(-r, r, 101, dtype=torch.float64)
            taylor = sum(x**j / math.factorial(j) for j in range(degree + 1))
            assert float(((x.exp() - taylor) / x.exp()).abs().max()) <= taylor_remainder(r, degree)
    assert degree_for(0.1, 1e-3) == 2 and degree_for(1.0, 1e-3) == 8 and degree_for(50.0, 1e-3) is None


def test_odd_degree_and_bad_shapes_are_config_errors():
    q = torch.randn(4, 2)
    with pytest.raises(mm.ConfigError, match="degree: expected an even"):
        polynomial_attention(q, q, q, degree=3)
    with pytest.raises(mm.ConfigError, match="same length"):
        polynomial_attention(q, q, torch.randn(5, 2))


class _OneAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(2, 1, bias=False, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_diagnostic_values_match_a_hand_computation():
    model = _OneAttention()
    with torch.no_grad():
        model.attn.in_proj_weight.copy_(torch.cat([torch.eye(2), 2 * torch.eye(2), torch.eye(2)]))
    mm.attach(model, mm.LoRAConfig(targets=["q_proj", "v_proj"], r=1, alpha=2.0))  # scaling alpha/r = 2
    layer = model.attn.q_proj
    with torch.no_grad():
        layer.adapters["default"].lora_A.copy_(torch.tensor([[1.0, 0.0]]))
        layer.adapters["default"].lora_B.copy_(torch.tensor([[0.0], [0.5]]))  # 2 * B A = [[0, 0], [1, 0]]
    x = torch.tensor([[[1.0, -2.0], [0.5, 0.0], [0.0, 0.25]]])
    (row,) = measure_limits(model, lambda: model(x)).layers
    # W_Q = I + [[0, 0], [1, 0]] -> Q = X W_Q^T rows (1, -1), (0.5, 0.5), (0, 0.25); K = 2 X.
    assert (row.layer, row.adapted, row.seq_len, row.heads, row.head_dim) == ("attn", "q,v", 3, 1, 2)
    assert row.x_max == 2.0 and row.w_max == 1.0 and row.delta_max == 1.0  # adapted W_Q* = W_V* = I (W_K* = 2I not)
    assert row.xw_max == 4.0 and row.xdelta_max == 1.0  # X W_K* = 2X; X dW_Q^T = (0, 1), (0, .5), (0, 0)
    assert row.q_max == 1.0 and row.k_max == 4.0
    scale = 2 ** -0.5
    assert row.gamma == pytest.approx(math.sqrt(scale * 2) * 4.0)
    q = torch.tensor([[1.0, -1.0], [0.5, 0.5], [0.0, 0.25]])
    assert float((q @ (2 * x[0]).T).abs().max()) == 6.0  # q_1 . k_1 = 1*2 + (-1)(-4)
    assert row.logit_range == pytest.approx(6 * scale)
    assert row.threshold == pytest.approx(math.sqrt(math.log(3)))
    assert row.side == "above"  # gamma ~ 4.76 > sqrt(log 3) ~ 1.05
    assert row.rank == feature_rank(2, row.degree) and row.pays is False  # 3 tokens: never pays


def test_large_inputs_move_a_llama_layer_above_the_threshold():
    model = tiny_llama()
    mm.attach(model, mm.LoRAConfig(targets=["q_proj", "v_proj"], r=4))
    perturb(model)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    report = measure_limits(model, lambda: model(input_ids=ids))
    assert [r.layer for r in report.layers] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    first = report.layers[0]
    assert first.adapted == "q,v" and first.heads == 4 and first.head_dim == 8 and first.delta_max > 0
    assert first.side == "below"
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.mul_(40.0)  # X of layer 0's attention: 40x larger
    louder = measure_limits(model, lambda: model(input_ids=ids)).layers[0]
    assert louder.x_max == pytest.approx(40 * first.x_max, rel=1e-4)
    assert louder.gamma == pytest.approx(40 * first.gamma, rel=1e-4) and louder.side == "above"
    assert louder.logit_range == pytest.approx(1600 * first.logit_range, rel=1e-3)


def test_gpt2_packed_qkv_is_cut_into_thirds():
    model = tiny_gpt2()
    mm.attach(model, mm.LoRAConfig(targets=["c_attn"], r=4))
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    seen = {}
    model.transformer.h[0].attn.c_attn.register_forward_hook(lambda m, a, out: seen.update(out=out))
    row = measure_limits(model, lambda: model(input_ids=ids)).layers[0]
    assert row.adapted == "q,k,v" and row.heads == 4 and row.head_dim == 8
    assert row.q_max == float(seen["out"][..., :32].abs().max())
    assert row.k_max == float(seen["out"][..., 32:64].abs().max())


def test_a_model_without_adapted_attention_is_refused():
    with pytest.raises(mm.ConfigError, match="no adapted attention layer"):
        measure_limits(nn.Linear(2, 2), lambda: None)


def test_polynomial_path_in_llama_follows_exact_attention_and_leaves_padding_exact():
    model = tiny_llama()
    mm.attach(model, mm.LoRAConfig(targets=["q_proj", "v_proj"], r=4))
    perturb(model)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    exact = model(input_ids=ids).logits
    exact.sum().backward()
    exact_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    layers = below_threshold(measure_limits(model, lambda: model(input_ids=ids)))
    enable_polynomial_attention(model, layers, degree=6)
    approx = model(input_ids=ids).logits
    assert (approx - exact).abs().max() > 0  # it did take the other path ...
    torch.testing.assert_close(approx, exact, rtol=1e-4, atol=1e-4)  # ... and it stands in for softmax
    approx.sum().backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, exact_grads[name], rtol=1e-3, atol=1e-4)
    padded = torch.ones_like(ids)
    padded[1, :5] = 0
    with torch.no_grad():
        on = model(input_ids=ids, attention_mask=padded).logits
        disable_polynomial_attention(model)
        off = model(input_ids=ids, attention_mask=padded).logits
    torch.testing.assert_close(on, off, rtol=0, atol=0)  # padding: the exact path, bit for bit
    assert torch.equal(model(input_ids=ids).logits, exact)


def test_polynomial_path_in_a_split_multihead_attention():
    torch.manual_seed(0)
    model = _OneAttention()
    mm.attach(model, mm.LoRAConfig(targets=["attn"], r=2))
    x = torch.randn(2, 16, 2) * 0.5
    exact = model(x)
    enable_polynomial_attention(model, ["attn"], degree=8)
    approx = model(x)
    assert not torch.equal(approx, exact)
    torch.testing.assert_close(approx, exact, rtol=1e-4, atol=1e-5)
    disable_polynomial_attention(model)
    assert torch.equal(model(x), exact)
    with pytest.raises(mm.ConfigError, match="nope: not a module"):
        enable_polynomial_attention(model, ["nope"])
