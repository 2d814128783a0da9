"""``mmtune eval --config RECIPE [--run RUN_DIR] [--snr DB]... [key=value ...]``: evaluate a trained run.

Rebuilds the recipe's task (same seed, so the frozen base weights are those the run trained on), loads
the run's ``adapters.safetensors`` / ``trainable.safetensors`` and evaluates the eval split. For the AVSR
task it prints the WER (and CER) of every rate pair, clean and with white noise at each ``--snr``;
other tasks print their metrics.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval", help="evaluate a trained run (AVSR: WER per rate pair, clean and at given SNRs)",
        description="Evaluate the run folder of a recipe. AVSR recipes print WER/CER per audio-video rate pair.")
    parser.add_argument("--config", required=True, help="the recipe YAML the run was trained with")
    parser.add_argument("--run", default=None, help="run folder (default: the recipe's train.out_dir)")
    parser.add_argument("--snr", type=float, action="append", default=[], metavar="DB",
                        help="also evaluate with white noise at this SNR in dB (repeatable; tasks whose data "
                             "has snr_db)")
    parser.add_argument("--batch-size", type=int, default=16, help="evaluation batch size")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted recipe keys to override")
    return parser


def evaluate_run(recipe, run_dir, snrs: list[float], batch_size: int) -> dict[str, dict[str, float]]:
    """Metrics per condition ('clean', '<snr> dB') of the run in ``run_dir``."""
    import dataclasses
    from pathlib import Path

    import torch

    from train.engine.checkpoint import load_trainable
    from train.engine.loop import eval_batches, seed_everything
    from train.engine.task import get_task

    run_dir = Path(run_dir)
    if not (run_dir / "adapters.safetensors").is_file() and not (run_dir / "trainable.safetensors").is_file():
        raise FileNotFoundError(f"{run_dir}: no adapters.safetensors or trainable.safetensors (not a finished run)")
    if snrs and not hasattr(recipe.sections.get("data"), "snr_db"):
        raise ValueError(f"--snr: task {recipe.task!r} has no data.snr_db to set")
    seed_everything(recipe.seed)  # the frozen base is random-init from the seed in tiny recipes
    task = get_task(recipe.task)(recipe)
    load_trainable(task, run_dir)
    task.eval()
    results = {}
    conditions = [None, *snrs]
    base = recipe.sections.get("data")
    for snr in conditions:
        if base is not None and hasattr(base, "snr_db"):
            recipe.sections["data"] = dataclasses.replace(base, snr_db=snr)
        with torch.no_grad():
            metrics = task.evaluate(eval_batches(task.eval_dataset(), task.collate, batch_size, "cpu"))
        results["clean" if snr is None else f"{snr:g} dB"] = metrics
    return results


def format_results(results: dict[str, dict[str, float]]) -> str:
    """A pair x condition WER/CER table when the metrics are per pair (``wer_<pair>``), else key: value lines."""
    conditions = list(results)
    first = results[conditions[0]]
    pairs = [k.removeprefix("wer_") for k in first if k.startswith("wer_")]
    if not pairs:
        return "\n".join(f"{c}: " + ", ".join(f"{k}={v:.4f}" for k, v in m.items()) for c, m in results.items())
    lines = ["| rate pair | " + " | ".join(f"WER {c}" for c in conditions) + " | "
             + " | ".join(f"CER {c}" for c in conditions) + " |", "|---" * (1 + 2 * len(conditions)) + "|"]
    for pair in pairs:
        wer = [f"{100 * results[c][f'wer_{pair}']:.1f}" for c in conditions]
        cer = [f"{100 * results[c][f'cer_{pair}']:.1f}" for c in conditions]
        lines.append(f"| {pair} | " + " | ".join(wer) + " | " + " | ".join(cer) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import sys

    from mm.config import ConfigError
    from train.engine.config import load_recipe

    try:
        recipe = load_recipe(args.config, args.overrides)
        results = evaluate_run(recipe, args.run or recipe.out_dir, args.snr, args.batch_size)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"mmtune eval: {err}", file=sys.stderr)
        return 2
    print(f"{recipe.name}: evaluation of {args.run or recipe.out_dir} (WER/CER in %)" if any(
        k.startswith("wer_") for k in next(iter(results.values()))) else f"{recipe.name}:")
    print(format_results(results))
    return 0
