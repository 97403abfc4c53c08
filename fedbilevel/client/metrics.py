"""Scoring of generated answers against reference responses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rouge_score import rouge_scorer

from fedbilevel import protocol

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




def score_items(
    predictions: Sequence[str], references: Sequence[str]
) -> dict[str, list[float]]:
    """ROUGE-1, ROUGE-L and exact match of each paired answer.

    ROUGE scores are the F-measures of ``rouge_score`` without stemming. Note
    that ``rouge_score`` lowercases its input, so ROUGE ignores case while
    exact match does not. The per-item lists let the server bootstrap over test
    items; :func:`score_answers` gives their means.

    Parameters
    ----------
    predictions : sequence of str
        Generated answers (already cleaned, see :func:`clean_answer`).
    references : sequence of str
        Reference answers, paired with ``predictions`` by position.

    Returns
    -------
    dict of str to list of float
        ``{"rouge1": [...], "rougeL": [...], "exact_match": [...]}`` (the keys of
        :data:`fedbilevel.protocol.TEXT_METRICS`), each a list of Python floats in [0, 1] with one
        entry per answer, in the order of ``predictions``.

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
    items: dict[str, list[float]] = {name: [] for name in protocol.TEXT_METRICS}
    for prediction, reference in zip(predictions, references):
        # rouge_score takes (target, prediction) in that order.
        scores = scorer.score(reference, prediction)
        items["rouge1"].append(float(scores["rouge1"].fmeasure))
        items["rougeL"].append(float(scores["rougeL"].fmeasure))
        items["exact_match"].append(exact_match(prediction, reference))
    return items


def mean_scores(items: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """The mean of each list of per-item scores.

    Parameters
    ----------
    items : mapping of str to sequence of float
        Per-item scores, e.g. from :func:`score_items`; every list non-empty.

    Returns
    -------
    dict of str to float
        The same keys, each mapped to the mean of its list.

    Raises
    ------
    ValueError
        If a list is empty.
    """
    empty = [name for name, values in items.items() if not values]
    if empty:
        raise ValueError(f"no scores to average for {', '.join(empty)}")
    return {name: sum(values) / len(values) for name, values in items.items()}


def score_answers(
    predictions: Sequence[str], references: Sequence[str]
) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-L and exact match over paired answers.

    The means of :func:`score_items` (see there for how items are scored).

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
    return mean_scores(score_items(predictions, references))


def macro_f1(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """Unweighted mean F1 over the classes that occur in ``labels`` or ``predictions``.

    A class's F1 is 2·TP / (2·TP + FP + FN); a class predicted but never present scores 0.
    """
    if len(labels) != len(predictions) or not labels:
        raise ValueError(f"macro_f1: {len(labels)} labels and {len(predictions)} predictions; expected the same number, at least one")
    scores = []
    for cls in sorted(set(labels) | set(predictions)):
        tp = sum(y == cls and p == cls for y, p in zip(labels, predictions))
        fp = sum(y != cls and p == cls for y, p in zip(labels, predictions))
        fn = sum(y == cls and p != cls for y, p in zip(labels, predictions))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)
