"""Many adapters on one base: mixed-adapter forward, adapter-pool memory, several adapters trained at once.

The tiny Llama of bench_lora.py (4 layers, hidden 512), LoRA r=16 alpha 32 on all seven projections, fp32.
One run, same weights, outputs checked equal before anything is timed (interleaved rounds, see benchlib):

- forward (no_grad), N rows of ``seq`` tokens, row i through adapter i, at N = 8, 32, 256: mmtune's single-
  adapter batch (every row adapter 0), its mixed batch (``mm.route(row_adapters=...)``: the gathered kernel),
  the old per-adapter loop (``gathered=False``), and PEFT's single and mixed (``adapter_names``) batches;
- pool: device bytes of an ``mm.AdapterPool`` (32 slots) and this process's RSS with 1 .. 1000 adapters
  registered (from 8 distinct files, each registered under many names), after serving a mixed batch;
- training: K = 4 adapters, ``rows`` rows each: one step on the mixed batch (forward, backward, AdamW)
  against K single-adapter steps on the same rows.

    .venv/bin/python scripts/bench_serve.py --threads 1 --clock cpu    # CPU, steadiest on a shared machine
    .venv/bin/python scripts/bench_serve.py --quick                    # tiny sizes: a smoke test
    .venv/bin/python scripts/bench_serve.py --device cuda              # GPU: synchronised timing
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib, when imported from elsewhere

import benchlib  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32
FULL = {"layers": 4, "hidden": 512, "intermediate": 1376, "heads": 8, "vocab": 4096, "seq": 32, "rows": 1,
        "slots": 32}
QUICK = {"layers": 1, "hidden": 32, "intermediate": 64, "heads": 4, "vocab": 64, "seq": 8, "rows": 1, "slots": 4}
FULL_COUNTS = {"forward": (8, 32, 256), "pool": (1, 8, 32, 256, 1000), "train": 4}
QUICK_COUNTS = {"forward": (2, 4), "pool": (1, 8, 40), "train": 4}


def build_models(sizes: dict, count: int, device: str, peft_too: bool = True):
    """(mmtune model, PEFT model or None) on one base with ``count`` LoRA adapters a0.. of identical weights
    in both (B seeded small random, so no adapter is a no-op)."""
    import torch

    import mm

    def llama():
        return benchlib.bench_llama(seed=0, **{k: sizes[k] for k in ("layers", "hidden", "intermediate", "heads", "vocab")})

    model = llama()
    generator = torch.Generator().manual_seed(1)
    for i in range(count):
        mm.attach(model, mm.LoRAConfig(targets=TARGETS, r=RANK, alpha=ALPHA), f"a{i}", active=i == 0)
    with torch.no_grad():
        for _, layer in mm.adapted_layers(model):
            for adapter in layer.adapters.values():
                adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=generator) * 0.02)
    peft_model = build_peft(model, llama(), count) if peft_too else None
    return model.to(device).eval(), None if peft_model is None else peft_model.to(device).eval()


def build_peft(mm_model, base, count: int):
    import peft
    import torch

    import mm

    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS)
    model = peft.get_peft_model(base, config, adapter_name="a0")
    for i in range(1, count):
        model.add_adapter(f"a{i}", config)
    inner = model.base_model.model
    with torch.no_grad():
        for name, layer in mm.adapted_layers(mm_model):
            target = inner.get_submodule(name)
            for adapter_name, adapter in layer.adapters.items():
                target.lora_A[adapter_name].weight.copy_(adapter.lora_A)
                target.lora_B[adapter_name].weight.copy_(adapter.lora_B)
    model.set_adapter("a0")
    return model


def forward_variants(model, peft_model, ids, names: list[str]) -> dict:
    import torch

    import mm

    def run(fn):
        def call():
            with torch.no_grad():
                return fn()
        return call

    def routed(gathered: bool):
        def forward():
            with mm.route(row_adapters=names, gathered=gathered):
                return model(input_ids=ids).logits
        return forward

    return {
        "mmtune single": run(lambda: model(input_ids=ids).logits),
        "mmtune mixed": run(routed(True)),
        "mmtune loop": run(routed(False)),
        "PEFT single": run(lambda: peft_model(input_ids=ids).logits),
        "PEFT mixed": run(lambda: peft_model(input_ids=ids, adapter_names=names).logits),
    }


def measure_forward(sizes: dict, counts, rounds: int, steps: int, clock: str, device: str) -> list[list]:
    import torch

    rows = []
    for count in counts:
        model, peft_model = build_models(sizes, count, device)
        ids = torch.randint(0, sizes["vocab"], (count, sizes["seq"]), generator=torch.Generator().manual_seed(2))
        ids = ids.to(device)
        names = [f"a{i}" for i in range(count)]
        variants = forward_variants(model, peft_model, ids, names)
        mixed = variants["mmtune mixed"]()
        torch.testing.assert_close(mixed, variants["PEFT mixed"](), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mixed, variants["mmtune loop"](), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(variants["mmtune single"](), variants["PEFT single"](), rtol=1e-4, atol=1e-4)
        if count > 1 and torch.allclose(mixed, variants["mmtune single"](), atol=1e-4):
            raise AssertionError("mixed and single batches agree: the adapters would not differ")
        print(f"forward N={count}: outputs equal; timing", file=sys.stderr)
        ms = {k: t.median_ms for k, t in benchlib.time_interleaved(
            variants, rounds=rounds, steps=steps, clock=clock, device=device).items()}
        rows.append([count, ms["mmtune single"], ms["mmtune mixed"], f"{ms['mmtune mixed'] / ms['mmtune single']:.3f}x",
                     ms["mmtune loop"], f"{ms['mmtune loop'] / ms['mmtune single']:.3f}x", ms["PEFT single"],
                     ms["PEFT mixed"], f"{ms['PEFT mixed'] / ms['PEFT single']:.3f}x",
                     f"{ms['PEFT mixed'] / ms['mmtune mixed']:.2f}x"])
        del model, peft_model, variants
    return rows


def _rss_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def measure_pool(sizes: dict, counts, device: str) -> list[list]:
    """Device bytes and RSS with more and more adapters registered; each row serves one mixed batch."""
    import time

    import torch

    import mm

    model, _ = build_models(sizes, 8, "cpu", peft_too=False)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        files = [mm.save_adapters(model, Path(folder) / f"a{i}.safetensors", [f"a{i}"]) for i in range(8)]
        base, _ = build_models(sizes, 0, device, peft_too=False)
        for count in counts:
            pool = mm.AdapterPool(base, targets=TARGETS, r_max=RANK, slots=sizes["slots"], device=device)
            started = time.perf_counter()
            for i in range(count):
                pool.register(f"n{i}", files[i % len(files)], adapter=f"a{i % len(files)}")
            registered = time.perf_counter() - started
            names = [f"n{i}" for i in range(min(count, pool.slots))]
            ids = torch.randint(0, sizes["vocab"], (len(names), sizes["seq"])).to(device)
            with torch.no_grad(), pool.route(names):
                base(input_ids=ids)
            allocated = torch.cuda.memory_allocated(device) / 2**20 if benchlib.is_cuda(device) else None
            rows.append([count, pool.slots, pool.device_bytes() / 2**20, len(pool.resident()),
                         registered * 1e3 / count, _rss_mib() or "-", "-" if allocated is None else allocated])
    return rows


def train_variants(model, batch_ids, names: list[str], rows: int) -> dict:
    import torch

    import mm

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def joint() -> None:
        with mm.route(row_adapters=names):
            model(input_ids=batch_ids, labels=batch_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def separate() -> None:
        for k, name in enumerate(dict.fromkeys(names)):
            mm.set_active(model, name)
            ids = batch_ids[k * rows:(k + 1) * rows]
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return {"K adapters together": joint, "K single-adapter steps": separate}


def measure_train(sizes: dict, count: int, rounds: int, steps: int, clock: str, device: str) -> list[list]:
    import torch

    import mm

    model, _ = build_models(sizes, count, device, peft_too=False)
    model.train()
    rows = sizes["rows"]
    names = [f"a{k}" for k in range(count) for _ in range(rows)]
    ids = torch.randint(0, sizes["vocab"], (len(names), sizes["seq"]), generator=torch.Generator().manual_seed(3))
    ids = ids.to(device)
    with torch.no_grad():  # the mixed batch computes what each adapter computes alone on its rows
        with mm.route(row_adapters=names):
            mixed = model(input_ids=ids).logits
        for k in range(count):
            mm.set_active(model, f"a{k}")
            alone = model(input_ids=ids[k * rows:(k + 1) * rows]).logits
            torch.testing.assert_close(mixed[k * rows:(k + 1) * rows], alone, rtol=1e-4, atol=1e-4)
    print(f"training K={count}: outputs equal; timing", file=sys.stderr)
    timings = benchlib.time_interleaved(train_variants(model, ids, names, rows), rounds=rounds, steps=steps,
                                        clock=clock, device=device)
    ms = {k: t.median_ms for k, t in timings.items()}
    joint, separate = ms["K adapters together"], ms["K single-adapter steps"]
    return [[count, rows, sizes["seq"], joint, separate, f"{joint / separate:.3f}x"]]


def report(forward: list, pool: list, train: list, device: str) -> str:
    memory = "CUDA allocated MiB" if benchlib.is_cuda(device) else "CUDA MiB"
    sections = [
        ("Forward (no_grad), N rows, row i -> adapter i; median ms",
         ["N", "mmtune single", "mmtune mixed", "mixed/single", "old loop", "loop/single", "PEFT single",
          "PEFT mixed", "PEFT mixed/single", "PEFT mixed / mmtune mixed"], forward),
        ("Adapter pool: memory vs adapters registered (one mixed batch served per row)",
         ["registered", "slots", "pool device MiB", "resident", "register ms/adapter", "process RSS MiB", memory],
         pool),
        ("Training step (forward, backward, AdamW): K adapters in one mixed batch vs K single-adapter steps",
         ["K", "rows/adapter", "seq", "together ms", "K separate ms", "together/separate"], train),
    ]
    return "\n\n".join(f"{title}\n\n{benchlib.markdown_table(header, rows)}" for title, header, rows in sections if rows)


def main(argv: list[str] | None = None) -> str:
    parser = benchlib.bench_parser(__doc__.splitlines()[0], rounds=5)
    parser.add_argument("--clock", choices=sorted(benchlib.CLOCKS), default="wall",
                        help="'cpu': CPU seconds of this process, steadier on a loaded machine (use --threads 1)")
    parser.add_argument("--only", choices=["forward", "pool", "train"], nargs="*", default=None,
                        help="run only these parts (default: all)")
    parser.add_argument("--counts", type=int, nargs="+", default=None, metavar="N",
                        help="forward: the numbers of adapters (default 8 32 256; --quick 2 4)")
    args = parser.parse_args(argv)
    known = sorted(set(FULL))
    sizes = benchlib.resolve_sizes(parser, QUICK if args.quick else FULL, args.size, known)
    counts = dict(QUICK_COUNTS if args.quick else FULL_COUNTS)
    if args.counts:
        if min(args.counts) < 1:
            parser.error(f"--counts {args.counts}: expected positive numbers of adapters")
        counts["forward"] = tuple(args.counts)
    device = benchlib.check_device(parser, args.device)
    if args.clock != "wall" and benchlib.is_cuda(device):
        parser.error(f"--clock {args.clock}: only the wall clock measures GPU work (--device {device})")
    import torch

    benchlib.set_threads(args.threads)
    parts = set(args.only or ["forward", "pool", "train"])
    timing = {"rounds": args.rounds, "steps": args.steps, "clock": args.clock, "device": device}
    forward = measure_forward(sizes, counts["forward"], **timing) if "forward" in parts else []
    pool = measure_pool(sizes, counts["pool"], device) if "pool" in parts else []
    train = measure_train(sizes, counts["train"], **timing) if "train" in parts else []
    shape = ", ".join(f"{k} {v}" for k, v in sizes.items())
    text = (f"LoRA r={RANK} alpha={ALPHA} on {','.join(TARGETS)}; Llama {shape}; {benchlib.describe_device(device)}, "
            f"torch {torch.__version__}, {args.clock} clock, {args.rounds} rounds x {args.steps} steps (medians)\n\n"
            + report(forward, pool, train, device))
    print(text)
    return text


if __name__ == "__main__":
    main()
