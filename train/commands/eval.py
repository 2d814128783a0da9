"""``mmtune eval --run RUN_DIR [--snr DB]... [key=value ...]``: evaluate a trained run.

The run folder is the truth: the task is rebuilt from ``RUN_DIR/config.yaml`` (same seed, model and data
as the run trained on; see train/engine/run_folder.py), the run's ``adapters.safetensors`` /
``trainable.safetensors`` are loaded and the eval split is evaluated. A ``key=value`` that changes the
run's value is applied and said on stderr; ``--config RECIPE`` alone means the recipe's run folder
(``train.out_dir``). For the AVSR task it prints the WER (and CER) of every rate pair, clean and with
white noise at each ``--snr``, and ``--transcripts OUT.jsonl`` writes each utterance's reference, hypothesis
and WER; other tasks print their metrics.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval", help="evaluate a trained run (AVSR: WER per rate pair, clean and at given SNRs)",
        description="Evaluate the run folder of a recipe. AVSR recipes print WER/CER per audio-video rate pair.")
    parser.add_argument("--run", default=None, help="run folder (its config.yaml rebuilds the model and data)")
    parser.add_argument("--config", default=None, help="a recipe YAML: its train.out_dir is the run folder when "
                                                       "--run is not given (the run's own config.yaml is used)")
    parser.add_argument("--snr", type=float, action="append", default=[], metavar="DB",
                        help="also evaluate with white noise at this SNR in dB (repeatable; tasks whose data "
                             "has snr_db)")
    parser.add_argument("--batch-size", type=int, default=16, help="evaluation batch size")
    parser.add_argument("--transcripts", default=None, metavar="OUT.jsonl",
                        help="write every utterance's reference, hypothesis and WER (per rate pair and noise "
                             "condition) to this JSON-lines file (AVSR)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted recipe keys to override")
    return parser


def evaluate_run(recipe, run_dir, snrs: list[float], batch_size: int,
                 transcripts: list[dict] | None = None) -> dict[str, dict[str, float]]:
    """Metrics per condition ('clean', '<snr> dB') of the run in ``run_dir``; with a ``transcripts`` list,
    the task's per-utterance transcripts are appended to it, each with its condition."""
    import dataclasses
    from pathlib import Path

    import torch

    from mm.config import ConfigError
    from train.engine.checkpoint import load_trainable
    from train.engine.loop import eval_batches, seed_everything
    from train.engine.task import get_task

    run_dir = Path(run_dir)
    if not (run_dir / "adapters.safetensors").is_file() and not (run_dir / "trainable.safetensors").is_file():
        raise FileNotFoundError(f"{run_dir}: no adapters.safetensors or trainable.safetensors (not a finished run)")
    if snrs and not hasattr(recipe.sections.get("data"), "snr_db"):
        raise ConfigError(f"--snr: task {recipe.task!r} has no data.snr_db to set")
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
        condition = "clean" if snr is None else f"{snr:g} dB"
        results[condition] = metrics
        if transcripts is not None:
            if getattr(task, "transcripts", None) is None:
                raise ConfigError(f"--transcripts: task {recipe.task!r} does not produce transcripts")
            transcripts += [{"condition": condition, **row} for row in task.transcripts]
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


def write_transcripts(path, rows: list[dict]) -> None:
    """One JSON object per line (condition, id, pair, reference, hypothesis, wer), through a temp file."""
    import json
    from pathlib import Path

    from mm.state import atomic_write

    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def run(args: argparse.Namespace) -> int:
    from train.engine.run_folder import load_run_recipe, run_dir_of

    run_dir = run_dir_of(args.config, args.run, args.overrides)  # bad input: one line from train.cli, exit 2
    recipe = load_run_recipe(run_dir, args.overrides, "eval", recipe_file=args.config)
    transcripts = [] if args.transcripts else None
    results = evaluate_run(recipe, run_dir, args.snr, args.batch_size, transcripts)
    if transcripts is not None:
        write_transcripts(args.transcripts, transcripts)
    print(f"{recipe.name}: evaluation of {run_dir} (WER/CER in %)" if any(
        k.startswith("wer_") for k in next(iter(results.values()))) else f"{recipe.name}:")
    print(format_results(results))
    return 0
