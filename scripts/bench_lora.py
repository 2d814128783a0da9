"""LoRA training speed and memory: mmtune vs HF PEFT on identical weights, against the frozen base's limit.

A transformers Llama (4 layers, hidden 512, batch 8 x 256 tokens, CPU) with LoRA r=16, alpha 32 on
q,k,v,o,gate,up,down. Measured in one run, timed in interleaved rounds (see benchlib):

- frozen base forward (no_grad), and "the limit" of any LoRA step: the frozen base's forward plus backward
  to its input embeddings (a LoRA step cannot avoid back-propagating activations through every layer);
- mmtune and PEFT: forward alone (no_grad), training step (forward, backward, AdamW step), peak RSS
  growth of a training step (each in a fresh process), trainable parameters.

    .venv/bin/python scripts/bench_lora.py             # full size, wall clock: 3-13 minutes on 2 cores
    .venv/bin/python scripts/bench_lora.py --threads 1 --clock cpu   # steadier on a shared machine
    .venv/bin/python scripts/bench_lora.py --quick     # tiny model: a smoke test of the script
    .venv/bin/python scripts/bench_lora.py --device cuda   # on a GPU: synchronised timing, CUDA peak memory

On an oversubscribed machine two torch threads spend much of the wall time waiting for each other, so
wall-clock figures swing by tens of percent; one thread timed in process CPU seconds is far steadier.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib, when imported from elsewhere

import benchlib  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32

FULL = {"layers": 4, "hidden": 512, "intermediate": 1376, "heads": 8, "vocab": 4096, "batch": 8, "seq": 256}
QUICK = {"layers": 2, "hidden": 64, "intermediate": 172, "heads": 4, "vocab": 256, "batch": 2, "seq": 32}

#: Row key -> label, in table order.
ROWS = {
    "base_forward": "frozen base: forward",
    "limit": "limit: base forward + backward to input embeddings",
    "mmtune_forward": "mmtune: forward",
    "peft_forward": "PEFT: forward",
    "mmtune_train": "mmtune: training step (fwd, bwd, AdamW)",
    "peft_train": "PEFT: training step (fwd, bwd, AdamW)",
}


def _llama(sizes: dict):
    model_sizes = {k: sizes[k] for k in ("layers", "hidden", "intermediate", "heads", "vocab")}
    return benchlib.bench_llama(seed=0, **model_sizes)


def _batch(sizes: dict, device: str = "cpu") -> dict:
    batch = benchlib.bench_batch(batch=sizes["batch"], seq=sizes["seq"], vocab=sizes["vocab"], seed=0)
    return benchlib.to_device(batch, device)


def build_mmtune(sizes: dict):
    """The bench Llama with mmtune LoRA; B gets small seeded random values so the adapter is not a no-op."""
    import torch

    import mm

    model = _llama(sizes)
    mm.attach(model, mm.LoRAConfig(targets=TARGETS, r=RANK, alpha=ALPHA))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in mm.adapted_layers(model):
            lora_b = layer.adapters["default"].lora_B
            lora_b.copy_(torch.randn(lora_b.shape, generator=generator) * 0.02)
    return model


def build_peft_like(mm_model, sizes: dict):
    """PEFT LoRA with the same r/alpha/targets on the same base, holding a copy of mmtune's A and B."""
    import peft
    import torch

    import mm

    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS)
    model = peft.get_peft_model(_llama(sizes), config)
    inner = model.base_model.model
    with torch.no_grad():
        for name, layer in mm.adapted_layers(mm_model):
            lora = layer.adapters["default"]
            target = inner.get_submodule(name)
            target.lora_A["default"].weight.copy_(lora.lora_A)
            target.lora_B["default"].weight.copy_(lora.lora_B)
    return model


def build_frozen_base(sizes: dict):
    model = _llama(sizes)
    model.requires_grad_(False)
    return model


def forward_fn(model, batch: dict) -> Callable[[], None]:
    import torch

    def forward() -> None:
        with torch.no_grad():
            model(input_ids=batch["input_ids"])

    return forward


def train_step_fn(model, batch: dict) -> Callable[[], None]:
    import torch

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def train_step() -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train_step


def limit_fn(base, batch: dict) -> Callable[[], None]:
    """Forward + backward of the frozen base to its input embeddings: no weight gradients at all."""
    embed = base.get_input_embeddings()

    def limit() -> None:
        inputs_embeds = embed(batch["input_ids"]).detach().requires_grad_(True)
        base(inputs_embeds=inputs_embeds, labels=batch["labels"]).loss.backward()

    return limit


def setup(row: str, device: str = "cpu", **sizes) -> Callable[[], None]:
    """Build only what ``row`` needs on ``device`` and return its step (benchlib.peak_memory_mib calls
    this in a child)."""
    batch = _batch(sizes, device)
    if row == "base_forward":
        return forward_fn(build_frozen_base(sizes).to(device), batch)
    if row == "limit":
        return limit_fn(build_frozen_base(sizes).to(device), batch)
    mm_model = build_mmtune(sizes)
    model = build_peft_like(mm_model, sizes) if row.startswith("peft") else mm_model
    del mm_model  # a PEFT child keeps only its own model (the copy source is freed before measuring)
    model.to(device)
    return train_step_fn(model, batch) if row.endswith("train") else forward_fn(model, batch)


