"""Tests for answer scoring."""

import pytest

from fedbilevel.client.metrics import clean_answer, exact_match, score_answers


def test_clean_answer_cuts_at_next_instruction():
    assert clean_answer(" big sun \n\n### Instruction:\nmore") == "big sun"


def test_clean_answer_cuts_at_earliest_marker():
    assert clean_answer("a b\n### Response: c\n### Instruction: d") == "a b"


def test_clean_answer_without_marker_strips():
    assert clean_answer("  CAT DOG\n") == "CAT DOG"


def test_clean_answer_custom_markers():
    assert clean_answer("4\nEND junk", stop_markers=("END",)) == "4"


def test_exact_match_case_sensitive():
    assert exact_match("CAT DOG", "CAT DOG") == 1.0
    assert exact_match("cat dog", "CAT DOG") == 0.0


def test_exact_match_whitespace_collapsed():
    assert exact_match("  c   d\ts\n", "c d s") == 1.0
    assert exact_match("cd s", "c d s") == 0.0


def test_rouge_hand_computed():
    # 3 of 3 predicted unigrams match, 3 of 4 reference unigrams are covered:
    # P = 1, R = 0.75, F = 2 * 1 * 0.75 / 1.75; the LCS is the same 3 tokens.
    scores = score_answers(["the cat sat"], ["the cat sat on"])
    expected = 2 * 1 * 0.75 / 1.75
    assert scores["rouge1"] == pytest.approx(expected)
    assert scores["rougeL"] == pytest.approx(expected)
    assert scores["exact_match"] == 0.0


def test_rouge_l_differs_from_rouge1_on_reordering():
    # Reversed words: every unigram matches but the LCS has length 1 of 3.
    scores = score_answers(["sun dog cat"], ["cat dog sun"])
    assert scores["rouge1"] == pytest.approx(1.0)
    assert scores["rougeL"] == pytest.approx(1 / 3)


def test_scores_are_means():
    scores = score_answers(["a b", "x"], ["a b", "y"])
    assert scores == pytest.approx({"rouge1": 0.5, "rougeL": 0.5, "exact_match": 0.5})


def test_rouge_ignores_case_exact_match_does_not():
    scores = score_answers(["cat dog"], ["CAT DOG"])
    assert scores["rouge1"] == pytest.approx(1.0)
    assert scores["exact_match"] == 0.0


def test_empty_inputs_raise():
    with pytest.raises(ValueError, match="empty"):
        score_answers([], [])


def test_length_mismatch_names_both_lengths():
    with pytest.raises(ValueError, match="differ in length") as info:
        score_answers(["a", "b", "c"], ["a"])
    assert "3" in str(info.value) and "1" in str(info.value)
