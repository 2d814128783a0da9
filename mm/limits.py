"""Computational limits of LoRA: which adapted attention layers admit a near-linear gradient.

Hu et al. (2024), "Computational Limits of Low-Rank Adaptation (LoRA) Fine-Tuning for Transformer Models"
(arXiv 2406.03136, ICLR 2025), building on Alman & Song (2023, "Fast Attention Requires Bounded
Entries"): with head size d = O(log L) and the entries of the adapted products ``X W_Q``, ``X W_K``
(``W = W* + alpha B A / r``, attention ``softmax(Q K^T / d)``) bounded by Gamma,

- Gamma = o(sqrt(log L)): LoRA's attention gradient (partial adaptation of W_Q, W_V and full adaptation
  of W_Q, W_K, W_V alike) has an L^(1+o(1)) algorithm, by low-rank approximation of exp(Q K^T) and a
  chain of low-rank approximations through the gradient's terms (``mm.poly_attention``);
- Gamma = Omega(sqrt(log L)): no O(L^(2-delta)) algorithm exists, assuming SETH.

The statements are asymptotic and carry no constant, so ``measure_limits`` reports the ratio
``gamma / sqrt(log L)`` and calls a layer "below" when it is under ``threshold_scale`` (1 by default), and
beside it the concrete numbers that decide whether ``mm.poly_attention`` pays on a given batch: the largest
logit |scale q.k| (R), the smallest even Taylor degree g whose remainder is under ``tolerance``, and the
feature rank C(d+g, g) that the near-linear path costs per token against L for exact attention.

Gamma of a layer computing ``softmax(s q k^T)`` is ``sqrt(s d) * max(||X W_Q||_max, ||X W_K||_max)``: the
entry bound of the same attention written as Alman & Song's ``softmax(Q' K'^T / d)``. Q and K are read
at the projections' outputs, before any rotary embedding (a rotation of pairs: q.k ranges change little,
single entries by up to sqrt 2).
"""

from __future__ import annotations

import json
import math
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from mm.adapters import NotMergeableError
from mm.config import ConfigError
from mm.layer import AdaptedLinear, weight_out_in
from mm.poly_attention import degree_for, feature_rank

SEPARATE = ("q_proj", "k_proj", "v_proj")


@dataclass
class AttentionLimits:
    """The paper's quantities for one adapted attention layer on one batch (max-entry norms)."""

    layer: str
    adapted: str          # which projections carry an adapter: "q,v" (partial), "q,k,v" (full), ...
    seq_len: int
    heads: int
    head_dim: int
    scale: float
    x_max: float          # ||X||_max
    w_max: float          # max over adapted projections of ||W*||_max
    delta_max: float | None   # max over adapted projections of ||alpha B A / r||_max (None: no weight form)
    xw_max: float         # max(||X W_Q*||_max, ||X W_K*||_max)
    xdelta_max: float | None  # max(||X alpha B_Q A_Q / r||_max, ||X alpha B_K A_K / r||_max)
    q_max: float          # ||X W_Q||_max with the adapted W_Q (and bias)
    k_max: float
    gamma: float          # sqrt(scale * head_dim) * max(q_max, k_max)
    threshold: float      # sqrt(log L)
    side: str             # "below" / "above" the threshold (gamma / threshold vs threshold_scale)
    logit_range: float    # R = max |scale q.k| over the batch, heads and query-key pairs
    degree: int | None    # smallest even Taylor degree with remainder <= tolerance (None: > 64)
    rank: int | None      # C(head_dim + degree, degree): per-token cost of the near-linear path
    pays: bool            # rank < seq_len: the polynomial path does less work than exact attention


