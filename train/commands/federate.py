"""``mmtune federate --config configs/federated/<recipe>.yaml key=value ...``: federated FFA-LoRA rounds.

The recipe is a training recipe plus a ``federated:`` section (clients, rounds, local steps, DP-SGD); see
train/rules/federated_run.py. The run folder holds the averaged adapters, metrics.csv and summary.json,
and ``mmtune eval --run`` evaluates it like any run.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "federate", help="simulate federated rounds (FFA-LoRA, optional DP-SGD) of a recipe",
        description="Deal the recipe's training split to simulated clients, run FedAvg rounds of local SGD "
                    "(FFA-LoRA: only B trains; federated.dp_clip_norm adds DP-SGD) and write the run folder. "
                    "Overrides are dotted keys: federated.rounds=3 federated.noise_multiplier=0.5.")
    parser.add_argument("--config", required=True, help="federated recipe YAML (configs/federated/*.yaml)")
    parser.add_argument("--check", action="store_true", help="validate the recipe, print it resolved, exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted recipe keys to override")
    return parser


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import yaml

    from train.rules.federated_run import load_federated_recipe, run_federated

    recipe, federated = load_federated_recipe(args.config, args.overrides)  # bad input: one line, exit 2
    if args.check:
        resolved = {**recipe.to_dict(), "federated": dataclasses.asdict(federated)}
        print(yaml.safe_dump(resolved, sort_keys=False), end="")
        return 0
    run_federated(recipe, federated)
    return 0
