"""``mmtune cluster --config configs/eo/cluster.yaml``: MLC vs k-means vs spectral clustering (train/tasks/cluster.py)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "cluster", help="cluster a data set's features with MLC, k-means and spectral clustering; print ACC/NMI/ARI"
    )
    parser.add_argument("--config", required=True, help="clustering recipe (YAML), e.g. configs/eo/cluster.yaml; "
                        "data.source: digits, mnist, fashion_mnist, image_folder, csv, npz or m3leo "
                        "(data/cluster_sources.py); data.features: raw or clip")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set mlc.epochs=5 --set 'seeds=[0,1,2]'")
    return parser


def run(args: argparse.Namespace) -> int:
    from train.tasks.cluster import load_cluster_recipe, run_clustering

    run_clustering(load_cluster_recipe(args.config, args.overrides))
    return 0
