"""MixLoRA speed and memory: mmtune's whole-FFN experts vs the paper-literal per-expert loop vs dense LoRA.

The Llama of bench_lora.py (4 layers, hidden 512, intermediate 1376, batch 8 x 256 tokens, fp32), with
adapters on the MLP projections gate/up/down. All MixLoRA rows hold the same weights and compute the same
function, ``sum_j g_j FFN_{e_j}(x)`` over each token's top-2 of 8 experts (checked first):

- MixLoRA, 8 experts of rank 8, top-2, default dispatch ('auto' = 'masked' at E*r = 64): the frozen gate/up
  weights run once per token, each (token, expert) row gets its expert's LoRA (all experts' A in one matmul,
  the routing as a mask on the r-wide hidden), and the frozen down weight runs once on the gate-weighted
  rows (mm.adapters.moe_ffn);
- the same with the 'grouped' dispatch (rows sorted by expert into padded batched matmuls);
- the naive per-expert loop, as MixLoRA's reference code and Mixtral's HF block run it: for each expert,
  find its tokens with torch.where, run the whole FFN with that expert's LoRAs on them (frozen weights
  included), scale by the gates and index_add into the output (bench-only);
- dense LoRA of rank 16 = top_k x 8, the same active rank per token.

Measured in one run, timed in interleaved rounds (benchlib): a training step (forward, backward with the
balance loss, AdamW), one MLP block's forward + backward alone, and a training step's peak memory (CPU: RSS
growth of a fresh process per row; CUDA: max allocated). Ratios are against the default row in the same run.

    .venv/bin/python scripts/bench_moe.py                 # full size, a few minutes on 2 cores
    .venv/bin/python scripts/bench_moe.py --threads 1     # steadier on a loaded machine
    .venv/bin/python scripts/bench_moe.py --device cuda   # on a GPU (timing synchronises the device)
    .venv/bin/python scripts/bench_moe.py --quick         # tiny model: a smoke test of the script
"""

from __future__ import annotations

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
    "naive": f"MixLoRA {EXPERTS}x r{RANK} top-{TOP_K}, naive per-expert FFN loop",
    "dense": f"dense LoRA r{TOP_K * RANK} (equal active rank)",
}
MIXTURES = ("default", "grouped", "naive")


def naive_mlp_forward(mlp) -> Callable:
    """The paper-literal loop for one LlamaMLP whose projections carry a MixLoRA: per expert, its tokens' FFN."""
    import torch
    import torch.nn.functional as F

    projections = [getattr(mlp, name) for name in TARGETS]
    gate, up, down = ((p.base, p.adapters["default"]) for p in projections)
    router = gate[1].router

    def expert_proj(pair, rows, expert):
        base, adapter = pair
        lora = F.linear(F.linear(rows, adapter.lora_A[expert]), adapter.lora_B[expert])
        return base(rows) + adapter.scaling * lora

    def forward(x):
        flat = x.reshape(-1, x.shape[-1])
        routing = router.route(flat, x)  # the library's router: same choices, same balance loss
        out = torch.zeros_like(flat)
        mask = F.one_hot(routing.experts, router.num_experts).permute(2, 1, 0)  # (E, k, T)
        for expert in range(router.num_experts):
            choice, token = torch.where(mask[expert])
            if token.numel() == 0:
                continue
            rows = flat[token]
            hidden = mlp.act_fn(expert_proj(gate, rows, expert)) * expert_proj(up, rows, expert)
            result = expert_proj(down, hidden, expert) * routing.gates[token, choice].unsqueeze(-1)
            out = out.index_add(0, token, result.to(out.dtype))
        return out.view_as(x)

    return forward


def _sizes_for_model(sizes: dict) -> dict:
    return {k: sizes[k] for k in ("layers", "hidden", "intermediate", "heads", "vocab")}


