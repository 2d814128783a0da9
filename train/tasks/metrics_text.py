"""Word and character error rates (WER, CER), computed by ``jiwer`` on normalised text.

Corpus-level, as speech recognition reports them: the edits (substitutions + deletions + insertions)
summed over all utterances, divided by the reference words (characters) summed over all utterances. Text
is normalised first: lower case, punctuation other than apostrophes dropped, whitespace collapsed. CER
counts the characters of the normalised text, spaces included (jiwer's ``cer``).
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

    @property
    def rate(self) -> float | None:
        """Errors per reference token; None when the reference is empty (the rate is undefined)."""
        return self.errors / self.reference_length if self.reference_length else None


def _check(references: Sequence[str], hypotheses: Sequence[str]) -> tuple[list[str], list[str]]:
    if isinstance(references, str) or isinstance(hypotheses, str):
        raise TypeError("pass lists of utterances, not single strings")
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    return [normalize_text(r) for r in references], [normalize_text(h) for h in hypotheses]


def edit_counts(references: Sequence[str], hypotheses: Sequence[str], unit: str = "word") -> EditCounts:
    """Summed S, D, I and reference length over utterances (``unit``: 'word' or 'char'), from jiwer's
    minimum-edit alignment of the normalised texts. Empty references add nothing (jiwer rejects them)."""
    import jiwer

    refs, hyps = _check(references, hypotheses)
    kept = [(r, h) for r, h in zip(refs, hyps, strict=True) if r]
    inserted = sum(len(h.split() if unit == "word" else h) for r, h in zip(refs, hyps, strict=True) if not r)
    if not kept:
        return EditCounts(0, 0, inserted, 0)
    process = jiwer.process_words if unit == "word" else jiwer.process_characters
    out = process([r for r, _ in kept], [h for _, h in kept])
    return EditCounts(out.substitutions, out.deletions, out.insertions + inserted,
                      out.hits + out.substitutions + out.deletions)


def _rate(references: Sequence[str], hypotheses: Sequence[str], unit: str) -> float:
    counts = edit_counts(references, hypotheses, unit)
    if counts.reference_length == 0:
        raise ValueError("the references are empty after normalisation: the error rate is undefined")
    return counts.errors / counts.reference_length


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus WER: word edits / reference words (may exceed 1 with many insertions)."""
    return _rate(references, hypotheses, "word")


def char_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus CER over characters of the normalised text, spaces included (as jiwer's cer)."""
    return _rate(references, hypotheses, "char")


def utterance_wer(reference: str, hypothesis: str) -> float | None:
    """One utterance's WER; None when its reference is empty after normalisation."""
    return edit_counts([reference], [hypothesis], "word").rate
