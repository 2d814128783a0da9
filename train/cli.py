"""The ``mmtune`` command. Subcommands live in ``train/commands/<name>.py``, each with
``add_parser(subparsers)`` and ``run(args) -> int``; they import torch only inside ``run`` so that
``mmtune --help`` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

from train.commands import COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmtune", description="Parameter-efficient fine-tuning of multimodal models."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"train.commands.{name}")
        sub = module.add_parser(subparsers)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
