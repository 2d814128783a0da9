"""``mmtune train --config configs/<track>/<recipe>.yaml key=value ...``: run a recipe (see train/engine/loop.py)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="train a recipe (configs/<track>/<recipe>.yaml) with key=value overrides",
        description="Train a recipe. Overrides are dotted keys: train.max_steps=20 optim.lr=3e-4 "
                    "adapters.default.r=16 train.resume=auto. Multi-process: scripts/launch_accelerate.sh, "
                    "scripts/launch_deepspeed.sh.")
    parser.add_argument("--config", required=True, help="recipe YAML file")
    parser.add_argument("--check", action="store_true", help="validate the recipe, print it resolved, exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted recipe keys to override")
    return parser


def run(args: argparse.Namespace) -> int:
    import sys

    import yaml

    from train.engine.config import load_recipe

    recipe = load_recipe(args.config, args.overrides)  # bad recipes: one line from train.cli, exit 2
    if args.check:
        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
        return 0
    from train.engine.loop import NonFiniteLossError, train

    try:
        train(recipe)
    except NonFiniteLossError as err:  # not the user's input: the run diverged (exit 1, not 2)
        print(f"mmtune train: {err}", file=sys.stderr)
        return 1
    return 0
