"""Polynomial-kernel attention: softmax attention whose cost grows linearly in sequence length.

Hu et al. (2024, "Computational Limits of Low-Rank Adaptation (LoRA) Fine-Tuning for Transformer
Models", arXiv 2406.03136) show that LoRA's attention gradient admits an almost-linear algorithm when the
entries of the (adapted) queries and keys are small, by replacing ``exp(Q K^T)`` with a low-rank product
``U V^T`` (the polynomial method of Alman & Song, 2023, "Fast Attention Requires Bounded Entries") and
chaining low-rank approximations through every term of the gradient. This module is that path made
concrete:

- ``features(x, degree)`` maps each row to the weighted monomials of degree <= g, so that
  ``features(q) . features(k) = sum_{j<=g} (q.k)^j / j!``, the degree-g Taylor polynomial of ``exp(q.k)``
  (``x^a / sqrt(a!)`` for every multi-index ``a``: the multinomial theorem). Rank ``m = C(d+g, g)``.
- ``PolynomialAttention`` (an autograd function) computes ``D^-1 (Phi_q Phi_k^T) V`` and its exact
  gradient without ever forming the L x L matrix: every term of the backward (dV, and dPhi_q / dPhi_k,
  which carry the ``P o (dO V^T)`` and ``diag(delta) P`` terms of the softmax gradient) is a contraction
  ``(x y^T) z``, done as ``x (y^T z)``, or chunk by chunk with a running state under a causal mask.

Cost: O(L m (d_v + 1)) plus O(L c m) for the causal chunks of size c, against O(L^2 d) for exact
attention. It pays only when m is well below L, and it is accurate only when ``|scale q.k|`` stays small
(the Taylor remainder grows like R^(g+1)/(g+1)! e^R for logits in [-R, R]): the paper's dichotomy. An even
degree keeps the kernel positive (an even-degree Taylor polynomial of exp has no real root), so the
normaliser never vanishes.
"""

from __future__ import annotations

import math
from functools import lru_cache
from itertools import combinations_with_replacement

import torch

from mm.config import ConfigError


def feature_rank(head_dim: int, degree: int) -> int:
    """Width of ``features``: the number of monomials of degree <= g in d variables, C(d+g, g)."""
    return math.comb(head_dim + degree, degree)


