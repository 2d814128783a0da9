"""The MLC claim in miniature: MLC vs k-means vs spectral clustering on real offline data, 3 seeds.

Data: scikit-learn's digits (all 1,797) and a class-stratified subset of Fashion-MNIST's test set (Debian
package ``dataset-fashion-mnist``). Every method sees the same inputs (pixels in [0, 1]); MLC's one-shot
init trains its feature head self-supervised on shifted copies of the images (the paper initialises from
self-supervised features too).

MLC's entropy weight gamma and Sinkhorn strength eta are chosen per data set WITHOUT labels: every
candidate in ``GRID`` is fitted once at ``SELECTION_SEED`` (not a reported seed) and scored by the rate
reduction Delta R(Z, Pi) of its learned features under its own clustering (``MLC.rate_reduction_of``: the
MCR2 criterion MLC maximises); the best score wins, and only then are the reported seeds run. The
candidates' ACC is printed beside their score for transparency and never used. (Earlier versions of this
script picked gamma/eta by ACC against the evaluation labels, which inflated the MLC row.) k-means and
spectral clustering are untuned. Prints one ACC / NMI / ARI table per data set (mean +- std over seeds).

    .venv/bin/python scripts/repro_mlc.py                # digits + Fashion-MNIST (2,000), seeds 0 1 2
    .venv/bin/python scripts/repro_mlc.py --quick        # digits, two candidates, one seed
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from heads.mlc import MLC, MLCConfig  # noqa: E402
from train.tasks.cluster import (  # noqa: E402
    ClusterDataConfig,
    ClusterRecipe,
    clustering_scores,
    format_table,
    image_shift_augment,
    load_features,
    run_clustering,
)

#: MLC sizes for a CPU (the paper's structure); gamma and eta come from the label-free selection.
BASE = MLCConfig(z_dim=32, hidden_dim=256, epsilon=0.5, batch_size=256, init_epochs=10, epochs=20, lr=1e-3)
#: (gamma, eta) candidates: the settings the earlier, label-picked version tried on these data sets. The
#: 2026-11-29 run chose digits 0.3/0.15 (Delta R 17.83; MLC ACC 87.2 +- 0.0 over seeds 0-2) and Fashion-MNIST
#: 0.1/0.25 (Delta R 17.51; MLC ACC 53.4 +- 1.9, where the label-picked 0.3/0.25 had reported 55.9 on seed 0).
GRID = [(0.1, 0.15), (0.1, 0.25), (0.3, 0.15), (0.3, 0.25)]
SELECTION_SEED = 100


def select_label_free(data: ClusterDataConfig, grid: list[tuple[float, float]], log=print) -> MLCConfig:
    """The (gamma, eta) of ``grid`` whose fit at SELECTION_SEED has the highest Delta R; no label is read
    except to print each candidate's ACC (the class count, as for every method, gives k)."""
    import numpy as np
    import torch

    torch.set_num_threads(ClusterRecipe().threads)  # as run_clustering
    x, y, image_shape = load_features(data)
    k = len(np.unique(y))
    augment = image_shift_augment(image_shape, data.max_shift, flip=data.flip) if image_shape else None
    features = torch.from_numpy(x)
    best, best_score = None, -float("inf")
    for gamma, eta in grid:
        start = time.perf_counter()
        config = dataclasses.replace(BASE, gamma=gamma, eta=eta, num_clusters=k, seed=SELECTION_SEED)
        model = MLC(x.shape[1], config).fit(features, augment=augment)
        clusters = model.predict(features)
        score = model.rate_reduction_of(features, clusters)
        shown = 100 * clustering_scores(y, clusters)["ACC"]
        log(f"  select {data.source}: gamma {gamma:.2f} eta {eta:.2f}: Delta R {score:.3f} "
            f"(ACC {shown:.1f}, not used) ({time.perf_counter() - start:.0f} s)")
        if score > best_score:
            best, best_score = config, score
    log(f"  chosen without labels: gamma {best.gamma:.2f}, eta {best.eta:.2f}")
    return dataclasses.replace(best, seed=BASE.seed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fmnist-limit", type=int, default=2000, help="Fashion-MNIST test images to cluster")
    parser.add_argument("--datasets", nargs="+", default=["digits", "fashion_mnist"])
    parser.add_argument("--quick", action="store_true", help="digits, two candidates, seed 0 only")
    args = parser.parse_args()
    datasets, seeds, grid = (["digits"], [0], GRID[::3]) if args.quick else (args.datasets, args.seeds, GRID)
    if SELECTION_SEED in seeds:
        parser.error(f"seed {SELECTION_SEED} selects gamma/eta; report other seeds")
    tables = {}
    for source in datasets:
        data = ClusterDataConfig(source=source, split="test",
                                 limit=args.fmnist_limit if source == "fashion_mnist" else None)
        start = time.perf_counter()
        chosen = select_label_free(data, grid)
        results = run_clustering(ClusterRecipe(data=data, mlc=chosen, seeds=seeds))
        tables[source] = (results, chosen, time.perf_counter() - start)
    print("\nMLC vs k-means vs spectral clustering (scores in %, mean +- std over seeds "
          f"{' '.join(map(str, seeds))}; MLC's gamma/eta chosen without labels):")
    for source, (results, chosen, seconds) in tables.items():
        print(f"\n{source} (MLC gamma {chosen.gamma:g}, eta {chosen.eta:g}; {seconds:.0f} s)\n{format_table(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
