"""``mmtune demo``: the offline end-to-end example (see train/demo.py)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo", help="pretrain a small ViT on digits, LoRA-adapt it to shifted digits, print accuracies"
    )
    parser.add_argument("--domain", default="inverted_rotated", help="shifted domain to adapt to")
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--adapt-epochs", type=int, default=30)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="outputs/demo")
    return parser


def run(args: argparse.Namespace) -> int:
    from train.demo import DemoSettings, run_demo

    run_demo(DemoSettings(
        shifted_domain=args.domain, pretrain_epochs=args.pretrain_epochs, adapt_epochs=args.adapt_epochs,
        rank=args.rank, seed=args.seed, out_dir=args.out_dir,
    ))
    return 0
