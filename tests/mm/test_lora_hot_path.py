"""LoRA's fused hot path (mm.adapters.base.add_low_rank_ / add_matmul_) computes exactly what autograd's
plain graph computes: same output, same gradients for out, x, A and B, in every branch it takes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mm.adapters.base import add_low_rank_, add_matmul_

SCALING = 1.5


def reference(out, x, a, b):
    return out + F.linear(F.linear(x, a), b) * SCALING


def base_output(x, weight, bias):
    return F.linear(x, weight, bias)  # with a bias on 3-D input this is a view: the out-of-place branch


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("freeze_a", [False, True], ids=["train-a", "freeze-a"])
def test_fused_update_matches_autograd_in_value_and_gradients(with_bias, freeze_a):
    torch.manual_seed(0)
    weight = torch.randn(7, 5, dtype=torch.float64)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True) if with_bias else None
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 5, dtype=torch.float64, requires_grad=not freeze_a)
    b = torch.randn(7, 2, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(3, 4, 7, dtype=torch.float64)
    results = []
    for fn in (reference, lambda *t: add_low_rank_(*t, SCALING)):
        y = fn(base_output(x, weight, bias), x, a, b)
        assert fn is reference or type(y.grad_fn).__name__ == "_AddLowRankBackward", "fused path not taken"
        leaves = [t for t in (x, a, b, bias) if t is not None and t.requires_grad]
        results.append((y.detach(), torch.autograd.grad(y, leaves, upstream)))
    (ref_y, ref_grads), (y, grads) = results
    torch.testing.assert_close(y, ref_y)
    for got, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, expected)


def test_fused_update_passes_gradcheck():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    out = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    # out is cloned inside so the in-place write never touches the leaf gradcheck perturbs
    assert torch.autograd.gradcheck(lambda o, x_, a_, b_: add_low_rank_(o * 1, x_, a_, b_, SCALING), (out, x, a, b))
    h = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda o, h_, b_: add_matmul_(o * 1, h_, b_), (out, h, b))
    assert torch.autograd.gradgradcheck(lambda o, h_, b_: add_matmul_(o * 1, h_, b_), (out, h, b))


def test_no_grad_writes_in_place_and_matches():
    torch.manual_seed(2)
    x, a, b = torch.randn(4, 6, 5), torch.randn(3, 5), torch.randn(6, 3)
    out = torch.randn(4, 6, 6)
    expected = reference(out.clone(), x, a, b)
    with torch.no_grad():
        y = add_low_rank_(out, x, a, b, SCALING)
    assert y.data_ptr() == out.data_ptr()
    torch.testing.assert_close(y, expected)


def test_mixed_dtypes_fall_back_to_plain_ops():
    torch.manual_seed(3)
    x = torch.randn(2, 4, 5, dtype=torch.bfloat16)
    a = torch.randn(2, 5, requires_grad=True)
    b = torch.randn(6, 2, requires_grad=True)
    out = torch.randn(2, 4, 6, dtype=torch.bfloat16)
    expected = reference(out.float(), x.float(), a.detach(), b.detach())
    y = add_low_rank_(out, x, a, b, SCALING)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert a.grad is not None and b.grad is not None
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=5e-2)


def test_per_sample_gradients_under_torch_func():
    """DP training takes vmap(grad(...)) through the adapters: the fused path must step aside there."""
    from torch.func import grad, vmap

    torch.manual_seed(4)
    weight, a, b = torch.randn(6, 5), torch.randn(2, 5), torch.randn(6, 2)
    xs = torch.randn(3, 4, 5)

    def loss(a_, b_, x_):
        return add_low_rank_(F.linear(x_, weight), x_, a_, b_, SCALING).pow(2).sum()

    per_sample = vmap(grad(loss, argnums=(0, 1)), in_dims=(None, None, 0))(a, b, xs)
    for i in range(3):
        a_i, b_i = a.clone().requires_grad_(), b.clone().requires_grad_()
        reference(F.linear(xs[i], weight), xs[i], a_i, b_i).pow(2).sum().backward()
        torch.testing.assert_close(per_sample[0][i], a_i.grad)
        torch.testing.assert_close(per_sample[1][i], b_i.grad)