def build(row: str, sizes: dict, device: str = "cpu"):
    """The bench Llama with the row's adapter; B gets small seeded values so the update is not a no-op."""
    import torch

    import mm
    from mm.adapters.mixlora import MixLoRAConfig

    model = benchlib.bench_llama(seed=0, **_sizes_for_model(sizes))
    if row == "dense":
        mm.attach(model, mm.LoRAConfig(targets=TARGETS, r=TOP_K * RANK, alpha=2 * ALPHA))
    else:
        mm.attach(model, MixLoRAConfig(targets=TARGETS, r=RANK, alpha=ALPHA, num_experts=EXPERTS, top_k=TOP_K,
                                       dispatch="grouped" if row == "grouped" else "auto"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in mm.adapted_layers(model):
            adapter = layer.adapters["default"]
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=generator) * 0.02)
            if getattr(adapter, "owns_router", False):  # a trained-looking router: spread, not uniform
                adapter.router.weight.copy_(torch.randn(adapter.router.weight.shape, generator=generator) * 0.05)
    if row == "naive":
        for layer in model.model.layers:
            layer.mlp.forward = naive_mlp_forward(layer.mlp)
    return model.to(device)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def train_step_fn(model, batch: dict, device: str = "cpu") -> Callable[[], None]:
    import torch

    from mm.adapters.moe import aux_loss

    model.train()
    batch = {key: value.to(device) for key, value in batch.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def train_step() -> None:
        (model(**batch).loss + aux_loss(model)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _synchronize(device)

    return train_step


def block_fn(model, sizes: dict, device: str = "cpu") -> Callable[[], None]:
    """Forward + backward of one adapted MLP block alone, on a batch of hidden states."""
    import torch

    mlp = model.model.layers[0].mlp
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(sizes["batch"], sizes["seq"], sizes["hidden"], generator=generator).to(device)

    def block() -> None:
        x = hidden.detach().requires_grad_(True)
        mlp(x).pow(2).mean().backward()
        for p in mlp.parameters():
            p.grad = None
        _synchronize(device)

    return block


def setup(row: str, **sizes) -> Callable[[], None]:
    """Build only what ``row`` needs and return its training step (benchlib.peak_rss_mib runs this)."""
    batch = benchlib.bench_batch(batch=sizes["batch"], seq=sizes["seq"], vocab=sizes["vocab"], seed=0)
    return train_step_fn(build(row, sizes), batch)


def check_same_logits(models: dict, batch: dict, device: str) -> None:
    import torch

    with torch.no_grad():
        logits = {row: model(input_ids=batch["input_ids"].to(device)).logits for row, model in models.items()}
    for row in MIXTURES[1:]:
        torch.testing.assert_close(logits[row], logits["default"], rtol=1e-4, atol=1e-4, msg=row)


def cuda_peaks(models: dict, batch: dict, device: str) -> dict[str, float]:
    """Peak allocated MiB above the resident model during one training step, per row (CUDA)."""
    import torch

    peaks = {}
    for row, model in models.items():
        step = train_step_fn(model, batch, device)
        step()  # optimizer state exists from here on
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        peaks[row] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return peaks


def measure(sizes: dict, rounds: int, steps: int, memory: bool, device: str):
    """(step Timing, block Timing, peak MiB or {}, trainable params, tokens per expert) per row."""
    import torch

    from mm.adapters.moe import router_stats

    batch = benchlib.bench_batch(batch=sizes["batch"], seq=sizes["seq"], vocab=sizes["vocab"], seed=0)
    models = {row: build(row, sizes, device) for row in ROWS}
    check_same_logits({row: models[row] for row in MIXTURES}, batch, device)
    params = {row: sum(p.numel() for p in m.parameters() if p.requires_grad) for row, m in models.items()}
    load = router_stats(models["default"])[0].tokens_per_expert
    print(f"timing {len(ROWS)} variants: {rounds} rounds x {steps} steps on {device}, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)
    step = benchlib.time_interleaved({r: train_step_fn(m, batch, device) for r, m in models.items()}, rounds, steps,
                                     device=device)
    block = benchlib.time_interleaved({r: block_fn(m, sizes, device) for r, m in models.items()}, rounds, steps,
                                      device=device)
    peaks = {}
    if memory and device.startswith("cuda"):
        peaks = cuda_peaks(models, batch, device)
    elif memory:
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
         "peak memory MiB", "vs default", "trainable params"], rows)
    step = {key: timing.median_ms for key, timing in step.items()}
    block = {key: timing.median_ms for key, timing in block.items()}
    lines = [
        f"- naive per-expert FFN loop / default, training step: {step['naive'] / step[ref]:.2f}x "
        f"(MLP block: {block['naive'] / block[ref]:.2f}x)",
        f"- default / dense LoRA of equal active rank, training step: {step[ref] / step['dense']:.2f}x "
        f"(MLP block: {block[ref] / block['dense']:.2f}x)",
        f"- grouped / default, training step: {step['grouped'] / step[ref]:.2f}x "
        f"(MLP block: {block['grouped'] / block[ref]:.2f}x)",
    ]
    if peaks:
        lines.append(f"- training-step peak memory: default / dense LoRA {peaks[ref] / peaks['dense']:.2f}x, "
                     f"naive / default {peaks['naive'] / peaks[ref]:.2f}x")
    return table + "\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = benchlib.bench_parser(__doc__.splitlines()[0], rounds=4)
    args = parser.parse_args(argv)
    sizes = benchlib.resolve_sizes(parser, QUICK if args.quick else FULL, args.size)
    benchlib.check_device(parser, args.device)  # --device comes from benchlib.bench_parser
    import torch

    benchlib.set_threads(args.threads)
    step, block, peaks, params, load = measure(sizes, args.rounds, args.steps, not args.no_memory, args.device)
    shape = ", ".join(f"{k} {v}" for k, v in sizes.items())
    text = (f"Adapters on {','.join(TARGETS)}; Llama {shape}; {benchlib.describe_device(args.device)}, "
            f"torch {torch.__version__}; "
            f"tokens per expert in layer 0: {load}\n\n" + report(step, block, peaks, params))
    print(text)
    return text


if __name__ == "__main__":
    main()
