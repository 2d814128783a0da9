"""``mmtune fewshot``: train and evaluate CLIP adaptation methods over shot counts and seeds in one run."""

from __future__ import annotations

import argparse

METHODS_HELP = ("zero-shot, linear-probe, or a recipe name in --recipes (lora, block_lora, qladder, "
                "lora_qladder)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "fewshot", help="few-shot CLIP: zero-shot, linear probe and adapters over shots and seeds, with a report"
    )
    parser.add_argument("--model", required=True,
                        help="open_clip model name (e.g. ViT-B-16), or a tiny random config: tiny-test, tiny-digits")
    parser.add_argument("--pretrained", default=None,
                        help="open_clip pretrained tag (needs the network) or a local checkpoint file")
    parser.add_argument("--data", required=True,
                        help="dataset: image folders, train/test CSV lists, or a CoOp split JSON (data/fewshot.py)")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--methods", nargs="+", default=["zero-shot", "linear-probe", "lora", "block_lora",
                                                         "qladder"], help=METHODS_HELP)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--classes", choices=["all", "base", "novel"], default="all",
                        help="all classes, or the base / novel half (CoOp's split: first ceil(n/2) are base)")
    parser.add_argument("--templates", nargs="+", default=None, help='prompt templates, e.g. "a photo of a {}."')
    parser.add_argument("--recipes", default=None, help="folder of method recipes (default: configs/clip)")
    parser.add_argument("--out-dir", default="outputs/fewshot")
    parser.add_argument("--save-adapters", action="store_true", help="save every trained adapter / QLadder")
    parser.add_argument("--select", choices=["lr"], default=None,
                        help="lr: choose each trained run's learning rate on validation images carved from the "
                             "training split outside the shots (reported in the table); the test split is never used")
    parser.add_argument("--lrs", type=float, nargs="+", default=None,
                        help="candidate learning rates for --select lr (default: the recipe's lr x 0.1, 1/3, 1, 3)")
    parser.add_argument("--val-per-class", type=int, default=16,
                        help="validation images per class for --select lr (default 16)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def settings_from_args(args: argparse.Namespace):
    from heads.clip_prototype import DEFAULT_TEMPLATES
    from train.tasks.fewshot import DEFAULT_RECIPES, FewShotSettings

    return FewShotSettings(
        model=args.model, pretrained=args.pretrained, data=args.data, shots=args.shots, methods=args.methods,
        seeds=args.seeds, classes=args.classes, templates=args.templates or list(DEFAULT_TEMPLATES),
        recipes=args.recipes or str(DEFAULT_RECIPES), out_dir=args.out_dir, save_adapters=args.save_adapters,
        device=args.device, progress=not args.no_progress, select=args.select, lrs=args.lrs,
        val_per_class=args.val_per_class,
    )


def run(args: argparse.Namespace) -> int:
    from train.tasks.fewshot import run_fewshot
    from train.tasks.fewshot_report import markdown_table, summarize, write_reports

    settings = settings_from_args(args)
    results = run_fewshot(settings)
    paths = write_reports(results, settings.out_dir, title=f"{settings.model} few-shot ({settings.classes} classes)")
    print()
    print(markdown_table(summarize(results["records"])))
    print(f"\nwrote {paths['table']}, {paths['json']}, {paths['plot']}")
    return 0
