"""``mmtune limits --config recipe.yaml``: which adapted attention layers are below LoRA's efficiency threshold.

Builds the recipe's task (random-init base from the recipe seed, its adapters attached; with ``--run
RUN_DIR`` the run's own recipe and its trained adapters, as ``mmtune eval`` loads them), runs ONE batch of
its training data forward with every adapted attention layer hooked, and prints per layer the norms of
Hu et al. (2024, arXiv 2406.03136) that decide whether LoRA's attention gradient admits a near-linear
algorithm, the side of the sqrt(log L) threshold each layer is on, and whether the polynomial path of
``mm.poly_attention`` would do less work than exact attention: a Markdown table, then the same as JSON
(``--json FILE`` writes it to a file instead). See ``mm/limits.py`` for the formulas.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "limits", help="measure LoRA's computational-limit norms per adapted attention layer on one batch",
        description="Per adapted attention layer: max-entry norms of X, W*, alpha BA/r and the adapted Q, K on "
                    "one training batch, the sqrt(log L) threshold of Hu et al. (2024) and which side it is on.")
    parser.add_argument("--config", default=None, help="recipe YAML file (its untrained adapters)")
    parser.add_argument("--run", default=None, help="a run folder: measure its trained adapters (its config.yaml)")
    parser.add_argument("--batch-size", type=int, default=None, help="samples in the batch (default: train.batch_size)")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="relative error allowed for the Taylor kernel when choosing the degree (default 1e-3)")
    parser.add_argument("--threshold-scale", type=float, default=1.0,
                        help="a layer is 'below' when gamma < SCALE * sqrt(log L) (the theorem has no constant)")
    parser.add_argument("--json", default=None, metavar="FILE", help="write the JSON here instead of stdout")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted recipe keys to override")
    return parser


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from mm.config import ConfigError
    from mm.limits import measure_limits
    from mm.state import atomic_write
    from train.engine.checkpoint import load_trainable
    from train.engine.config import load_recipe
    from train.engine.loop import eval_batches, seed_everything
    from train.engine.run_folder import load_run_recipe
    from train.engine.task import get_task

    if args.tolerance <= 0 or args.threshold_scale <= 0:
        raise ConfigError("--tolerance and --threshold-scale: expected positive numbers")
    if args.run is None and args.config is None:
        raise ConfigError("give --config RECIPE or --run RUN_DIR")
    if args.run is not None:  # bad input: one line from train.cli, exit 2
        recipe = load_run_recipe(args.run, args.overrides, "limits", recipe_file=args.config)
    else:
        recipe = load_recipe(args.config, args.overrides)
    seed_everything(recipe.seed)  # the frozen base of tiny recipes is random-init from the seed
    task = get_task(recipe.task)(recipe)
    if args.run is not None:
        if not (Path(args.run) / "adapters.safetensors").is_file():
            raise ConfigError(f"{args.run}: no adapters.safetensors (not a finished run)")
        load_trainable(task, Path(args.run))
    task.eval()
    dataset = task.train_dataset()
    if len(dataset) == 0:
        raise ConfigError(f"{recipe.source}: the recipe's training data is empty: no batch to measure")
    batch_size = args.batch_size or recipe.train.batch_size
    batch = next(eval_batches(dataset, task.collate, batch_size, "cpu"))
    try:
        report = measure_limits(task, lambda: task.training_step(batch), args.tolerance, args.threshold_scale)
    except ConfigError as err:  # name the recipe: its adapters decide which layers are measured
        raise ConfigError(f"{recipe.source}: adapters: {err}") from err
    print(f"{recipe.name}: LoRA computational limits on one batch of {batch_size} (torch {torch.__version__})")
    print(report.to_markdown())
    text = report.to_json()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(args.json), lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
    else:
        print(text)
    return 0
