"""Concrete subspace merging's claim in miniature: merging 4 task LoRAs of one base, Concrete vs the baselines.

Data: scikit-learn's 8x8 digits (bundled, no download), split once into train / validation / test. The base
(an MLP 64 -> 128 -> 128 -> 10) is pretrained on the plain digits and frozen. Four tasks are four domains of
the same digits: rotated 90 degrees, inverted, mirrored, upside down; each gets a LoRA (r=4 on both hidden
layers, a short fine-tune: 20 epochs at lr 1e-3) and its own head (initialised from the base's, as the paper's
CLIP tasks each keep their own head). A merged encoder must then serve all four domains at once.

Rows: the base alone (its own head); each task's own LoRA on its own task ("individual": the upper bound);
and one merged adapter from each method (``mm.merge_adapters`` / ``mm.compose.concrete_merge_adapters``):

- task arithmetic: lambda * sum of the LoRA updates (exact, 'cat');
- PEFT 'linear': the A and B factors summed separately (rank 4, with cross terms);
- TIES (density 0.2) and DARE (linear, density 0.3) on the full updates ('ties_svd', 'dare_linear_svd' at
  full rank, so nothing is lost to the re-factorisation);
- Concrete TA: task arithmetic inside a learned shared mask (lambda as task arithmetic's);
- Concrete AdaMerging: the mask and layer-wise lambdas learned together.

Every baseline's lambda is picked per seed from LAMBDAS by mean accuracy on the labelled validation split.
Concrete learns its mask twice: as the paper does, without labels (entropy of the merged model's predictions
on the unlabeled test inputs), and on the labelled validation split the baselines' lambdas were picked on
(cross-entropy): the same labelled budget as the baselines. Reported: test accuracy per task, mean ± standard
deviation over 3 seeds (each seed: base, LoRAs, merges), and a verdict per objective.

    .venv/bin/python scripts/repro_merge.py            # about 25 s of CPU time (one thread)
    .venv/bin/python scripts/repro_merge.py --quick    # seconds: a smoke test of the script
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import mm
from mm.compose import ConcreteConfig, concrete_merge_adapters, entropy_loss

TASKS = {
    "rotated": lambda x: torch.rot90(x, 1, dims=(-2, -1)),
    "inverted": lambda x: 1.0 - x,
    "mirrored": lambda x: torch.flip(x, dims=(-1,)),
    "upside_down": lambda x: torch.flip(x, dims=(-2,)),
}
TASK_NAMES = list(TASKS)
LAMBDAS = (0.3, 0.5, 0.7, 1.0, 1.5)
BASELINES = {  # row name -> merge_adapters arguments (lambda is the weight of every task)
    "task arithmetic": {"method": "cat"},
    "PEFT linear (A, B summed)": {"method": "linear"},
    "TIES (density 0.2)": {"method": "ties_svd", "density": 0.2},
    "DARE (density 0.3)": {"method": "dare_linear_svd", "density": 0.3},
}
CONCRETE = {  # row name -> (inner level, objective)
    "Concrete TA, entropy": ("task_arithmetic", "entropy"),
    "Concrete AdaMerging, entropy": ("adamerging", "entropy"),
    "Concrete TA, validation": ("task_arithmetic", "validation"),
    "Concrete AdaMerging, validation": ("adamerging", "validation"),
}
FULL = {"pretrain_epochs": 30, "epochs": 20, "seeds": 3, "mask_steps": 150, "ada_steps": 100, "limit": None}
QUICK = {"pretrain_epochs": 3, "epochs": 3, "seeds": 2, "mask_steps": 4, "ada_steps": 3, "limit": 300}


@dataclass
class Split:
    images: torch.Tensor  # (N, 8, 8) in [0, 1]
    labels: torch.Tensor


def digit_splits(limit: int | None = None) -> tuple[Split, Split, Split]:
    """(train 60%, validation 10%, test 30%) of the plain digits, one fixed shuffle."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:limit]
    train_end, val_end = int(0.6 * len(order)), int(0.7 * len(order))
    parts = (order[:train_end], order[train_end:val_end], order[val_end:])
    return tuple(Split(images[idx], labels[idx]) for idx in parts)


