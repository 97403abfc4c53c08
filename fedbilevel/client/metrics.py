"""Scoring of generated answers against reference responses."""

from __future__ import annotations

from typing import Sequence

from rouge_score import rouge_scorer

_SCORER: rouge_scorer.RougeScorer | None = None


def _scorer() -> rouge_scorer.RougeScorer:
    """Return the module-wide ROUGE scorer, building it on first use."""
    global _SCORER
    if _SCORER is None:
        _SCORER = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    return _SCORER


def clean_answer(
    text: str, stop_markers: Sequence[str] = ("### Instruction:", "###")
) -> str:
    """Cut a generated continuation at the end of the response.

    Models often keep going after their answer and start a new prompt block;
    everything from the earliest stop marker on is dropped.

    Parameters
    ----------
    text : str
        The generated text (the continuation after the prompt).
    stop_markers : sequence of str, optional
        Markers that end the response.

    Returns
    -------
    str
        The text before the first marker, stripped of surrounding whitespace.
    """
    positions = [text.find(marker) for marker in stop_markers if marker]
    cut = min((p for p in positions if p >= 0), default=len(text))
    return text[:cut].strip()


def _normalise(text: str) -> str:
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """Whether ``prediction`` equals ``reference``.

    Surrounding whitespace is stripped and internal runs of whitespace are
    collapsed to one space. The comparison is case-sensitive because the
    ``uppercase`` task is only solved with the right case.

    Parameters
    ----------
    prediction, reference : str
        The generated and the reference answer.

    Returns
    -------
    float
        1.0 on a match, else 0.0.
    """
    return float(_normalise(prediction) == _normalise(reference))


def score_answers(
    predictions: Sequence[str], references: Sequence[str]
) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-L and exact match over paired answers.

    ROUGE scores are the F-measures of ``rouge_score`` without stemming. Note
    that ``rouge_score`` lowercases its input, so ROUGE ignores case while
    exact match does not.

    Parameters
    ----------
    predictions : sequence of str
        Generated answers (already cleaned, see :func:`clean_answer`).
    references : sequence of str
        Reference answers, paired with ``predictions`` by position.

    Returns
    -------
    dict of str to float
        ``{"rouge1": ..., "rougeL": ..., "exact_match": ...}``, each in [0, 1].

    Raises
    ------
    ValueError
        If the sequences are empty or their lengths differ.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references differ in length: "
            f"{len(predictions)} predictions, {len(references)} references"
        )
    if not predictions:
        raise ValueError("no answers to score: predictions and references are empty")
    scorer = _scorer()
    totals = {"rouge1": 0.0, "rougeL": 0.0, "exact_match": 0.0}
    for prediction, reference in zip(predictions, references):
        # rouge_score takes (target, prediction) in that order.
        scores = scorer.score(reference, prediction)
        totals["rouge1"] += scores["rouge1"].fmeasure
        totals["rougeL"] += scores["rougeL"].fmeasure
        totals["exact_match"] += exact_match(prediction, reference)
    return {name: total / len(predictions) for name, total in totals.items()}
