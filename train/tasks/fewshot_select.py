"""Learning-rate selection for few-shot recipes on validation images carved from the training split.

The validation images are training-split images of the same classes that are *not* among the shots (so the
test split is never looked at), at most ``per_class`` of each class, drawn with the run's seed. Each
candidate lr trains the recipe on the shots from the same initialisation; the one with the best validation
accuracy wins (ties: the smaller lr), and its trained encoder is the run's result (training again with the
same lr, seed and shots would give the same model). ``mmtune fewshot --select lr`` and
``scripts/sweep_fewshot_lr.py`` both use it.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_LR_FACTORS = (0.1, 1 / 3, 1.0, 3.0)  # candidates around the recipe's lr (half-decade steps)


def validation_pool(train_samples: Sequence, shots_taken: Sequence) -> list:
    """The train-split samples that are not among the shots (compared by file path)."""
    taken = {str(s.path) for s in shots_taken}
    return [s for s in train_samples if str(s.path) not in taken]


def carve_validation(train_samples: Sequence, shots_taken: Sequence, per_class: int, seed: int,
                     classes: Sequence[str]) -> list:
    """Up to ``per_class`` images of every class from the validation pool, drawn with ``seed``; a class with
    no image outside the shots is an error naming it (there is nothing to validate on)."""
    from data.fewshot import FewShotDataError

    by_class: dict[int, list] = {}
    for sample in validation_pool(train_samples, shots_taken):
        by_class.setdefault(sample.label, []).append(sample)
    empty = [classes[i] for i in range(len(classes)) if not by_class.get(i)]
    if empty:
        raise FewShotDataError(f"--select lr: class(es) {empty} have no training image outside the shots to "
                               "validate on; use fewer shots or add images")
    rng = random.Random(seed)
    chosen = []
    for label in sorted(by_class):
        pool = sorted(by_class[label], key=lambda s: str(s.path))
        chosen += rng.sample(pool, min(per_class, len(pool)))
    return chosen


def candidate_lrs(base_lr: float, lrs: Sequence[float] | None, factors: Sequence[float] = DEFAULT_LR_FACTORS) -> list[float]:
    """``lrs`` when given, else the recipe's lr times each factor (rounded to 3 significant digits)."""
    values = list(lrs) if lrs else [float(f"{base_lr * f:.3g}") for f in factors]
    return sorted(set(values))


@dataclass
class Selection:
    lr: float
    scores: dict[float, float]  # lr -> validation accuracy
    encoder: Any  # the encoder trained with ``lr``
    head: Any
    seconds: float  # training time of every candidate together


def select_lr(recipe, lrs: Sequence[float], train_candidate: Callable, score: Callable) -> Selection:
    """Trains ``recipe`` at each lr (``train_candidate(recipe) -> (encoder, head, seconds)``), scores it on
    validation (``score(encoder, head) -> accuracy``) and keeps the best."""
    best, scores, seconds = None, {}, 0.0
    for lr in lrs:
        encoder, head, spent = train_candidate(dataclasses.replace(recipe, lr=lr))
        seconds += spent
        scores[lr] = score(encoder, head)
        if best is None or scores[lr] > scores[best[0]]:
            best = (lr, encoder, head)
    return Selection(best[0], scores, best[1], best[2], seconds)