def in_domain(split: Split, task: str) -> Split:
    return Split(TASKS[task](split.images), split.labels)


class DigitsMLP(nn.Module):
    """Encoder 64 -> 128 -> 128 and one 10-way head per task; ``task`` picks the head (as CLIP's per-dataset
    zero-shot heads in the paper: the merged encoder is shared, each task keeps its own head)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 128), nn.Linear(128, 128)
        self.heads = nn.ModuleDict({"original": nn.Linear(128, 10)})
        self.task = "original"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(self.fc2(F.gelu(self.fc1(images.flatten(1)))))
        return self.heads[self.task](hidden)


def train(model: nn.Module, split: Split, epochs: int, lr: float, seed: int) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(split.labels), generator=generator).split(64):
            F.cross_entropy(model(split.images[idx]), split.labels[idx]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, split: Split) -> float:
    return float((model(split.images).argmax(-1) == split.labels).float().mean())


def task_adapters(splits: tuple[Split, Split, Split], sizes: dict, seed: int) -> nn.Module:
    """The pretrained, frozen base with one trained LoRA (named after the task) and head per task."""
    train_split = splits[0]
    torch.manual_seed(seed)
    model = DigitsMLP()
    train(model, train_split, sizes["pretrain_epochs"], lr=3e-3, seed=seed)
    model.requires_grad_(False)
    for t, task in enumerate(TASKS):
        model.heads[task] = copy.deepcopy(model.heads["original"])
        mm.attach(model, mm.LoRAConfig(targets=["fc1", "fc2"], r=4, alpha=8.0), task)  # freezes all but adapters
        model.heads[task].requires_grad_(True)
        mm.set_active(model, task)
        model.task = task
        train(model, in_domain(train_split, task), sizes["epochs"], lr=1e-3, seed=seed * 100 + t)
        model.heads[task].requires_grad_(False)
    return model


def per_task(model: nn.Module, split: Split, adapter: str | None) -> list[float]:
    """Accuracy on each task's domain with ``adapter`` alone active and the task's head (None: the base alone,
    with its own pretrained head)."""
    results = []
    for task in TASKS:
        model.task = task if adapter is not None else "original"
        if adapter is None:
            with mm.disable_adapters(model):
                results.append(accuracy(model, in_domain(split, task)))
        else:
            mm.set_active(model, adapter)
            results.append(accuracy(model, in_domain(split, task)))
    return results


def best_baseline(model: nn.Module, splits: tuple, row: str, seed: int) -> tuple[list[float], float]:
    """(test accuracies, lambda) of baseline ``row`` at the lambda with the best validation mean."""
    best = None
    for lam in LAMBDAS:
        name = mm.merge_adapters(model, list(TASKS), weights=[lam] * len(TASKS), svd_rank=128,
                                 new_name="candidate", generator=torch.Generator().manual_seed(seed),
                                 **BASELINES[row])
        score = statistics.mean(per_task(model, splits[1], name))
        if best is None or score > best[0]:
            best = (score, per_task(model, splits[2], name), lam)
        mm.delete_adapter(model, name)
    return best[1], best[2]


def concrete(model: nn.Module, splits: tuple, row: str, lam: float, sizes: dict, seed: int,
             mask_lr: float) -> list[float]:
    """Test accuracies of a Concrete merge (TA inner level at task arithmetic's lambda, or AdaMerging)."""
    inner, objective = CONCRETE[row]
    if objective == "entropy":  # the paper's test-time adaptation: unlabeled test inputs only
        batches = [list(in_domain(splits[2], task).images.split(128)) for task in TASKS]

        def loss_fn(m, images, task):
            m.task = TASK_NAMES[task]
            return entropy_loss(m(images))
    else:
        batches = [[in_domain(splits[1], task)] for task in TASKS]

        def loss_fn(m, split, task):
            m.task = TASK_NAMES[task]
            return F.cross_entropy(m(split.images), split.labels)
    config = ConcreteConfig(inner=inner, scaling=0.3 if inner == "adamerging" else lam,
                            steps=sizes["mask_steps"], mask_lr=mask_lr, adamerging_steps=sizes["ada_steps"],
                            adamerging_lr=0.01, inner_lr=0.01, seed=seed)
    name, _ = concrete_merge_adapters(model, list(TASKS), batches, loss_fn, config, new_name="concrete")
    result = per_task(model, splits[2], name)
    mm.delete_adapter(model, name)
    return result


def run_seed(splits: tuple, sizes: dict, seed: int, mask_lr: float) -> dict[str, list[float]]:
    model = task_adapters(splits, sizes, seed)
    test = splits[2]
    rows = {"base (no adapter)": per_task(model, test, None),
            "individual (own LoRA per task)": [per_task(model, test, task)[t] for t, task in enumerate(TASKS)]}
    lambdas = {}
    for row in BASELINES:
        rows[row], lambdas[row] = best_baseline(model, splits, row, seed)
    for row in CONCRETE:
        rows[row] = concrete(model, splits, row, lambdas["task arithmetic"], sizes, seed, mask_lr)
    print(f"seed {seed}: lambdas picked {lambdas}", file=sys.stderr)
    return rows


def summary(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * std:.1f}"


def verdict(means: dict[str, float], objective: str) -> str:
    rows = [row for row, (_, goal) in CONCRETE.items() if goal == objective]
    best_concrete = max(rows, key=means.get)
    best_other = max(BASELINES, key=means.get)
    gap = 100 * (means[best_concrete] - means[best_other])
    if gap > 0:
        return (f"With the {objective} objective the claim reproduces here: {best_concrete} beats the best other "
                f"merge ({best_other}) by {gap:.1f} points of mean accuracy.")
    return (f"With the {objective} objective the claim does NOT reproduce here: the best Concrete merge "
            f"({best_concrete}) trails {best_other} by {-gap:.1f} points of mean accuracy.")


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings: a smoke test of the script")
    parser.add_argument("--mask-lr", type=float, default=0.003, help="Adam learning rate of the mask logits")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the model is tiny: 1 is fastest)")
    parser.add_argument("--json", default=None, help="also write the per-seed accuracies here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    start, cpu_start = time.perf_counter(), time.process_time()
    splits = digit_splits(sizes["limit"])
    seeds = [run_seed(splits, sizes, seed, args.mask_lr) for seed in range(sizes["seeds"])]
    table = ["| merge | " + " | ".join(f"{task} %" for task in TASKS) + " | mean % |",
             "|---|" + "---|" * (len(TASKS) + 1)]
    means = {}
    for row in seeds[0]:
        cells = [summary([s[row][t] for s in seeds]) for t in range(len(TASKS))]
        seed_means = [statistics.mean(s[row]) for s in seeds]
        means[row] = statistics.mean(seed_means)
        table.append(f"| {row} | " + " | ".join(cells) + f" | {summary(seed_means)} |")
    text = "\n".join([
        f"Digits in 4 domains, {len(splits[0].labels)} train / {len(splits[1].labels)} validation / "
        f"{len(splits[2].labels)} test images per domain; LoRA r=4 per domain on a frozen MLP; {len(seeds)} seeds; "
        f"Concrete mask lr {args.mask_lr:g}",
        "", *table, "", *(verdict(means, objective) for objective in ("entropy", "validation")), "",
        f"wall time {time.perf_counter() - start:.0f} s, CPU time {time.process_time() - cpu_start:.0f} s",
    ])
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"tasks": list(TASKS), "seeds": seeds}, handle, indent=1)
    print(text)
    return text


if __name__ == "__main__":
    main()
