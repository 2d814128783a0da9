"""``mmtune transfer --source RUN --target target.yaml --seeds seeds.jsonl --out DIR [key=value ...]``: Trans-LoRA. Move the LoRA of
a trained ``causal_lm`` run to another base model (the target recipe: another size, or a model.path) with no
task data but a few seed examples.

The source base with its adapter samples synthetic sequences from prompts cut from the seeds; a discriminator
(logistic regression on the source's hidden states, trained on the seeds against the synthetic set) keeps
those it takes for real (``--no-filter``: all); the target recipe's adapter (LoRA, DoRA, PiSSA ... as its
``adapters`` section says) learns them by next-token cross-entropy (``mm.compose.trans_lora``). ``DIR`` becomes a
run folder (config.yaml, adapters.safetensors, transfer.json) that ``mmtune eval --run DIR`` reads.

``seeds.jsonl``: one ``{"input_ids": [...]}`` per line, all of one length (token ids of the source's and the
target's vocabulary: the tiny models' arithmetic sequences, or ids of a shared tokenizer).
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "transfer", help="Trans-LoRA: move a causal LM run's LoRA to another base through filtered synthetic data",
        description="Transfer the adapter of a trained causal_lm run to the base model of --target, learning from "
                    "data the source generates from a few seed examples (filtered by a discriminator).")
    parser.add_argument("--source", required=True, metavar="RUN", help="run folder of the source (mmtune train's "
                                                                        "out_dir)")
    parser.add_argument("--target", required=True, help="recipe YAML of the target (task causal_lm: its model and "
                                                        "adapters; its eval split scores the transfer)")
    parser.add_argument("--seeds", required=True, help="jsonl of seed examples: {'input_ids': [...]} per line")
    parser.add_argument("--out", required=True, help="run folder to write (config.yaml, adapters.safetensors)")
    parser.add_argument("--synthetic", type=int, default=512, help="synthetic sequences to generate")
    parser.add_argument("--prompt-len", type=int, default=1, help="seed tokens that prompt each generation")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the source")
    parser.add_argument("--threshold", type=float, default=0.5, help="discriminator P(real) a sample needs")
    parser.add_argument("--no-filter", action="store_true", help="keep every synthetic sample (no discriminator)")
    parser.add_argument("--steps", type=int, default=300, help="distillation steps")
    parser.add_argument("--lr", type=float, default=3e-3, help="distillation learning rate")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts, the sampling and the batches")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted keys of the target recipe")
    return parser


def read_seeds(path: str):
    """(N, length) token ids from a seeds jsonl; a bad line is named."""
    import json
    from pathlib import Path

    import torch

    from mm.compose.trans_lora import TransferError

    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise TransferError(f"{path} line {number}: not valid JSON ({err.msg})") from None
        ids = record.get("input_ids") if isinstance(record, dict) else None
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
            raise TransferError(f"{path} line {number}: expected {{'input_ids': [token ids >= 0]}}, "
                                f"got {line.strip()[:80]!r}")
        if rows and len(ids) != len(rows[0]):
            raise TransferError(f"{path} line {number}: {len(ids)} tokens; the first seed has {len(rows[0])} "
                                "(seeds must be of one length)")
        rows.append(ids)
    if len(rows) < 2:
        raise TransferError(f"{path}: {len(rows)} seed example(s); Trans-LoRA needs at least 2 (5-20 typical)")
    return torch.tensor(rows)


def _build(recipe, run_dir=None):
    from train.engine.checkpoint import load_trainable
    from train.engine.loop import seed_everything
    from train.engine.task import get_task

    seed_everything(recipe.seed)  # tiny recipes draw their frozen base from the seed
    task = get_task(recipe.task)(recipe)
    if run_dir is not None:
        from mm.compose.trans_lora import TransferError

        if not (run_dir / "adapters.safetensors").is_file():
            raise TransferError(f"{run_dir}: no adapters.safetensors (not a finished run with adapters)")
        load_trainable(task, run_dir)
    return task.eval()


def _evaluate(task, batch_size: int, adapters: bool = True) -> dict[str, float]:
    import contextlib

    import torch

    import mm
    from train.engine.loop import eval_batches

    quiet = contextlib.nullcontext() if adapters else mm.disable_adapters(task)
    with torch.no_grad(), quiet:
        return task.evaluate(eval_batches(task.eval_dataset(), task.collate, batch_size, "cpu"))


def _check_inputs(source, target, seeds, args) -> None:
    from mm.compose.trans_lora import TransferError

    for name, task in (("source run " + str(args.source), source), ("target " + str(args.target), target)):
        if task.recipe.task != "causal_lm":
            raise TransferError(f"{name}: task is {task.recipe.task!r}; mmtune transfer moves causal_lm adapters")
    vocab = min(int(source.lm.config.vocab_size), int(target.lm.config.vocab_size))
    if int(seeds.max()) >= vocab:
        raise TransferError(f"{args.seeds}: token id {int(seeds.max())} is outside the models' vocabulary "
                            f"(source and target share ids 0..{vocab - 1})")
    if target.eval_dataset() is None:
        raise TransferError(f"{args.target}: the target recipe has no eval split to score the transfer on")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import mm
    from mm.compose.trans_lora import transfer_lora
    from mm.state import atomic_write
    from train.engine.config import load_recipe, save_resolved
    from train.engine.run_folder import load_run_recipe

    source_dir, out = Path(args.source), Path(args.out)
    seeds = read_seeds(args.seeds)
    source = _build(load_run_recipe(source_dir, [], "transfer"), source_dir)
    target_recipe = load_recipe(args.target, [*args.overrides, f"train.out_dir={out}"])
    if target_recipe.train.threads:  # as the training loop does
        import torch

        torch.set_num_threads(target_recipe.train.threads)
    target = _build(target_recipe)
    _check_inputs(source, target, seeds, args)
    rows = [("source run (its adapter, its eval split)", _evaluate(source, args.batch_size)),
            ("target base alone", _evaluate(target, args.batch_size, adapters=False))]
    result = transfer_lora(source.lm, target.lm, seeds, synthetic=args.synthetic, prompt_len=args.prompt_len,
                           temperature=args.temperature, threshold=None if args.no_filter else args.threshold,
                           steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    rows.append(("target, transferred adapter", _evaluate(target, args.batch_size)))
    out.mkdir(parents=True, exist_ok=True)
    mm.save_adapters(target, out / "adapters.safetensors")
    save_resolved(target_recipe, out / "config.yaml")
    summary = {"seeds": len(seeds), "generated": result["generated"], "kept": result["kept"],
               "final_loss": result["losses"][-1], "metrics": {name: metrics for name, metrics in rows}}
    atomic_write(out / "transfer.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
    kept = "no filter" if args.no_filter else f"threshold {args.threshold:g}"
    print(f"transferred {source_dir} -> {args.target}: {len(seeds)} seeds, {result['generated']} synthetic, "
          f"{result['kept']} kept ({kept}); distillation loss {result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}")
    metrics = list(rows[0][1])
    print("| model | " + " | ".join(metrics) + " |\n|---|" + "---|" * len(metrics))
    for name, values in rows:
        print(f"| {name} | " + " | ".join(f"{values.get(m, float('nan')):.4f}" for m in metrics) + " |")
    print(f"wrote {out / 'adapters.safetensors'} (run folder {out})")
    return 0
