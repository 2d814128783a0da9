"""Pick a demo few-shot recipe's learning rate on validation images, never on the test split.

For each candidate lr, shot count and seed: sample the k-shot training set from the novel classes' *train*
split exactly as the demo does (``sample_k_shot``), train the recipe, and score it on the train-split images
that were not among the shots (the validation pool). The seeds default to ones the demo does not use
(the demo reports seeds 1-3), so the figures it reports were never looked at while choosing. Prints mean
validation accuracy per lr and the best one; the recipe file is not edited. ``mmtune fewshot --select lr``
does the same selection inside every run (train/tasks/fewshot_select.py, which this script shares).

    .venv/bin/python scripts/sweep_fewshot_lr.py --method qladder       # a few minutes on 2 cores
    .venv/bin/python scripts/sweep_fewshot_lr.py --quick                # smoke test: one lr, 1 shot, few steps
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, when run as a script

from train.tasks.fewshot_select import validation_pool  # noqa: E402  (shared with mmtune fewshot --select lr)

DEFAULT_LRS = [3e-3, 1e-2, 3e-2, 1e-1]
__all__ = ["DEFAULT_LRS", "main", "report", "sweep", "validation_pool"]


def sweep(method: str, lrs: list[float], shots: list[int], seeds: list[int], settings=None,
          max_steps: int | None = None, log=print) -> dict[float, list[float]]:
    """lr -> validation accuracies (one per shot count and seed); ``settings``: the demo's (its cache)."""
    from data.fewshot import load_fewshot_data, sample_k_shot, select_classes
    from encoders.clip import create_clip
    from train.tasks.demo import DEMO_MODEL, DemoSettings, export_digits, pretrained_checkpoint
    from train.tasks.fewshot import (
        DEFAULT_TEMPLATES,
        ImageCache,
        accuracy,
        build_adapted,
        find_recipe,
        make_head,
        train_recipe,
    )

    settings = settings or DemoSettings(progress=False)
    data_dir = export_digits(Path(settings.cache_dir) / "digits")
    bundle = create_clip(DEMO_MODEL, str(pretrained_checkpoint(settings, data_dir, log)))
    data = select_classes(load_fewshot_data(data_dir), "novel")
    recipe = find_recipe(method, settings.recipes)
    if max_steps is not None:
        recipe = dataclasses.replace(recipe, steps=max_steps, steps_per_shot=0, epochs=0.0)
    cache = ImageCache(bundle.preprocess)
    scores: dict[float, list[float]] = {lr: [] for lr in lrs}
    for k in shots:
        for seed in seeds:
            taken = sample_k_shot(data.split("train"), k, seed, data.classes)
            train_x, train_y = cache.stack(taken)
            val_x, val_y = cache.stack(validation_pool(data.split("train"), taken))
            for lr in lrs:
                encoder = build_adapted(bundle.model, dataclasses.replace(recipe, lr=lr), seed)
                head = make_head(bundle, encoder, data.classes, list(DEFAULT_TEMPLATES))
                train_recipe(encoder, head, dataclasses.replace(recipe, lr=lr), train_x, train_y, k, seed)
                scores[lr].append(accuracy(encoder, head, val_x, val_y))
                log(f"{method} lr={lr:g} {k}-shot seed {seed}: validation {100 * scores[lr][-1]:.1f}% "
                    f"on {len(val_y)} images")
    return scores


def report(method: str, scores: dict[float, list[float]]) -> str:
    lines = [f"| {method} lr | mean validation accuracy % | runs |", "|---|---|---|"]
    for lr, values in scores.items():
        lines.append(f"| {lr:g} | {100 * statistics.mean(values):.1f} | {len(values)} |")
    best = max(scores, key=lambda lr: statistics.mean(scores[lr]))
    return "\n".join(lines) + f"\n\nbest lr on validation: {best:g}"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="qladder", help="a recipe in configs/clip/demo (default: qladder)")
    parser.add_argument("--lrs", type=float, nargs="+", default=DEFAULT_LRS)
    parser.add_argument("--shots", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[101, 102])
    parser.add_argument("--cache-dir", default=".cache/demo", help="the demo's cache (pretrained tiny CLIP, PNGs)")
    parser.add_argument("--quick", action="store_true", help="one lr, 1 shot, one seed, 3 steps: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.lrs, args.shots, args.seeds = args.lrs[:1], [1], args.seeds[:1]
    from train.tasks.demo import DemoSettings

    settings = DemoSettings(cache_dir=args.cache_dir, progress=False)
    scores = sweep(args.method, args.lrs, args.shots, args.seeds, settings, 3 if args.quick else None)
    text = report(args.method, scores)
    print(text)
    return text


if __name__ == "__main__":
    main()
