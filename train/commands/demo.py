"""``mmtune demo``: the offline end-to-end example (see train/tasks/demo.py): pretrain a tiny CLIP on digit
captions of the base classes (cached), then few-shot methods on the novel classes, printing the table."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo", help="offline CLIP few-shot demo: tiny CLIP pretrained on digits, adapters on novel classes"
    )
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--methods", nargs="+",
                        default=["zero-shot", "linear-probe", "lora", "block_lora", "qladder"])
    parser.add_argument("--cache-dir", default=".cache/demo", help="digits PNGs and the pretrained tiny CLIP")
    parser.add_argument("--out-dir", default="outputs/demo", help="table, JSON and plot")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="(changes the cached model's key)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def run(args: argparse.Namespace) -> int:
    from train.tasks.demo import DemoSettings, run_demo

    settings = DemoSettings(shots=args.shots, seeds=args.seeds, methods=args.methods, cache_dir=args.cache_dir,
                            out_dir=args.out_dir, progress=not args.no_progress)
    if args.pretrain_epochs is not None:
        settings.pretrain_epochs = args.pretrain_epochs
    run_demo(settings)
    return 0
