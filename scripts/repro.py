"""Reproduction in miniature: does an adapter method converge faster / reach LoRA's accuracy?

    .venv/bin/python scripts/repro.py pissa lora_ga eva

A small MLP (64 -> 128 -> 128 -> 5, GELU) is pretrained on scikit-learn's digits 0-4 and cached under
``.cache/repro/``. Each method then adapts the frozen base, head included and kept frozen, to digits 5-9
(label d -> d - 5): only adapter weights on fc1 and fc2 train; the old head stays frozen, so the hidden
layers must re-purpose it and what the base learnt matters (LoRA-GA needs 2r <= the layer's rank, which
a 5-output head is not). Every method runs with the same rank budget, optimizer,
learning rate, batches and steps, on 3 seeds (which change the adapter's random init, the batch order and
the calibration batches of data-driven methods). Plain LoRA is always run too.

One table is printed: method, trainable parameters, the loss on the whole adaptation training split at
fixed steps (step 0 is the base: every method here starts at it), and the final test accuracy, each as
mean +- std over seeds. Methods come from ``scripts/repro_methods.py`` (add rows there).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # repro_methods lives beside this script

from repro_methods import METHODS, Calibration, ReproMethod  # noqa: E402

import mm  # noqa: E402
from mm.state import atomic_write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["fc1", "fc2"]  # the head stays frozen: the hidden layers must re-purpose it


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int = 128, classes: int = 5) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(64, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


@dataclass
class Splits:
    pretrain: tuple[torch.Tensor, torch.Tensor]  # digits 0-4
    train: tuple[torch.Tensor, torch.Tensor]  # digits 5-9, labels 0-4
    test: tuple[torch.Tensor, torch.Tensor]


def digit_splits(test_share: float = 1 / 3) -> Splits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    old, new = y < 5, y >= 5
    order = torch.randperm(int(new.sum()), generator=torch.Generator().manual_seed(0))
    x_new, y_new = x[new][order], y[new][order] - 5
    cut = int(len(order) * (1 - test_share))
    return Splits((x[old], y[old]), (x_new[:cut], y_new[:cut]), (x_new[cut:], y_new[cut:]))


def pretrained_base(splits: Splits, hidden: int, epochs: int, cache_dir: Path) -> dict[str, torch.Tensor]:
    """The base's weights: read from the cache, or pretrained on digits 0-4 (seed 0) and cached."""
    from safetensors.torch import load_file, save_file

    path = cache_dir / f"digits04-mlp{hidden}-e{epochs}.safetensors"
    if path.is_file():
        return load_file(str(path))
    torch.manual_seed(0)
    model = DigitsMLP(hidden)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = splits.pretrain
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))
    return state


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


@torch.no_grad()
def evaluate(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    logits = model(data[0])
    return F.cross_entropy(logits, data[1]).item(), (logits.argmax(dim=1) == data[1]).float().mean().item()


@dataclass
class RunResult:
    trainable: int
    losses: dict[int, float]  # step -> loss on the whole training split
    accuracy: float  # on the test split after the last step


def run_method(method: ReproMethod, base_state: dict[str, torch.Tensor], splits: Splits, seed: int,
               args: argparse.Namespace) -> RunResult:
    model = DigitsMLP(args.hidden)
    model.load_state_dict(base_state)
    torch.manual_seed(seed)  # the adapter's random init (LoRA's A)
    mm.attach(model, mm.AdapterConfig.from_dict({**method.config, "targets": TARGETS}))
    x, y = splits.train
    gen = torch.Generator().manual_seed(1000 + seed)
    order = torch.cat([torch.randperm(len(y), generator=gen) for _ in range(args.steps * args.batch // len(y) + 2)])
    batches = [(x[i], y[i]) for i in order.split(args.batch)[: args.steps]]
    if method.init is not None:
        method.init(model, "default", Calibration(batches[: args.calibration_batches], loss_fn))
    params = [p for p in model.parameters() if p.requires_grad]
    make = method.make_optimizer or (lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.0))
    optimizer = make(params, args.lr)
    losses = {0: evaluate(model, splits.train)[0]} if 0 in args.checkpoints else {}
    for step, batch in enumerate(batches, start=1):
        optimizer.zero_grad()
        loss_fn(model, batch).backward()
        optimizer.step()
        if step in args.checkpoints:
            losses[step] = evaluate(model, splits.train)[0]
    return RunResult(sum(p.numel() for p in params), losses, evaluate(model, splits.test)[1])


def mean_std(values: list[float], digits: int = 3) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def format_table(results: dict[str, list[RunResult]], checkpoints: list[int]) -> str:
    header = ["method", "trainable", *[f"loss@{s}" for s in checkpoints], "test acc"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, runs in results.items():
        counts = sorted({r.trainable for r in runs})
        trainable = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        cells = [name, trainable, *[mean_std([r.losses[s] for r in runs]) for s in checkpoints],
                 mean_std([100 * r.accuracy for r in runs], digits=1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("methods", nargs="+", metavar="METHOD", help=f"one or more of: {', '.join(METHODS)}")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--checkpoints", default="0,10,30,100,300", help="steps at which to report the loss")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--calibration-batches", type=int, default=8, help="batches given to data-driven inits")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--pretrain-epochs", type=int, default=40)
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".cache" / "repro")
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; scripts/repro_methods.py has {sorted(METHODS)}")
    args.checkpoints = sorted({int(s) for s in args.checkpoints.split(",") if int(s) <= args.steps})
    args.methods = list(dict.fromkeys(["lora", *args.methods]))
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    torch.set_num_threads(1)  # tiny matmuls: extra threads only spin (badly so on a shared machine)
    start = time.perf_counter()
    splits = digit_splits()
    base_state = pretrained_base(splits, args.hidden, args.pretrain_epochs, args.cache_dir)
    base = DigitsMLP(args.hidden)
    base.load_state_dict(base_state)
    pre_loss, pre_acc = evaluate(base, splits.pretrain)
    results = {name: [run_method(METHODS[name], base_state, splits, seed, args) for seed in range(args.seeds)]
               for name in args.methods}
    text = "\n".join([
        f"base: MLP {args.hidden} pretrained on digits 0-4 (accuracy there {100 * pre_acc:.1f}%, loss "
        f"{pre_loss:.3f}); adapted to digits 5-9 with frozen base and head, adapters on fc1, fc2: {len(splits.train[1])} train / "
        f"{len(splits.test[1])} test images, {args.steps} steps of batch {args.batch}, AdamW lr {args.lr}, "
        f"{args.seeds} seed(s); mean ± std",
        format_table(results, args.checkpoints),
        f"({time.perf_counter() - start:.0f} s)",
    ])
    print(text)
    return text


if __name__ == "__main__":
    main()
