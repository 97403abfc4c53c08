"""Scoring of generated answers against reference responses.

Every answer that is scored, generated or not, goes through :func:`answer_text`: the text is cut
where the prompt template starts a new block (:func:`clean_answer`) and normalised (:func:`normalise`:
NFKC, whitespace collapsed). Exact match compares these texts (case-sensitive); ROUGE tokenizes the same
texts with :class:`UnicodeTokenizer` (case-folded words, characters of scripts written without spaces).
Predictions, references and baseline answers are treated alike, so a text that is the same as the
reference after normalisation always scores 1.0 on every metric.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Mapping, Sequence

from rouge_score import rouge_scorer

from fedbilevel import protocol
from fedbilevel.data.prompts import PROMPT_TEMPLATE

# The block headers of the prompt template ("### Instruction:", "### Response:"), read from it.
TEMPLATE_HEADERS: tuple[str, ...] = tuple(re.findall(r"(?m)^###[^\n]*:", PROMPT_TEMPLATE))

# Line boundaries as str.splitlines() knows them: a header counts only at the start of a line.
_LINE_START = r"(?:\A|(?<=[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]))"

# Scripts written without spaces between words: ROUGE counts their letters one by one.
_CHARACTER_SCRIPTS: tuple[tuple[int, int], ...] = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x0F00, 0x0FFF),  # Tibetan
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x19E0, 0x19FF),  # Khmer symbols
    (0x2E80, 0x2FDF),  # CJK radicals, Kangxi radicals
    (0x3005, 0x3007),  # 々 〆 〇
    (0x3021, 0x3029),  # Hangzhou numerals
    (0x3031, 0x3035),  # kana repeat marks
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3100, 0x312F),  # Bopomofo
    (0x31A0, 0x31FF),  # Bopomofo extended, CJK strokes, Katakana phonetic extensions
    (0x3400, 0x4DBF),  # CJK unified ideographs extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF66, 0xFF9F),  # halfwidth Katakana (NFKC makes them fullwidth)
    (0x1B000, 0x1B16F),  # kana supplement and extensions
    (0x20000, 0x323AF),  # CJK unified ideographs extensions B to H, compatibility supplement
)
_FIRST_CHARACTER_SCRIPT = min(start for start, _ in _CHARACTER_SCRIPTS)


@functools.cache
def _header_pattern(stop_markers: tuple[str, ...]) -> re.Pattern[str] | None:
    markers = [marker for marker in stop_markers if marker]
    if not markers:
        return None
    return re.compile(_LINE_START + r"[ \t]*(?:" + "|".join(map(re.escape, markers)) + ")")


def clean_answer(text: str, stop_markers: Sequence[str] = TEMPLATE_HEADERS) -> str:
    """Cut a text where the prompt template starts a new block.

    Models often keep going after their answer and start a new prompt block; everything from the
    first line that starts with a stop marker (after optional spaces or tabs) is dropped. A marker
    inside a line, and any other ``###`` (``"### Ingredients"``, ``"C# ### here"``), is part of the
    answer. The end-of-sequence token is handled before decoding
    (:func:`fedbilevel.client.evaluate.generate_answers`).

    Parameters
    ----------
    text : str
        The generated text (the continuation after the prompt), or any answer to be scored.
    stop_markers : sequence of str, default :data:`TEMPLATE_HEADERS`
        Line beginnings that end the answer: the block headers ``"### Instruction:"`` and
        ``"### Response:"`` of :data:`fedbilevel.data.prompts.PROMPT_TEMPLATE`.

    Returns
    -------
    str
        The text before the first such line, stripped of surrounding whitespace.
    """
    pattern = _header_pattern(tuple(stop_markers))
    found = pattern.search(text) if pattern is not None else None
    return (text[: found.start()] if found else text).strip()


def normalise(text: str) -> str:
    """The one normalisation of every scored text: NFKC, then whitespace collapsed.

    Unicode NFKC (compatibility composition: full-width and half-width forms, ligatures, composed
    and decomposed accents become one spelling), then every run of whitespace (``str.split``) becomes
    one space and surrounding whitespace goes. Case is kept.

    Parameters
    ----------
    text : str
        Any text.

    Returns
    -------
    str
        The normalised text; ``normalise(normalise(t)) == normalise(t)``.
    """
    return " ".join(unicodedata.normalize("NFKC", text).split())


def answer_text(text: str) -> str:
    """The text that is scored: :func:`clean_answer`, then :func:`normalise`.

    Applied alike to generated answers, references and baseline answers.

    Parameters
    ----------
    text : str
        A generated, reference or baseline answer.

    Returns
    -------
    str
        The answer as exact match compares it and as ROUGE tokenizes it.
    """
    return normalise(clean_answer(text))


def _by_character(char: str) -> bool:
    code = ord(char)
    return code >= _FIRST_CHARACTER_SCRIPT and any(start <= code <= end for start, end in _CHARACTER_SCRIPTS)


class UnicodeTokenizer:
    """ROUGE tokens of any language, for ``rouge_score.rouge_scorer.RougeScorer(tokenizer=...)``.

    The text is normalised (:func:`normalise`) and case-folded (``str.casefold``). Letters of
    scripts written without spaces between words (Han characters and kana of Chinese and Japanese,
    Thai, Lao, Khmer, Myanmar, Tibetan) are one token each; other runs of letters, digits and combining marks (Unicode
    categories L, N, M) are one token each (Latin, Cyrillic, Greek, Arabic, Hebrew, Devanagari,
    Hangul, ...); a combining mark stays with the letter before it. Everything else (punctuation,
    symbols, whitespace) separates tokens and is dropped, so on ASCII text the tokens are those of
    rouge-score's default tokenizer without stemming (lowercased runs of ``[a-z0-9]``). A text with
    no letters or digits at all (``"!!!"``, emoji) is tokenized into its non-space characters
    instead, so that it still scores 1.0 against itself.
    """

    def tokenize(self, text: str) -> list[str]:
        """The tokens of ``text``.

        Parameters
        ----------
        text : str
            Any text.

        Returns
        -------
        list of str
            Its tokens, in order; empty only for a text that is empty after :func:`normalise`.
        """
        text = normalise(text).casefold()
        tokens: list[str] = []
        current, kind = "", ""  # kind of the token being read: "word", "char" or "" (none)
        for char in text:
            group = unicodedata.category(char)[0]
            if group == "M":  # a combining mark stays with its letter; after anything else it is dropped
                current += char if kind else ""
                continue
            new_kind = ("char" if _by_character(char) else "word") if group in "LN" else ""
            if new_kind != "word" or kind != "word":
                tokens += [current] if current else []
                current = ""
            current += char if new_kind else ""
            kind = new_kind
        tokens += [current] if current else []
        return tokens or _characters(text)


def _characters(text: str) -> list[str]:
    """The non-space characters of ``text``, each with the combining marks that follow it."""
    tokens: list[str] = []
    after_space = True
    for char in text:
        if char.isspace():
            after_space = True
            continue
        if unicodedata.category(char)[0] == "M" and not after_space:
            tokens[-1] += char
        else:
            tokens.append(char)
        after_space = False
    return tokens


_SCORER: rouge_scorer.RougeScorer | None = None


def _scorer() -> rouge_scorer.RougeScorer:
    """Return the module-wide ROUGE scorer (:class:`UnicodeTokenizer`, no stemming), building it on first use."""
    global _SCORER
    if _SCORER is None:
        _SCORER = rouge_scorer.RougeScorer(["rouge1", "rougeL"], tokenizer=UnicodeTokenizer())
    return _SCORER


def exact_match(prediction: str, reference: str) -> float:
    """Whether ``prediction`` and ``reference`` are the same answer.

    Both are compared as :func:`answer_text` gives them: cut where a new template block starts,
    NFKC-normalised, whitespace collapsed. The comparison is case-sensitive because the
    ``uppercase`` task is only solved with the right case (ROUGE ignores case).

    Parameters
    ----------
    prediction, reference : str
        The generated (or chosen) and the reference answer.

    Returns
    -------
    float
        1.0 on a match, else 0.0.
    """
    return float(answer_text(prediction) == answer_text(reference))


def score_items(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    """ROUGE-1, ROUGE-L and exact match of each paired answer.

    Predictions and references are treated alike: each goes through :func:`answer_text` (cut where
    a new template block starts, NFKC, whitespace collapsed), exact match compares those texts
    (case-sensitive, see :func:`exact_match`) and ROUGE (the F-measures of ``rouge_score``, no
    stemming) tokenizes the same texts with :class:`UnicodeTokenizer` (case-folded). So a pair with
    exact match 1.0 has ROUGE 1.0 too, also when both texts are empty. The per-item lists let the
    server bootstrap over test items; :func:`score_answers` gives their means.

    Parameters
    ----------
    predictions : sequence of str
        Generated answers (raw or cleaned by :func:`clean_answer`), or a baseline answer per item.
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
            f"predictions and references differ in length: {len(predictions)} predictions, {len(references)} references"
        )
    if not predictions:
        raise ValueError("no answers to score: predictions and references are empty")
    scorer = _scorer()
    items: dict[str, list[float]] = {name: [] for name in protocol.TEXT_METRICS}
    for raw_prediction, raw_reference in zip(predictions, references):
        prediction, reference = answer_text(raw_prediction), answer_text(raw_reference)
        if not prediction and not reference:  # nothing to compare (rouge_score gives 0.0): the same text
            rouge1 = rouge_l = 1.0
        else:
            # rouge_score takes (target, prediction) in that order.
            scores = scorer.score(reference, prediction)
            rouge1, rouge_l = float(scores["rouge1"].fmeasure), float(scores["rougeL"].fmeasure)
        items["rouge1"].append(rouge1)
        items["rougeL"].append(rouge_l)
        items["exact_match"].append(float(prediction == reference))
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


def score_answers(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-L and exact match over paired answers.

    The means of :func:`score_items` (see there for how items are scored): both sides go through
    :func:`answer_text`, so a baseline such as ``score_answers([answer] * n, references)`` is
    scored exactly as generated answers are.

    Parameters
    ----------
    predictions : sequence of str
        Generated answers (raw or cleaned by :func:`clean_answer`), or a baseline answer per item.
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
        raise ValueError(
            f"macro_f1: {len(labels)} labels and {len(predictions)} predictions; expected the same number, at least one"
        )
    scores = []
    for cls in sorted(set(labels) | set(predictions)):
        tp = sum(y == cls and p == cls for y, p in zip(labels, predictions))
        fp = sum(y != cls and p == cls for y, p in zip(labels, predictions))
        fn = sum(y == cls and p != cls for y, p in zip(labels, predictions))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)
