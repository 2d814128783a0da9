"""Near-linear attention gradient (mm.poly_attention) vs exact attention as the sequence grows.

The approximation of Hu et al. (2024, arXiv 2406.03136) and Alman & Song (2023): exp(q.k) replaced by its
degree-g Taylor polynomial, written as features(q) . features(k) of width m = C(d+g, g), so attention and
its gradient cost O(L m d) instead of O(L^2 d). For each sequence length L this script times one forward +
backward of ``polynomial_attention`` and of exact attention (``F.scaled_dot_product_attention``, autograd),
in interleaved rounds (benchlib), and measures the gradient's relative error (max over dq, dk, dv of
||approx - exact|| / ||exact||) with the entries of q and k drawn in [-B, B] (Alman & Song's scaling,
softmax(q k^T / d)) at B = 0.5 sqrt(log L) (below the paper's threshold) and B = 2 sqrt(log L) (above).

Sizes are chosen for a shared 2-core CPU: ONE head of small size d (default 8), batch 1, fp32. The exact
side is a fused kernel (flash attention on CPU and GPU) whose L^2 work is cheap per element; the
polynomial side pays m = C(d+g, g) per token (495 at d=8, g=4), so it only wins once L is well above m,
and its width grows as d^g: at a real head size (d=64, g=4: m = 814,385) it never pays. The table and the
closing line say where it does and does not pay on the machine it ran on.

    .venv/bin/python scripts/bench_limits.py                  # L = 256 .. 8192, a few minutes on 2 cores
    .venv/bin/python scripts/bench_limits.py --causal         # causal masks (chunked prefix states)
    .venv/bin/python scripts/bench_limits.py --size d=16 degree=2
    .venv/bin/python scripts/bench_limits.py --device cuda    # on a GPU (timing synchronises the device)
    .venv/bin/python scripts/bench_limits.py --quick          # tiny sizes: a smoke test of the script
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib, when imported from elsewhere

import benchlib  # noqa: E402

FULL = {"d": 8, "degree": 4, "heads": 1, "batch": 1, "min_seq": 256, "max_seq": 8192, "chunk": 64}
QUICK = {"d": 4, "degree": 4, "heads": 1, "batch": 1, "min_seq": 32, "max_seq": 64, "chunk": 16}
BELOW, ABOVE = 0.5, 2.0  # entry bound B as a multiple of sqrt(log L)


def inputs(sizes: dict[str, int], length: int, bound: float, device: str, seed: int = 0):
    """q, k with entries uniform in [-bound, bound]; v and the output gradient standard normal."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    shape = (sizes["batch"], sizes["heads"], length, sizes["d"])
    q, k = ((torch.rand(shape, generator=gen) * 2 - 1) * bound for _ in range(2))
    v, grad = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    return benchlib.to_device((q, k, v, grad), device)


def attention_step(kind: str, sizes: dict[str, int], causal: bool):
    """(q, k, v, grad_out) -> (dq, dk, dv) of exact or polynomial attention, scale 1/d."""
    import torch
    import torch.nn.functional as F

    from mm.poly_attention import polynomial_attention

    scale = 1.0 / sizes["d"]

    def step(q, k, v, grad_out):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        if kind == "exact":
            out = F.scaled_dot_product_attention(*leaves, is_causal=causal, scale=scale)
        else:
            out = polynomial_attention(*leaves, scale=scale, degree=sizes["degree"], causal=causal,
                                       chunk=sizes["chunk"])
        return torch.autograd.grad(out, leaves, grad_out)

    return step


def gradient_error(sizes: dict[str, int], length: int, bound: float, causal: bool, device: str) -> float:
    q, k, v, grad_out = inputs(sizes, length, bound, device, seed=1)
    exact = attention_step("exact", sizes, causal)(q, k, v, grad_out)
    approx = attention_step("poly", sizes, causal)(q, k, v, grad_out)
    return max(float((a - e).norm() / e.norm()) for a, e in zip(approx, exact, strict=True))


def lengths(sizes: dict[str, int]) -> list[int]:
    out, length = [], sizes["min_seq"]
    while length <= sizes["max_seq"]:
        out.append(length)
        length *= 2
    return out


