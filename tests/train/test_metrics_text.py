"""WER / CER (computed by jiwer) against hand-counted cases, and against jiwer's own corpus functions."""

from __future__ import annotations

import pytest

from train.tasks.metrics_text import (
    EditCounts,
    char_error_rate,
    edit_counts,
    normalize_text,
    utterance_wer,
    word_error_rate,
)


@pytest.mark.parametrize("ref, hyp, counts", [
    ("the cat sat", "the cat sat", EditCounts(0, 0, 0, 3)),
    ("a b c d", "a x c", EditCounts(1, 1, 0, 4)),       # b -> x, d deleted
    ("a b", "a b c d", EditCounts(0, 0, 2, 2)),         # two insertions
    ("a b c", "", EditCounts(0, 3, 0, 3)),
    ("one two three", "two three four", EditCounts(0, 1, 1, 3)),  # shift: delete 'one', insert 'four'
])
def test_word_edit_counts_match_hand_counts(ref, hyp, counts):
    assert edit_counts([ref], [hyp]) == counts


def test_kitten_sitting_is_three_edits():
    counts = edit_counts(["kitten"], ["sitting"], "char")
    assert counts.errors == 3 and counts.substitutions == 2 and counts.insertions == 1


def test_corpus_wer_sums_edits_over_utterances():
    assert word_error_rate(["a b", "c d e f"], ["a", "c d e f"]) == pytest.approx(1 / 6)
    assert word_error_rate(["hello world"], ["hello duck"]) == pytest.approx(0.5)
    assert word_error_rate(["a b"], ["a b c d"]) == pytest.approx(1.0)
    assert word_error_rate(["a"], ["b c d"]) == pytest.approx(3.0)  # WER is not capped at 1


def test_cer_counts_characters_and_spaces():
    assert char_error_rate(["abc"], ["abd"]) == pytest.approx(1 / 3)
    assert char_error_rate(["hello world"], ["hello word"]) == pytest.approx(1 / 11)
    assert char_error_rate(["ab cd"], ["abcd"]) == pytest.approx(1 / 5)


CASES = [
    (["the cat sat on the mat", "turn left now"], ["the cat sit on mat", "turn left left now please"]),
    (["three one four", "open the door"], ["three four", "close door"]),
    (["go back", "volume up"], ["", "volume up up"]),
]


@pytest.mark.parametrize("refs, hyps", CASES)
def test_agrees_with_jiwer_corpus_functions(refs, hyps):
    import jiwer

    assert word_error_rate(refs, hyps) == pytest.approx(jiwer.wer(refs, hyps))
    assert char_error_rate(refs, hyps) == pytest.approx(jiwer.cer(refs, hyps))


def test_utterance_wer():
    assert utterance_wer("a b c d", "a x c") == pytest.approx(0.5)
    assert utterance_wer("!!", "a") is None  # empty reference after normalisation: undefined


def test_normalisation():
    assert normalize_text("  Hello,   World!  ") == "hello world"
    assert word_error_rate(["Hello, World!"], ["hello world"]) == 0.0
    assert word_error_rate(["don't stop"], ["dont stop"]) == pytest.approx(0.5)  # apostrophes count


def test_bad_input():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        word_error_rate(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty"):
        word_error_rate(["", "!!"], ["a", "b"])
    with pytest.raises(TypeError, match="lists of utterances"):
        word_error_rate("a b", "a b")
