"""``mmtune adapters``: the registered adapter methods, one line each."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("adapters", help="list the registered adapter methods")
    parser.add_argument("--keys", action="store_true", help="also list each method's config keys")
    return parser


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import mm

    methods = mm.list_adapters()
    width = max(map(len, methods))
    for name, description in methods.items():
        print(f"{name:<{width}}  {description}")
        if args.keys:
            fields = dataclasses.fields(mm.ADAPTERS.get(name))
            print(f"{'':<{width}}    keys: {', '.join(f.name for f in fields)}")
    return 0