def clock_for(device: str) -> str:
    """CPU seconds of this process on the CPU (steady on a shared, oversubscribed machine: waiting for a core
    is not counted; all torch threads' work is), wall time on a GPU."""
    return "wall" if benchlib.is_cuda(device) else "cpu"


def measure(sizes: dict[str, int], causal: bool, rounds: int, steps: int, device: str) -> list[dict]:
    from mm.poly_attention import feature_rank

    rows = []
    for length in lengths(sizes):
        tensors = inputs(sizes, length, BELOW * math.sqrt(math.log(length)), device)
        steps_by_kind = {kind: attention_step(kind, sizes, causal) for kind in ("exact", "poly")}
        timings = benchlib.time_interleaved({kind: (lambda f=f, t=tensors: f(*t)) for kind, f in steps_by_kind.items()},
                                            rounds=rounds, steps=steps, device=device, clock=clock_for(device))
        rows.append({
            "L": length, "rank": feature_rank(sizes["d"], sizes["degree"]),
            "exact_ms": timings["exact"].median_ms, "poly_ms": timings["poly"].median_ms,
            "error_below": gradient_error(sizes, length, BELOW * math.sqrt(math.log(length)), causal, device),
            "error_above": gradient_error(sizes, length, ABOVE * math.sqrt(math.log(length)), causal, device),
        })
    return rows


def verdict(rows: list[dict]) -> str:
    """Where the polynomial path is faster than exact attention in this run, said plainly."""
    faster = [r["L"] for r in rows if r["poly_ms"] < r["exact_ms"]]
    if not faster:
        return (f"On this hardware the approximation does not pay at any measured length (L = {rows[0]['L']} to "
                f"{rows[-1]['L']}): exact attention is faster everywhere.")
    if faster != [r["L"] for r in rows if r["L"] >= faster[0]]:
        return f"The approximation is faster at L = {', '.join(map(str, faster))} only: no clean crossover."
    if faster[0] == rows[0]["L"]:
        return f"On this hardware the approximation is faster at every measured length (from L = {faster[0]})."
    return (f"On this hardware the approximation pays from L = {faster[0]}; it does not pay below "
            f"(L < {faster[0]}: exact attention is faster).")


def report(rows: list[dict]) -> str:
    header = ["L", "feature rank m", "exact fwd+bwd ms", "poly fwd+bwd ms", "poly / exact",
              f"grad rel. error, B={BELOW} sqrt(log L)", f"grad rel. error, B={ABOVE} sqrt(log L)"]
    table = [[r["L"], r["rank"], r["exact_ms"], r["poly_ms"], f"{r['poly_ms'] / r['exact_ms']:.2f}x",
              f"{r['error_below']:.1e}", f"{r['error_above']:.1e}"] for r in rows]
    return benchlib.markdown_table(header, table) + "\n\n" + verdict(rows)


def main(argv: list[str] | None = None) -> str:
    parser = benchlib.bench_parser(__doc__.splitlines()[0], rounds=3)
    parser.add_argument("--causal", action="store_true", help="causal attention (as in a decoder LM)")
    args = parser.parse_args(argv)
    sizes = benchlib.resolve_sizes(parser, QUICK if args.quick else FULL, args.size)
    if sizes["degree"] % 2:
        parser.error(f"--size degree={sizes['degree']}: expected an even degree (an odd Taylor polynomial "
                     f"of exp can be negative)")
    if sizes["min_seq"] > sizes["max_seq"]:
        parser.error("--size min_seq must be <= max_seq")
    benchlib.check_device(parser, args.device)
    import torch

    benchlib.set_threads(args.threads)
    rows = measure(sizes, args.causal, args.rounds, args.steps, args.device)
    shape = ", ".join(f"{k} {v}" for k, v in sizes.items())
    text = (f"Polynomial (Taylor) attention vs exact attention, forward + backward, "
            f"{'causal' if args.causal else 'bidirectional'}; {shape}; {benchlib.describe_device(args.device)}, "
            f"torch {torch.__version__}; {clock_for(args.device)} clock; memory not measured\n\n" + report(rows))
    print(text)
    return text


if __name__ == "__main__":
    main()
