"""Arcana and LLaVA-MoLE in miniature: a tiny MLLM (random-init tiny CLIP tower, tiny Llama) on the
demo set of data/fake_instruct.py, instruction-tuned four ways at comparable trainable parameters:

- lora:           LoRA r=8 on q/k/v/o and gate/up/down of every LLM layer (the LLaVA-1.5 baseline)
- mm_lora:        MM-LoRA, a vision LoRA (r=4) and a language LoRA (r=4) on the same layers
- mm_lora+qladder: MM-LoRA plus Arcana's QLadder beside the frozen tower (its queries join the image tokens)
- mole:           LoRA r=8 on attention, MoLE on the MLP (4 experts of r=2, top-1 per token)

Per seed and method, stage 2 (adapters + projector) trains on the *mixed* set, where every question comes
in two conflicting answer styles ("answer with one word." -> "three"; "answer with a sentence." -> "there
are three shapes."), and, as the conflict reference, on the brief style alone. The table gives held-out
exact match (mean +- std over seeds) by question type, by style, and the brief-style accuracy lost by
mixing (LLaVA-MoLE's data conflict: plain LoRA loses more than MoLE, if the claim holds here).

Stages 0 (a miniature stand-in for a pretrained LLM: the tiny Llama learns the demo's language from
text-only records) and 1 (projector alignment on captions) run once and are shared by all stage-2 runs.
Everything goes through the `mllm` task and train/engine/loop.py, as `mmtune train` does.

    .venv/bin/python scripts/repro_mllm.py            # the reported table
    .venv/bin/python scripts/repro_mllm.py --quick    # a smoke run (tests/scripts)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = {"hidden_size": 64, "intermediate_size": 128, "layers": 2, "heads": 4, "kv_heads": 2}
METHODS = {
    "lora": {"adapters": {"default": {"method": "lora", "targets": TARGETS, "r": 8, "alpha": 16.0}}},
    "mm_lora": {"adapters": {"default": {"method": "mm_lora", "targets": TARGETS, "vision_r": 4, "language_r": 4,
                                         "alpha": 8.0}}},
    "mm_lora+qladder": {"adapters": {"default": {"method": "mm_lora", "targets": TARGETS, "vision_r": 4,
                                                 "language_r": 4, "alpha": 8.0}},
                        "qladder": {"num_queries": 8, "mlp_ratio": 1.0}},
    "mole": {"adapters": {"attn": {"method": "lora", "targets": TARGETS[:4], "r": 8, "alpha": 16.0},
                          "mlp": {"method": "mole", "targets": TARGETS[4:], "num_experts": 4, "r": 2, "alpha": 4.0}}},
}
TYPES = ["digit", "count", "color", "shape"]


def recipe(args, root: Path, stage: str, name: str, train_file: str, eval_file: str, *, seed: int = 0,
           steps: int, lr: float, **model):
    from train.engine.config import recipe_from_dict

    data = root / "data"
    raw = {"task": "mllm", "seed": seed,
           "model": {"stage": stage, "tiny": TINY, "vision": "tiny-test", "max_new_tokens": 8, **model},
           "data": {"train": str(data / train_file), "eval": str(data / eval_file), "template": {"system": ""}},
           "optim": {"lr": lr, "warmup_steps": 10}, "train": {
               "max_steps": steps, "batch_size": args.batch_size, "out_dir": str(root / name), "progress": False,
               "threads": args.threads, "log_every": 50}}
    if "adapters" in model:
        raw["adapters"] = raw["model"].pop("adapters")
    return recipe_from_dict(raw, name=name, source=f"{name} (scripts/repro_mllm.py)")


def run(recipe_obj) -> dict[str, float]:
    from train.engine.loop import train

    return train(recipe_obj, say=lambda *_: None).eval_metrics


def trainable_count(recipe_obj) -> int:
    from train.engine.loop import seed_everything
    from train.engine.task import get_task

    seed_everything(recipe_obj.seed)
    task = get_task("mllm")(recipe_obj)
    return sum(p.numel() for p in task.parameters() if p.requires_grad)


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:5.1f}"
    return f"{100 * statistics.mean(values):5.1f}±{100 * statistics.stdev(values):4.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="runs/repro_mllm")
    parser.add_argument("--images", type=int, default=300, help="train images (eval: a third)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help="stage-2 optimizer steps")
    parser.add_argument("--pre-steps", type=int, default=400, help="stage 0 and stage 1 steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--no-conflict", action="store_true", help="skip the brief-only reference runs")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, few steps, one seed")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.seeds, args.steps, args.pre_steps, args.batch_size = 24, 1, 3, 3, 8
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from data.fake_instruct import make_fake_instruct

    root, started = Path(args.root), time.perf_counter()
    make_fake_instruct(root / "data", {"train": args.images, "eval": max(4, args.images // 3)}, seed=0)
    base = run(recipe(args, root, "text", "stage0_text", "text_train.json", "text_eval.json",
                      steps=args.pre_steps, lr=3e-3))
    tokenizer, llm = str(root / "stage0_text" / "tokenizer.json"), str(root / "stage0_text" / "trainable.safetensors")
    aligned = run(recipe(args, root, "projector", "stage1_projector", "captions_train.json", "captions_eval.json",
                         steps=args.pre_steps, lr=3e-3, tokenizer=tokenizer, init_from=[llm]))
    projector = str(root / "stage1_projector" / "trainable.safetensors")
    print(f"stage 0 (text LLM): em {base['em']:.3f}; stage 1 (projector, captions): em {aligned['em']:.3f}, "
          f"loss {aligned['loss']:.3f}", flush=True)
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    params: dict[str, int] = {}
    mixes = [("mixed", "instruct_train.json", "instruct_eval.json")]
    if not args.no_conflict:
        mixes.append(("brief", "instruct_train_brief.json", "instruct_eval_brief.json"))
    for method in args.methods:
        for seed in range(args.seeds):
            for mix, train_file, eval_file in mixes:
                r = recipe(args, root, "instruct", f"{method}_{mix}_s{seed}", train_file, eval_file, seed=seed,
                           steps=args.steps, lr=2e-3, tokenizer=tokenizer, init_from=[llm, projector],
                           **METHODS[method])
                params.setdefault(method, trainable_count(r))
                results.setdefault((method, mix), []).append(run(r))
                print(f"{method:16s} {mix:6s} seed {seed}: em {results[(method, mix)][-1]['em']:.3f}", flush=True)
    print_table(args, results, params, time.perf_counter() - started)
    (root / "results.json").write_text(json.dumps({f"{m}|{x}": v for (m, x), v in results.items()}, indent=1))
    return 0


def print_table(args, results, params, seconds: float) -> None:
    print(f"\nheld-out exact match (%), mean±std over {args.seeds} seed(s); stage 2: {args.steps} steps x "
          f"{args.batch_size}, mixed set = both answer styles")
    head = f"{'method':16s} {'trainable':>9s} " + " ".join(f"{t:>10s}" for t in [*TYPES, "brief", "sentence", "all"])
    if not args.no_conflict:
        head += f" {'brief-only':>10s} {'mix cost':>9s}"
    print(head)
    for method in args.methods:
        mixed = results[(method, "mixed")]
        cells = [mean_std([r.get(f"em_{t}", float("nan")) for r in mixed]) for t in [*TYPES, "brief", "sentence"]]
        cells.append(mean_std([r["em"] for r in mixed]))
        line = f"{method:16s} {params[method]:9d} " + " ".join(f"{c:>10s}" for c in cells)
        if not args.no_conflict:
            alone = [r["em_brief"] for r in results[(method, "brief")]]
            cost = [a - m["em_brief"] for a, m in zip(alone, mixed, strict=True)]
            line += f" {mean_std(alone):>10s} {mean_std(cost):>9s}"
        print(line)
    print(f"(trainable = adapters + projector (+ ladder); 'mix cost' = brief-style accuracy trained on brief only "
          f"minus trained on the mixed set; {seconds / 60:.1f} min)")


if __name__ == "__main__":
    sys.exit(main())
