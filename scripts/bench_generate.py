"""Generation throughput with many adapters: mmtune's batched generator vs PEFT's mixed-batch generate.

One run, same weights: a transformers Llama with N registered LoRA adapters (r=8 on q,k,v,o,gate,up,down,
random B so each adapter answers differently); R requests of P prompt tokens, each for adapter i % N,
generate G new tokens greedily. Variants (answers checked equal before timing):

- mmtune, attached: ``train.serving.engine.BatchedGenerator`` over the adapters attached with ``mm.attach``
  (one forward per decode step for the whole batch, per-row adapters through ``mm.route``);
- mmtune, pool: the same generator over an ``mm.AdapterPool`` of at most ``--slots`` device slots (the
  adapters stay in their files until a batch needs them), with its device bytes;
- PEFT: ``PeftModel.generate(..., adapter_names=[...])`` on the same batch (static batching).

Tokens/s = R * G / median seconds. Sizes are small so a shared CPU finishes in minutes.

    .venv/bin/python scripts/bench_generate.py --threads 1 --clock cpu  # N = 1, 8, 32, 256
    .venv/bin/python scripts/bench_generate.py --quick                  # smoke test
    .venv/bin/python scripts/bench_generate.py --adapters 1000 --no-peft   # pool memory with 1000 adapters
    .venv/bin/python scripts/bench_generate.py --device cuda            # on a GPU: synchronised timing
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchlib
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # train, mm

import benchlib  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 8, 16
FULL = {"layers": 2, "hidden": 256, "intermediate": 688, "heads": 4, "vocab": 1024,
        "requests": 32, "prompt": 16, "new": 16, "slots": 32}
QUICK = {"layers": 1, "hidden": 32, "intermediate": 64, "heads": 2, "vocab": 128,
         "requests": 4, "prompt": 4, "new": 3, "slots": 2}


def build_models(sizes: dict, count: int, folder: Path, with_peft: bool):
    """(mmtune model with ``count`` attached adapters, their files, PEFT model holding copies or None)."""
    import torch

    import mm

    model_sizes = {k: sizes[k] for k in ("layers", "hidden", "intermediate", "heads", "vocab")}
    model = benchlib.bench_llama(seed=0, **model_sizes).eval()
    names = [f"a{i}" for i in range(count)]
    generator = torch.Generator().manual_seed(1)
    files = {}
    for name in names:
        mm.attach(model, mm.LoRAConfig(targets=TARGETS, r=RANK, alpha=ALPHA), name)
        with torch.no_grad():
            for _, layer in mm.adapted_layers(model):
                lora_b = layer.adapters[name].lora_B
                lora_b.copy_(torch.randn(lora_b.shape, generator=generator) * 0.05)
        files[name] = mm.save_adapters(model, folder / f"{name}.safetensors", [name])
    model.requires_grad_(False)
    return model, files, (build_peft(model, sizes, names) if with_peft else None)


def build_peft(mm_model, sizes: dict, names: list[str]):
    import peft
    import torch

    import mm

    model_sizes = {k: sizes[k] for k in ("layers", "hidden", "intermediate", "heads", "vocab")}
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS)
    model = peft.get_peft_model(benchlib.bench_llama(seed=0, **model_sizes), config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    inner = model.base_model.model
    with torch.no_grad():
        for layer_name, layer in mm.adapted_layers(mm_model):
            target = inner.get_submodule(layer_name)
            for name in names:
                target.lora_A[name].weight.copy_(layer.adapters[name].lora_A)
                target.lora_B[name].weight.copy_(layer.adapters[name].lora_B)
    model.eval()
    model.generation_config.eos_token_id = None  # every row generates exactly G tokens, as ours
    model.generation_config.pad_token_id = 0
    return model


def workload(sizes: dict, count: int, device: str):
    import torch

    generator = torch.Generator().manual_seed(2)
    prompts = torch.randint(3, sizes["vocab"], (sizes["requests"], sizes["prompt"]), generator=generator)
    adapters = [f"a{i % count}" for i in range(sizes["requests"])]
    return prompts.to(device), adapters


def mmtune_fn(model, prompts, adapters, sizes: dict, pool=None):
    from train.serving.engine import BatchedGenerator, GenerationRequest

    def run() -> list[list[int]]:
        requests = [GenerationRequest(prompt_ids=p.tolist(), adapter=a, max_new_tokens=sizes["new"])
                    for p, a in zip(prompts, adapters, strict=True)]
        BatchedGenerator(model, max_batch=len(requests), pool=pool).generate(requests)
        return [r.tokens for r in requests]
    return run


def peft_fn(model, prompts, adapters, sizes: dict):
    import torch

    def run() -> list[list[int]]:
        with torch.no_grad():
            out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), adapter_names=adapters,
                                 max_new_tokens=sizes["new"], do_sample=False)
        return out[:, prompts.shape[1]:].tolist()
    return run


def bench_count(sizes: dict, count: int, args, device: str) -> list[dict]:
    import mm

    with tempfile.TemporaryDirectory(prefix="bench-generate-") as scratch:
        model, files, peft_model = build_models(sizes, count, Path(scratch), not args.no_peft)
        model.to(device)
        pool = mm.AdapterPool(model, targets=TARGETS, r_max=RANK, slots=min(sizes["slots"], count))
        for name, path in files.items():
            pool.register(name, path)
        prompts, adapters = workload(sizes, count, device)
        variants = {"mmtune, attached": mmtune_fn(model, prompts, adapters, sizes),
                    "mmtune, pool": mmtune_fn(model, prompts, adapters, sizes, pool)}
        if peft_model is not None:
            variants["PEFT"] = peft_fn(peft_model.to(device), prompts, adapters, sizes)
        answers = {name: fn() for name, fn in variants.items()}
        reference = answers["mmtune, attached"]
        for name, answer in answers.items():
            if answer != reference:
                raise AssertionError(f"{name} answers differ from mmtune's attached adapters at N={count}")
        timings = benchlib.time_interleaved(variants, rounds=args.rounds, steps=args.steps, warmup=0,
                                          clock=args.clock, device=device)
        tokens = sizes["requests"] * sizes["new"]
        rows = []
        for name, timing in timings.items():
            seconds = timing.median_ms / 1e3
            rows.append({"adapters": count, "variant": name, "seconds": seconds, "tokens_per_s": tokens / seconds,
                         "pool_device_mib": pool.device_bytes() / 2 ** 20 if name == "mmtune, pool" else None})
        return rows


def main(argv: list[str] | None = None) -> str:
    parser = benchlib.bench_parser(__doc__.split("\n\n")[0], rounds=2)
    parser.add_argument("--adapters", default="1,8,32,256", help="comma-separated numbers of registered adapters")
    parser.add_argument("--no-peft", action="store_true", help="skip PEFT (e.g. for 1000 adapters)")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the rows as JSON here too")
    parser.add_argument("--clock", choices=sorted(benchlib.CLOCKS), default="wall",
                        help="'cpu': CPU seconds of this process, steadier on a loaded machine (use --threads 1)")
    args = parser.parse_args(argv)
    device = benchlib.check_device(parser, args.device)
    sizes = benchlib.resolve_sizes(parser, QUICK if args.quick else FULL, args.size)
    try:
        counts = [int(c) for c in args.adapters.split(",")]
    except ValueError:
        parser.error(f"--adapters {args.adapters}: expected comma-separated positive integers")
    if not counts or min(counts) < 1:
        parser.error(f"--adapters {args.adapters}: expected comma-separated positive integers")
    benchlib.set_threads(args.threads)
    rows = [row for count in counts for row in bench_count(sizes, count, args, device)]
    text = report(rows, sizes, device) + f"\n\nclock: {args.clock}"
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return text


def report(rows: list[dict], sizes: dict, device: str) -> str:
    peft = {r["adapters"]: r["tokens_per_s"] for r in rows if r["variant"] == "PEFT"}
    table = benchlib.markdown_table(
        ["adapters", "variant", "tokens/s", "vs PEFT", "pool device MiB"],
        [[r["adapters"], r["variant"], r["tokens_per_s"],
          f"{r['tokens_per_s'] / peft[r['adapters']]:.2f}x" if r["adapters"] in peft else "-",
          "-" if r["pool_device_mib"] is None else f"{r['pool_device_mib']:.2f}"] for r in rows])
    head = (f"{benchlib.describe_device(device)}; Llama {sizes['layers']} layers, hidden {sizes['hidden']}; "
            f"{sizes['requests']} requests x {sizes['prompt']} prompt tokens, {sizes['new']} new tokens each; "
            f"LoRA r={RANK} on {len(TARGETS)} projections; pool of {sizes['slots']} slots; answers checked equal")
    return head + "\n\n" + table


if __name__ == "__main__":
    main()
