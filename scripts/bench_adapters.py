"""Every registered adapter method against plain LoRA of the same rank: forward, training step, peak memory.

Two workloads, each measured in one run and reported as ratios to LoRA measured in that same run:

- ``linear``: a fixed stack of 4 x (Linear(512, 512), GELU), 8 x 256 tokens, every Linear adapted;
- ``llama``: the bench Llama of bench_lora.py (benchlib.bench_llama: 4 layers, hidden 512, batch 8 x 256),
  adapters on q,k,v,o,gate,up,down.

Per method: trainable parameters, forward (no_grad) and training step (forward, backward, AdamW) medians
from interleaved rounds (benchlib.time_interleaved: load drift hits every method alike), and the peak-RSS
growth of two training steps in a fresh process (benchlib.peak_rss_mib). Methods whose config module has
a data-driven ``initialize`` (EVA, LoRA-GA, LoRA-SB) are skipped with the reason printed; so is any
method that cannot attach to a workload. Rows slower than 1.5x LoRA are flagged.

    .venv/bin/python scripts/bench_adapters.py                  # both workloads, about 15 minutes on 2 cores
    .venv/bin/python scripts/bench_adapters.py --no-memory      # timings only
    .venv/bin/python scripts/bench_adapters.py --quick          # tiny sizes: a smoke test of the script
    .venv/bin/python scripts/bench_adapters.py --device cuda    # on a GPU: synchronised timing, CUDA peak memory
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib, when imported from elsewhere

import benchlib  # noqa: E402

RANK = 16
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

#: Method options beyond ``r`` (their defaults otherwise). NOLA's bases are cached per layer, so the
#: benchmark keeps k at 64 (the trainable count is 2k per layer whatever k is; memory grows with k r d).
METHOD_OPTIONS: dict[str, dict] = {
    "block_lora": {"blocks": 4},
    "nola": {"num_basis_a": 64, "num_basis_b": 64},
    "mos": {"pool_shards": 64, "private_shards": 4},
    "mole": {"num_experts": 4},
    "mixlora": {"num_experts": 4, "top_k": 2},
    # One global LoRA of rank r (MS, PEFT-style parametrisation): equal rank to the baseline.
    "mtsk": {"strategy": "ms", "parametrisation": "lora"},
}

FULL = {
    "linear": {"width": 512, "depth": 4, "batch": 8, "seq": 256},
    "llama": {"layers": 4, "hidden": 512, "intermediate": 1376, "heads": 8, "vocab": 4096, "batch": 8, "seq": 256},
}
QUICK = {
    "linear": {"width": 64, "depth": 2, "batch": 2, "seq": 16},
    "llama": {"layers": 1, "hidden": 64, "intermediate": 128, "heads": 4, "vocab": 128, "batch": 2, "seq": 16},
}


def skip_reason(method: str) -> str | None:
    """Why ``method`` is not benchmarked (a data-driven initialiser), or None."""
    import mm

    module = sys.modules[mm.ADAPTERS.get(method).__module__]
    if callable(getattr(module, "initialize", None)):
        return f"needs data-driven init ({module.__name__}.initialize) before its first step"
    return None


def build(workload: str, method: str, sizes: dict, device: str = "cpu"):
    """(model, batch, loss_fn) for one workload with ``method`` attached at rank RANK, on ``device``."""
    import torch
    from torch import nn

    import mm

    if workload == "linear":
        torch.manual_seed(0)
        layers = []
        for _ in range(sizes["depth"]):
            layers += [nn.Linear(sizes["width"], sizes["width"]), nn.GELU()]
        model = nn.Sequential(*layers)
        targets = [str(2 * i) for i in range(sizes["depth"])]
        gen = torch.Generator().manual_seed(0)
        batch = torch.randn(sizes["batch"], sizes["seq"], sizes["width"], generator=gen)

        def loss_fn(m, b):
            return m(b).square().mean()
    else:
        model_sizes = {k: sizes[k] for k in ("layers", "hidden", "intermediate", "heads", "vocab")}
        model = benchlib.bench_llama(seed=0, **model_sizes)
        targets = LLAMA_TARGETS
        batch = benchlib.bench_batch(batch=sizes["batch"], seq=sizes["seq"], vocab=sizes["vocab"], seed=0)

        def loss_fn(m, b):
            return m(**b).loss
    config = mm.AdapterConfig.from_dict({"method": method, "targets": targets, "r": RANK,
                                         **METHOD_OPTIONS.get(method, {})})
    mm.attach(model, config)
    return model.to(device), benchlib.to_device(batch, device), loss_fn


def forward_fn(model, batch, loss_fn) -> Callable[[], None]:
    import torch

    model.eval()

    def forward() -> None:
        with torch.no_grad():
            loss_fn(model, batch)

    return forward


def train_step_fn(model, batch, loss_fn) -> Callable[[], None]:
    import torch

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def train_step() -> None:
        loss_fn(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train_step


def setup(workload: str, method: str, device: str = "cpu", **sizes) -> Callable[[], None]:
    """A training step of ``method`` on ``workload`` (benchlib.peak_memory_mib runs this in a child process)."""
    return train_step_fn(*build(workload, method, sizes, device))


def measure(workload: str, sizes: dict, methods: list[str], rounds: int, steps: int, memory: bool,
            device: str = "cpu"):
    """Per method: params, forward ms, train ms, peak MiB (or None); plus {method: skip reason}."""
    import mm

    built, skipped = {}, {}
    for method in methods:
        reason = skip_reason(method)
        if reason is None:
            try:
                built[method] = build(workload, method, sizes, device)
            except Exception as err:  # a method that cannot adapt this workload is reported, not fatal
                reason = f"cannot attach: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
        if reason is not None:
            skipped[method] = reason
            print(f"[{workload}] skip {method}: {reason}", file=sys.stderr)
    for method, parts in list(built.items()):
        try:  # one trial step: a method that breaks on this device (a CPU-only tensor, say) is reported
            train_step_fn(*parts)()
        except Exception as err:  # noqa: BLE001
            skipped[method] = f"fails on {device}: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
            print(f"[{workload}] skip {method}: {skipped[method]}", file=sys.stderr)
            del built[method]
    params = {m: sum(p.numel() for p in model.parameters() if p.requires_grad) for m, (model, _, _) in built.items()}
    variants = {}
    for method, parts in built.items():
        variants[(method, "forward")] = forward_fn(*parts)
        variants[(method, "train")] = train_step_fn(*parts)
    print(f"[{workload}] timing {len(variants)} variants, {rounds} rounds x {steps} steps", file=sys.stderr)
    timings = benchlib.time_interleaved(variants, rounds=rounds, steps=steps, warmup=1, device=device)
    del built, variants
    results = {}
    for method in params:
        peak = None
        if memory:
            print(f"[{workload}] peak memory: {method}", file=sys.stderr)
            peak = benchlib.peak_memory_mib(__file__, "setup", {"workload": workload, "method": method, **sizes},
                                            steps=2, device=device)["growth_mib"]
        results[method] = {"params": params[method], "forward": timings[(method, "forward")].median_ms,
                           "train": timings[(method, "train")].median_ms, "peak": peak}
    assert mm.ADAPTERS.get("lora")  # the baseline must exist
    return results, skipped


def report(workload: str, sizes: dict, results: dict, skipped: dict) -> str:
    base = results["lora"]
    rows, slow = [], []
    for method, res in results.items():
        fwd, train = res["forward"] / base["forward"], res["train"] / base["train"]
        mem = "-" if res["peak"] is None or not base["peak"] else f"{res['peak'] / base['peak']:.2f}x"
        flag = "SLOW" if max(fwd, train) > 1.5 else ""
        if flag:
            slow.append(method)
        rows.append([method, res["params"], res["forward"], f"{fwd:.2f}x", res["train"], f"{train:.2f}x",
                     "-" if res["peak"] is None else res["peak"], mem, flag])
    table = benchlib.markdown_table(
        ["method", "trainable", "fwd ms", "fwd / LoRA", "step ms", "step / LoRA", "peak MiB", "peak / LoRA",
         "> 1.5x"], rows)
    shape = ", ".join(f"{k} {v}" for k, v in sizes.items())
    lines = [f"## {workload} ({shape}), r={RANK}", "", table, ""]
    lines += [f"- skipped {m}: {reason}" for m, reason in skipped.items()]
    if slow:
        lines.append(f"- slower than 1.5x LoRA: {', '.join(slow)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = benchlib.bench_parser(__doc__.splitlines()[0], rounds=3)
    parser.add_argument("--workloads", nargs="+", default=["linear", "llama"], choices=["linear", "llama"])
    parser.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    args = parser.parse_args(argv)
    tables = QUICK if args.quick else FULL
    known = sorted({key for table in tables.values() for key in table})
    all_sizes = {w: benchlib.resolve_sizes(parser, table, args.size, known) for w, table in tables.items()}
    device = benchlib.check_device(parser, args.device)
    import torch

    import mm

    benchlib.set_threads(args.threads)
    methods = args.methods or mm.ADAPTERS.names()
    methods = ["lora"] + [m for m in methods if m != "lora"]  # the baseline first
    sections = [f"Adapter methods vs LoRA at r={RANK}; {benchlib.describe_device(device)}, torch {torch.__version__}; "
                f"peak MiB = {benchlib.memory_label(device)}"]
    print(sections[0], flush=True)
    for workload in args.workloads:
        results, skipped = measure(workload, all_sizes[workload], methods, args.rounds, args.steps,
                                   memory=not args.no_memory, device=device)
        sections.append(report(workload, all_sizes[workload], results, skipped))
        print("\n" + sections[-1], flush=True)  # each workload as soon as it is measured
    return "\n\n".join(sections)


if __name__ == "__main__":
    main()