@lru_cache(maxsize=32)
def _monomial_plan(dim: int, degree: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per degree j >= 1: (index of the parent monomial of degree j-1, index of the variable it is
    multiplied by, 1/sqrt(a!) of the result). Building degree j from j-1 keeps memory at L x m."""
    plan = []
    previous = {(): 0}
    for j in range(1, degree + 1):
        combos = list(combinations_with_replacement(range(dim), j))
        parents = torch.tensor([previous[c[:-1]] for c in combos])
        variables = torch.tensor([c[-1] for c in combos])
        coefficients = torch.tensor([1.0 / math.sqrt(math.prod(math.factorial(c.count(v)) for v in set(c)))
                                     for c in combos], dtype=torch.float64)
        plan.append((parents, variables, coefficients))
        previous = {c: i for i, c in enumerate(combos)}
    return plan


def features(x: torch.Tensor, degree: int) -> torch.Tensor:
    """(..., d) -> (..., C(d+g, g)) with ``features(q) @ features(k).T == sum_j (q.k)^j / j!``."""
    plan = _monomial_plan(x.shape[-1], degree)
    parts = [torch.ones_like(x[..., :1])]
    plain = torch.ones_like(x[..., :1])  # monomials of the previous degree, without coefficients
    for parents, variables, coefficients in plan:
        plain = plain[..., parents.to(x.device)] * x[..., variables.to(x.device)]
        parts.append(plain * coefficients.to(device=x.device, dtype=x.dtype))
    return torch.cat(parts, dim=-1)


def _contract(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, causal: bool, chunk: int,
              reverse: bool = False) -> torch.Tensor:
    """``out_i = sum_j (x_i . y_j) z_j`` over all j, or j <= i when causal (j >= i with ``reverse``),
    in O(L * width) memory: never the L x L matrix, only chunk x chunk blocks."""
    if not causal:
        return x @ (y.transpose(-1, -2) @ z)
    if reverse:
        flip = lambda t: t.flip(-2)  # noqa: E731 - suffix sums are prefix sums of the reversed sequence
        return flip(_contract(flip(x), flip(y), flip(z), True, chunk))
    length = x.shape[-2]
    state = x.new_zeros(*x.shape[:-2], y.shape[-1], z.shape[-1])
    pieces = []
    for start in range(0, length, chunk):
        xs, ys, zs = (t[..., start:start + chunk, :] for t in (x, y, z))
        local = (xs @ ys.transpose(-1, -2)).tril() @ zs
        pieces.append(xs @ state + local)
        state = state + ys.transpose(-1, -2) @ zs
    return torch.cat(pieces, dim=-2)


class PolynomialAttention(torch.autograd.Function):
    """``softmax(scale q k^T) v`` with exp replaced by its degree-g Taylor polynomial; linear-cost backward.

    Inputs (..., L, d) queries and keys, (..., L, d_v) values. Double backward is not supported.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, degree: int,
                causal: bool, chunk: int) -> torch.Tensor:
        root = math.sqrt(scale)  # split the softmax scale between q and k: features see q.k * scale
        phi_q, phi_k = features(q * root, degree), features(k * root, degree)
        ones = v.new_ones(*v.shape[:-1], 1)
        numerator_and_norm = _contract(phi_q, phi_k, torch.cat([v, ones], dim=-1), causal, chunk)
        norm = numerator_and_norm[..., -1:]
        out = numerator_and_norm[..., :-1] / norm
        ctx.save_for_backward(q, k, v, out, norm)
        ctx.settings = (root, degree, causal, chunk)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, out, norm = ctx.saved_tensors
        root, degree, causal, chunk = ctx.settings
        with torch.enable_grad():
            q_leaf, k_leaf = q.detach().requires_grad_(), k.detach().requires_grad_()
            phi_q, phi_k = features(q_leaf * root, degree), features(k_leaf * root, degree)
        g = grad_out / norm                                     # dO_i / D_i
        delta = (grad_out * out).sum(-1, keepdim=True) / norm   # (dO_i . O_i) / D_i
        ones = delta.new_ones(delta.shape)
        phi_q_d, phi_k_d = phi_q.detach(), phi_k.detach()
        grad_v = _contract(phi_k_d, phi_q_d, g, causal, chunk, reverse=True)
        # dA_ij = g_i.v_j - delta_i = [g_i, -delta_i] . [v_j, 1]: one contraction per side.
        left, right = torch.cat([g, -delta], dim=-1), torch.cat([v, ones], dim=-1)
        grad_phi_q = _contract(left, right, phi_k_d, causal, chunk)
        grad_phi_k = _contract(right, left, phi_q_d, causal, chunk, reverse=True)
        grad_q, grad_k = torch.autograd.grad((phi_q, phi_k), (q_leaf, k_leaf), (grad_phi_q, grad_phi_k))
        return grad_q, grad_k, grad_v, None, None, None, None


def polynomial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                         degree: int = 4, causal: bool = False, chunk: int = 64) -> torch.Tensor:
    """Approximate ``softmax(scale q k^T [+ causal mask]) v`` in time linear in L (see the module doc).

    ``scale`` defaults to 1/sqrt(d) as in ``F.scaled_dot_product_attention``; ``degree`` must be even.
    """
    if degree < 2 or degree % 2:
        raise ConfigError(f"degree: expected an even integer >= 2 (an odd Taylor polynomial of exp can be "
                          f"negative and zero the normaliser), got {degree}")
    if chunk < 1:
        raise ConfigError(f"chunk: expected a positive integer, got {chunk}")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ConfigError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected q and k of "
                          f"the same head size and k, v of the same length")
    if causal and q.shape[-2] != k.shape[-2]:
        raise ConfigError(f"causal attention needs as many queries as keys, got {q.shape[-2]} and {k.shape[-2]}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return PolynomialAttention.apply(q, k, v, scale, degree, causal, chunk)


def taylor_remainder(logit_range: float, degree: int) -> float:
    """Bound on |exp(x) - T_g(x)| / exp(x) for |x| <= R: R^(g+1)/(g+1)! * e^(2R) (Lagrange remainder over
    the smallest exp(x) = e^-R). The relative error of every attention weight is at most about twice this."""
    r = abs(float(logit_range))
    return math.exp((degree + 1) * math.log(r) - math.lgamma(degree + 2) + 2 * r) if r > 0 else 0.0


def degree_for(logit_range: float, tolerance: float, max_degree: int = 64) -> int | None:
    """The smallest even degree whose ``taylor_remainder`` is <= ``tolerance``, or None if above ``max_degree``."""
    for degree in range(2, max_degree + 1, 2):
        if taylor_remainder(logit_range, degree) <= tolerance:
            return degree
    return None
