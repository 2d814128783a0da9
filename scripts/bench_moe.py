"""MixLoRA dispatch speed and memory: mmtune's dispatch vs per-expert loops vs dense LoRA of equal active rank.

The Llama of bench_lora.py (4 layers, hidden 512, intermediate 1376, batch 8 x 256 tokens, fp32 CPU), with
adapters on the MLP projections gate/up/down:

- MixLoRA, 8 experts of rank 8, top-2, default dispatch ('auto' = 'masked' here: every expert's r-wide
  projection in one matmul, the routing as a sparse gate mask, B accumulated into the base output);
- the same with the 'grouped' dispatch (tokens sorted by expert into padded batched matmuls);
- the same with a sorted loop (tokens sorted once, one matmul pair per expert's slice; bench-only);
- the same with the naive per-expert loop of Mixtral's and MoLA's reference code (for each expert: find
  its tokens with torch.where, gather, compute, index_add; bench-only);
- dense LoRA of rank 16 = top_k x 8, the same active rank per token.

All MixLoRA variants hold the same weights and must give the same logits (checked first). Measured in one
run, timed in interleaved rounds (benchlib): a training step (forward, backward with the balance loss,
AdamW), one MLP block's forward + backward alone, and a training step's peak RSS growth (each in a fresh
process). Ratios are against the default dispatch in the same run.

    .venv/bin/python scripts/bench_moe.py            # full size, a few minutes on 2 cores
    .venv/bin/python scripts/bench_moe.py --quick    # tiny model: a smoke test of the script
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib, when imported from elsewhere

import benchlib  # noqa: E402

TARGETS = ["gate_proj", "up_proj", "down_proj"]
EXPERTS, TOP_K, RANK, ALPHA = 8, 2, 8, 16.0
FULL = {"layers": 4, "hidden": 512, "intermediate": 1376, "heads": 8, "vocab": 4096, "batch": 8, "seq": 256}
QUICK = {"layers": 2, "hidden": 64, "intermediate": 172, "heads": 4, "vocab": 256, "batch": 2, "seq": 32}

#: Row key -> label, in table order.
ROWS = {
    "default": f"MixLoRA {EXPERTS}x r{RANK} top-{TOP_K}, default (masked) dispatch",
    "grouped": f"MixLoRA {EXPERTS}x r{RANK} top-{TOP_K}, grouped dispatch",
    "loop": f"MixLoRA {EXPERTS}x r{RANK} top-{TOP_K}, sorted loop over experts",
    "naive": f"MixLoRA {EXPERTS}x r{RANK} top-{TOP_K}, naive per-expert loop",
    "dense": f"dense LoRA r{TOP_K * RANK} (equal active rank)",
}
MIXTURES = ("default", "grouped", "loop", "naive")


def sorted_loop_delta(x, experts, gates, lora_A, lora_B):
    """Rows sorted by expert once, then one matmul pair per expert's contiguous slice."""
    import torch

    tokens, k = experts.shape
    flat = experts.reshape(-1)
    order = flat.argsort(stable=True)
    counts = flat.bincount(minlength=lora_A.shape[0]).tolist()
    token = order // k
    rows, scale = x[token], gates.reshape(-1)[order].unsqueeze(-1)
    pieces = [(r @ lora_A[e].T * g) @ lora_B[e].T
              for e, (r, g) in enumerate(zip(rows.split(counts), scale.split(counts), strict=True)) if len(r)]
    return x.new_zeros(tokens, lora_B.shape[1]).index_add(0, token, torch.cat(pieces))


def naive_delta(x, experts, gates, lora_A, lora_B):
    """The reference per-expert loop: torch.where finds each expert's (slot, token) pairs; index_add back."""
    import torch
    import torch.nn.functional as F

    out = x.new_zeros(x.shape[0], lora_B.shape[1])
    mask = F.one_hot(experts, lora_A.shape[0]).permute(2, 1, 0)  # (E, k, T)
    for expert in range(lora_A.shape[0]):
        slot, token = torch.where(mask[expert])
        if token.numel() == 0:
            continue
        hidden = x[token] @ lora_A[expert].T * gates[token, slot].unsqueeze(-1)
        out = out.index_add(0, token, hidden @ lora_B[expert].T)
    return out


def _sizes_for_model(sizes: dict) -> dict:
    return {k: sizes[k] for k in ("layers", "hidden", "intermediate", "heads", "vocab")}


def build(row: str, sizes: dict):
    """The bench Llama with the row's adapter; B gets small seeded values so the update is not a no-op."""
    import torch

    import mm
    from mm.adapters.mixlora import MixLoRAConfig

    model = benchlib.bench_llama(seed=0, **_sizes_for_model(sizes))
    if row == "dense":
        mm.attach(model, mm.LoRAConfig(targets=TARGETS, r=TOP_K * RANK, alpha=2 * ALPHA))
    else:
        dispatch = "grouped" if row == "grouped" else "auto"
        mm.attach(model, MixLoRAConfig(targets=TARGETS, r=RANK, alpha=ALPHA, num_experts=EXPERTS, top_k=TOP_K,
                                       dispatch=dispatch))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in mm.adapted_layers(model):
            adapter = layer.adapters["default"]
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=generator) * 0.02)
            if row in ("naive", "loop"):
                adapter.dispatch = naive_delta if row == "naive" else sorted_loop_delta
            if getattr(adapter, "owns_router", False):  # a trained-looking router: spread, not uniform
                adapter.router.weight.copy_(torch.randn(adapter.router.weight.shape, generator=generator) * 0.05)
    return model