def assert_same_outputs(mm_model, peft_model, base, batch: dict) -> None:
    import torch

    with torch.no_grad():
        ours = mm_model(input_ids=batch["input_ids"]).logits
        theirs = peft_model(input_ids=batch["input_ids"]).logits
        plain = base(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    if (ours - plain).abs().max() < 1e-4:
        raise AssertionError("the LoRA update is a no-op: the parity check would prove nothing")


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def measure(sizes: dict, rounds: int, steps: int, memory: bool, clock: str = "wall",
            device: str = "cpu") -> tuple[dict, dict, dict]:
    """(median ms per row, peak MiB per row or {}, trainable params per tool)."""
    import torch

    batch = _batch(sizes, device)
    base = build_frozen_base(sizes).to(device)
    mm_model = build_mmtune(sizes)
    peft_model = build_peft_like(mm_model, sizes).to(device)
    mm_model.to(device)
    assert_same_outputs(mm_model, peft_model, base, batch)
    params = {"mmtune": trainable(mm_model), "PEFT": trainable(peft_model)}
    steps_by_row = {
        "base_forward": forward_fn(base, batch), "limit": limit_fn(base, batch),
        "mmtune_forward": forward_fn(mm_model, batch), "peft_forward": forward_fn(peft_model, batch),
        "mmtune_train": train_step_fn(mm_model, batch), "peft_train": train_step_fn(peft_model, batch),
    }
    print(f"timing {len(steps_by_row)} variants: {rounds} rounds x {steps} steps, "
          f"{torch.get_num_threads()} threads, {clock} clock", file=sys.stderr)
    timings = benchlib.time_interleaved(steps_by_row, rounds=rounds, steps=steps, warmup=1, clock=clock,
                                        device=device)
    medians = {row: t.median_ms for row, t in timings.items()}
    peaks = {}
    if memory:
        del base, mm_model, peft_model, steps_by_row
        for row in ("limit", "mmtune_train", "peft_train"):
            print(f"peak memory: {row}", file=sys.stderr)
            peaks[row] = benchlib.peak_memory_mib(__file__, "setup", {"row": row, **sizes}, steps=2,
                                                  device=device)["growth_mib"]
    return medians, peaks, params


def report(medians: dict, peaks: dict, params: dict, device: str = "cpu") -> str:
    limit = medians["limit"]
    rows = []
    for key, label in ROWS.items():
        tool = "mmtune" if key.startswith("mmtune") else "PEFT" if key.startswith("peft") else None
        peak = peaks.get(key)
        rows.append([label, medians[key], f"{medians[key] / limit:.2f}x",
                     "-" if peak is None else peak, params[tool] if tool and key.endswith("train") else "-"])
    table = benchlib.markdown_table(
        ["", "median ms", "x limit", benchlib.memory_label(device), "trainable params"], rows)
    ratios = [
        f"- training step, mmtune / PEFT: {medians['mmtune_train'] / medians['peft_train']:.3f}",
        f"- forward, mmtune / PEFT: {medians['mmtune_forward'] / medians['peft_forward']:.3f}",
    ]
    if "mmtune_train" in peaks and "peft_train" in peaks:
        ratios.append(f"- training-step peak memory, mmtune / PEFT: "
                      f"{peaks['mmtune_train'] / peaks['peft_train']:.3f}")
    return table + "\n\n" + "\n".join(ratios)


def main(argv: list[str] | None = None) -> str:
    parser = benchlib.bench_parser(__doc__.splitlines()[0], rounds=5)
    parser.add_argument("--clock", choices=sorted(benchlib.CLOCKS), default="wall",
                        help="'cpu': CPU seconds of this process, steadier on a loaded machine (use --threads 1)")
    args = parser.parse_args(argv)
    sizes = benchlib.resolve_sizes(parser, QUICK if args.quick else FULL, args.size)
    device = benchlib.check_device(parser, args.device)
    if args.clock != "wall" and benchlib.is_cuda(device):
        parser.error(f"--clock {args.clock}: only the wall clock measures GPU work (--device {device})")
    import torch

    benchlib.set_threads(args.threads)
    medians, peaks, params = measure(sizes, args.rounds, args.steps, memory=not args.no_memory, clock=args.clock,
                                     device=device)
    shape = ", ".join(f"{k} {v}" for k, v in sizes.items())
    text = (f"LoRA r={RANK} alpha={ALPHA} on {','.join(TARGETS)}; Llama {shape}; {benchlib.describe_device(device)}, "
            f"torch {torch.__version__}, {args.clock} clock\n\n" + report(medians, peaks, params, device))
    print(text)
    return text


if __name__ == "__main__":
    main()