@dataclass
class LimitsReport:
    layers: list[AttentionLimits]
    tolerance: float
    threshold_scale: float

    def to_markdown(self) -> str:
        header = ["layer", "adapted", "L", "d", "max X", "max W*", "max aBA/r", "max XW_Q, XW_K", "gamma",
                  "sqrt(log L)", "side", "R", "degree", "rank", "pays"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in self.layers:
            cells = [r.layer, r.adapted, r.seq_len, r.head_dim, _fmt(r.x_max), _fmt(r.w_max), _fmt(r.delta_max),
                     f"{_fmt(r.q_max)}, {_fmt(r.k_max)}", _fmt(r.gamma), _fmt(r.threshold), r.side,
                     _fmt(r.logit_range), "-" if r.degree is None else r.degree, "-" if r.rank is None else r.rank,
                     "yes" if r.pays else "no"]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        return "\n".join(lines)

    def to_json(self) -> str:
        rows = [{k: _finite(v) for k, v in asdict(r).items()} for r in self.layers]
        return json.dumps({"tolerance": self.tolerance, "threshold_scale": self.threshold_scale,
                           "layers": rows}, indent=2)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _finite(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def attention_layers(model: nn.Module) -> dict[str, dict[str, nn.Module]]:
    """Adapted attention modules: name -> their projections, {"q_proj", "k_proj", "v_proj"} (separate
    layers: transformers Llama/Whisper/CLIP, mmtune's split ``nn.MultiheadAttention``) or {"c_attn"}
    (GPT-2's packed q/k/v). Only modules where at least one projection carries an adapter."""
    found = {}
    for name, module in model.named_modules():
        parts = {p: getattr(module, p) for p in SEPARATE if isinstance(getattr(module, p, None), nn.Module)}
        if not {"q_proj", "k_proj"} <= parts.keys():
            packed = getattr(module, "c_attn", None)
            parts = {"c_attn": packed} if isinstance(packed, nn.Module) else {}
        if parts and any(isinstance(p, AdaptedLinear) for p in parts.values()):
            found[name] = parts
    return found


def _head_layout(module: nn.Module, q_width: int) -> tuple[int, float]:
    """(head_dim, softmax scale) of an attention module, read from the attributes libraries give it."""
    head_dim = getattr(module, "head_dim", None)
    if not isinstance(head_dim, int):
        heads = getattr(module, "num_heads", None) or getattr(getattr(module, "config", None),
                                                               "num_attention_heads", None)
        head_dim = q_width // heads if heads else q_width
    scale = getattr(module, "scaling", None)
    if not isinstance(scale, float):
        scale = head_dim ** -0.5 if getattr(module, "scale_attn_weights", True) else 1.0
    return head_dim, float(scale)


def _delta_and_base(layer: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(sum of the active adapters' alpha B A / r, or None if one has no weight form; frozen W*), both
    (out, in). A plain layer's delta is zero."""
    if not isinstance(layer, AdaptedLinear):
        weight = weight_out_in(layer)
        return torch.zeros_like(weight), weight
    base = weight_out_in(layer.base)
    delta = torch.zeros_like(base)
    for name in layer.active:
        try:
            delta = delta + layer.adapters[name].delta_weight(layer.base).to(base)
        except NotMergeableError:
            return None, base
    return delta, base


def _max_abs(t: torch.Tensor | None) -> float | None:
    return None if t is None else float(t.detach().abs().max())


@contextmanager
def _capture(parts: dict[str, nn.Module]):
    """Record each projection's input and output of the next forward."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook_for(key: str):
        def record(_module, args, out) -> None:  # returns None: the forward's output is left as it is
            seen.setdefault(key, (args[0], out))
        return record

    handles = [p.register_forward_hook(hook_for(key)) for key, p in parts.items() if key != "v_proj"]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _split_heads(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(..., L, H*d) -> (N, H, L, d)."""
    t = t.reshape(-1, *t.shape[-2:]) if t.dim() >= 2 else t.unsqueeze(0)
    n, length, width = t.shape
    return t.view(n, length, width // head_dim, head_dim).transpose(1, 2)


def logit_range(q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int = 1024) -> float:
    """max |scale q_i . k_j| over heads and pairs (grouped-query heads share keys), in chunks of queries."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    best = 0.0
    for start in range(0, q.shape[2], chunk):
        best = max(best, float((q[:, :, start:start + chunk] @ k.transpose(-1, -2)).abs().max()) * abs(scale))
    return best


def _query_key_views(parts: dict[str, nn.Module], seen: dict) -> tuple[list[tuple], list[tuple], str]:
    """([(X, output, delta, W*)] for the query and the key projection, [(delta, W*)] of every adapted
    projection, "q,k,v"-style names of the adapted ones). GPT-2's packed c_attn is cut into thirds."""
    if "c_attn" in parts:
        x, out = seen["c_attn"]
        width = out.shape[-1] // 3
        delta, base = _delta_and_base(parts["c_attn"])
        views = [(x, out[..., i * width:(i + 1) * width], None if delta is None else delta[i * width:(i + 1) * width],
                  base[i * width:(i + 1) * width]) for i in (0, 1)]
        return views, [(delta, base)], "q,k,v"
    pairs = {p: _delta_and_base(module) for p, module in parts.items()}
    views = [(*seen[p], *pairs[p]) for p in ("q_proj", "k_proj")]
    adapted = [p for p in SEPARATE if isinstance(parts.get(p), AdaptedLinear)]
    return views, [pairs[p] for p in adapted], ",".join(p[0] for p in adapted)


def _product_max(x: torch.Tensor, weight: torch.Tensor | None) -> float | None:
    """||X W^T||_max for an (out, in) weight."""
    return None if weight is None else float((x @ weight.T.to(x)).abs().max())


def _layer_limits(name: str, module: nn.Module, parts: dict[str, nn.Module], seen: dict, tolerance: float,
                  threshold_scale: float) -> AttentionLimits:
    views, adapted_weights, adapted = _query_key_views(parts, seen)
    (xq, q, _, _), (xk, k, _, _) = views
    head_dim, scale = _head_layout(module, q.shape[-1])
    with torch.no_grad():
        xw = max(_product_max(x, base) for x, _, _, base in views)
        xd = [_product_max(x, delta) for x, _, delta, _ in views]
        r_max = logit_range(_split_heads(q, head_dim), _split_heads(k, head_dim), scale)
    deltas = [_max_abs(d) for d, _ in adapted_weights]
    seq_len = q.shape[-2]
    q_max, k_max = _max_abs(q), _max_abs(k)
    gamma = math.sqrt(abs(scale) * head_dim) * max(q_max, k_max)
    threshold = math.sqrt(math.log(seq_len)) if seq_len > 1 else 0.0
    degree = degree_for(r_max, tolerance)
    rank = None if degree is None else feature_rank(head_dim, degree)
    return AttentionLimits(
        layer=name, adapted=adapted, seq_len=seq_len, heads=q.shape[-1] // head_dim, head_dim=head_dim,
        scale=scale, x_max=max(_max_abs(xq), _max_abs(xk)), w_max=max(_max_abs(b) for _, b in adapted_weights),
        delta_max=None if None in deltas else max(deltas), xw_max=xw,
        xdelta_max=None if None in xd else max(xd), q_max=q_max, k_max=k_max, gamma=gamma, threshold=threshold,
        side="below" if gamma < threshold_scale * threshold else "above", logit_range=r_max,
        degree=degree, rank=rank, pays=rank is not None and rank < seq_len)


def measure_limits(model: nn.Module, run_batch, tolerance: float = 1e-3,
                   threshold_scale: float = 1.0) -> LimitsReport:
    """Run ``run_batch()`` (one forward of a real batch) with every adapted attention layer hooked and
    return the paper's quantities per layer. Raises ``mm.ConfigError`` when the model has no adapted
    attention layer or a found layer did not run."""
    layers = attention_layers(model)
    if not layers:
        raise ConfigError("no adapted attention layer (q_proj/k_proj/v_proj or c_attn carrying an adapter): "
                          "target the attention projections to measure LoRA's limits")
    with ExitStack() as stack, torch.no_grad():
        seen = {name: stack.enter_context(_capture(parts)) for name, parts in layers.items()}
        run_batch()
    modules = dict(model.named_modules())
    rows = []
    for name, parts in layers.items():
        missing = [p for p in parts if p != "v_proj" and p not in seen[name]]
        if missing:
            raise ConfigError(f"{name}: {', '.join(missing)} did not run in the batch's forward")
        rows.append(_layer_limits(name, modules[name], parts, seen[name], tolerance, threshold_scale))
    return LimitsReport(rows, tolerance, threshold_scale)