def train_step_fn(model, batch: dict) -> Callable[[], None]:
    import torch

    from mm.adapters.moe import aux_loss

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def train_step() -> None:
        (model(**batch).loss + aux_loss(model)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train_step


def block_fn(model, sizes: dict) -> Callable[[], None]:
    """Forward + backward of one adapted MLP block alone, on a batch of hidden states."""
    import torch

    mlp = model.model.layers[0].mlp
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(sizes["batch"], sizes["seq"], sizes["hidden"], generator=generator)

    def block() -> None:
        x = hidden.detach().requires_grad_(True)
        mlp(x).pow(2).mean().backward()
        for p in mlp.parameters():
            p.grad = None

    return block


def setup(row: str, **sizes) -> Callable[[], None]:
    """Build only what ``row`` needs and return its training step (benchlib.peak_rss_mib runs this)."""
    batch = benchlib.bench_batch(batch=sizes["batch"], seq=sizes["seq"], vocab=sizes["vocab"], seed=0)
    return train_step_fn(build(row, sizes), batch)


def check_same_logits(models: dict, batch: dict) -> None:
    import torch

    with torch.no_grad():
        logits = {row: model(input_ids=batch["input_ids"]).logits for row, model in models.items()}
    for row in MIXTURES[1:]:
        torch.testing.assert_close(logits[row], logits["default"], rtol=1e-4, atol=1e-4, msg=row)


def measure(sizes: dict, rounds: int, steps: int, memory: bool):
    """(step Timing, block Timing, peak MiB or {}, trainable params, tokens per expert) per row."""
    import torch

    from mm.adapters.moe import router_stats

    batch = benchlib.bench_batch(batch=sizes["batch"], seq=sizes["seq"], vocab=sizes["vocab"], seed=0)
    models = {row: build(row, sizes) for row in ROWS}
    check_same_logits({row: models[row] for row in MIXTURES}, batch)
    params = {row: sum(p.numel() for p in m.parameters() if p.requires_grad) for row, m in models.items()}
    load = router_stats(models["default"])[0].tokens_per_expert
    print(f"timing {len(ROWS)} variants: {rounds} rounds x {steps} steps, {torch.get_num_threads()} threads",
          file=sys.stderr)
    step = benchlib.time_interleaved({r: train_step_fn(m, batch) for r, m in models.items()}, rounds, steps)
    block = benchlib.time_interleaved({r: block_fn(m, sizes) for r, m in models.items()}, rounds, steps)
    peaks = {}
    if memory:
        del models
        for row in ROWS:
            print(f"peak memory: {row}", file=sys.stderr)
            peaks[row] = benchlib.peak_rss_mib(__file__, "setup", {"row": row, **sizes}, steps=2)["growth_mib"]
    return step, block, peaks, params, load


def report(step: dict, block: dict, peaks: dict, params: dict) -> str:
    ref = "default"
    rows = []
    for key, label in ROWS.items():
        peak = peaks.get(key)
        rows.append([label, step[key].median_ms, f"{step[key].median_ms / step[ref].median_ms:.2f}x",
                     "{:.0f}-{:.0f}".format(*step[key].spread_ms), block[key].median_ms,
                     f"{block[key].median_ms / block[ref].median_ms:.2f}x", "-" if peak is None else peak,
                     "-" if peak is None else f"{peak / peaks[ref]:.2f}x", params[key]])
    table = benchlib.markdown_table(
        ["", "train step ms", "vs default", "step min-max ms", "MLP block fwd+bwd ms", "vs default",
         "peak RSS growth MiB", "vs default", "trainable params"], rows)
    step = {key: timing.median_ms for key, timing in step.items()}
    block = {key: timing.median_ms for key, timing in block.items()}
    lines = [
        f"- naive per-expert loop / default, training step: {step['naive'] / step[ref]:.2f}x "
        f"(MLP block: {block['naive'] / block[ref]:.2f}x)",
        f"- default / dense LoRA of equal active rank, training step: {step[ref] / step['dense']:.2f}x "
        f"(MLP block: {block[ref] / block['dense']:.2f}x)",
        f"- grouped / default, training step: {step['grouped'] / step[ref]:.2f}x "
        f"(MLP block: {block['grouped'] / block[ref]:.2f}x)",
        f"- sorted loop / default, training step: {step['loop'] / step[ref]:.2f}x "
        f"(MLP block: {block['loop'] / block[ref]:.2f}x)",
    ]
    if peaks:
        lines.append(f"- default / dense LoRA, training-step peak memory: {peaks[ref] / peaks['dense']:.2f}x")
    return table + "\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model: smoke-test the script")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=2, help="timed calls per variant per round")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    step, block, peaks, params, load = measure(sizes, args.rounds, args.steps, memory=not args.no_memory)
    shape = ", ".join(f"{k} {v}" for k, v in sizes.items())
    text = (f"Adapters on {','.join(TARGETS)}; Llama {shape}; fp32 CPU, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; tokens per expert in layer 0: {load}\n\n"
            + report(step, block, peaks, params))
    print(text)
    return text


if __name__ == "__main__":
    main()
