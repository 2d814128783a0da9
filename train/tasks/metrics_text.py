"""Word and character error rates (WER, CER) from a Levenshtein alignment.

Corpus-level, as speech recognition reports them (and as jiwer computes them): the edits (substitutions
+ deletions + insertions) summed over all utterances, divided by the reference words (characters) summed
over all utterances. Text is normalised first: lower case, punctuation other than apostrophes dropped,
whitespace collapsed. Pure Python, no dependency.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_PUNCTUATION = re.compile(r"[^\w\s']")


def normalize_text(text: str) -> str:
    """Lower case, punctuation (but apostrophes) removed, runs of whitespace -> one space, stripped."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


@dataclass(frozen=True)
class EditCounts:
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    reference_length: int = 0

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    def __add__(self, other: EditCounts) -> EditCounts:
        return EditCounts(self.substitutions + other.substitutions, self.deletions + other.deletions,
                          self.insertions + other.insertions, self.reference_length + other.reference_length)


def align(reference: Sequence, hypothesis: Sequence) -> EditCounts:
    """Minimum-edit alignment of two token sequences, split into S, D and I (ties prefer substitution)."""
    # Each cell holds (total, substitutions, deletions, insertions) of the best path to it.
    previous = [(j, 0, 0, j) for j in range(len(hypothesis) + 1)]
    for i, ref_token in enumerate(reference, start=1):
        current = [(i, 0, i, 0)]
        for j, hyp_token in enumerate(hypothesis, start=1):
            diag = previous[j - 1]
            match = ref_token == hyp_token
            candidates = (
                (diag[0] + (not match), diag[1] + (not match), diag[2], diag[3]),
                (previous[j][0] + 1, previous[j][1], previous[j][2] + 1, previous[j][3]),  # deletion
                (current[j - 1][0] + 1, current[j - 1][1], current[j - 1][2], current[j - 1][3] + 1),  # insertion
            )
            current.append(min(candidates, key=lambda c: c[0]))
        previous = current
    _, subs, dels, ins = previous[-1]
    return EditCounts(subs, dels, ins, len(reference))


def _rate(references: Sequence[str], hypotheses: Sequence[str], split) -> float:
    if isinstance(references, str) or isinstance(hypotheses, str):
        raise TypeError("pass lists of utterances, not single strings")
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    total = EditCounts()
    for ref, hyp in zip(references, hypotheses, strict=True):
        total = total + align(split(normalize_text(ref)), split(normalize_text(hyp)))
    if total.reference_length == 0:
        raise ValueError("the references are empty after normalisation: the error rate is undefined")
    return total.errors / total.reference_length


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER: word edits / reference words (may exceed 1 with many insertions)."""
    return _rate(references, hypotheses, str.split)


def char_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus CER over characters of the normalised text, spaces included (as jiwer's cer)."""
    return _rate(references, hypotheses, list)
