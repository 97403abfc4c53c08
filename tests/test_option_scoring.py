"""Option-likelihood scoring and the per-item scores of the shared evaluation loop (tiny model)."""

import math

import pytest
import torch
from flwr.app import MetricRecord

from fedbilevel.client import evaluate
from fedbilevel.client.evaluate import (
    evaluate_adapter,
    option_predictions,
    option_scores,
)
from fedbilevel.client.metrics import score_answers, score_items
from fedbilevel.data.prompts import format_prompt
from fedbilevel.data.types import Example
from fedbilevel.models.adapter import build_lora_model
from fedbilevel.models.settings import LoraSettings
from fedbilevel.models.zoo import TINY_MODEL, load_tokenizer

NLI = Example(
    instruction=(
        "Premise: a dog runs.\nHypothesis: an animal moves.\nOPTIONS:\n- yes\n- it is not possible to tell\n- no"
    ),
    output="yes",
    task="entailment",
)
PARAPHRASE = Example(
    instruction="Do these mean the same?\nA: the cat sat\nB: a cat was sitting\nOPTIONS:\n- no\n- yes",
    output="yes",
    task="paraphrase",
)
# Far longer than the others, so that they are heavily padded when batched with it.
LONG = Example(
    instruction="Is the following sentence acceptable? "
    + "the quick brown fox jumps over the lazy dog " * 6
    + "\nOPTIONS:\n- unacceptable\n- acceptable",
    output="acceptable",
    task="linguistic_acceptability",
)
FREE = Example(instruction="Reverse the words: sun dog", output="dog sun", task="text_formatting")


@pytest.fixture(scope="module")
def tiny():
    return build_lora_model(TINY_MODEL, LoraSettings(), seed=0), load_tokenizer(TINY_MODEL)


def unbatched_scores(model, tokenizer, instruction, options):
    """Sum of log p(token) over option + EOS, one sequence at a time, no padding, no mask."""
    prompt = tokenizer(format_prompt(instruction), add_special_tokens=False)["input_ids"]
    scores = []
    for option in options:
        answer = tokenizer(option, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            log_probs = model(ids).logits[0].log_softmax(-1)
        scores.append(sum(log_probs[len(prompt) + k - 1, token].item() for k, token in enumerate(answer)))
    return scores


def kwargs(batch_size=8):
    return {"batch_size": batch_size, "bf16_autocast": False, "device": "cpu"}


def test_batched_scores_equal_an_unbatched_loop(tiny):
    model, tokenizer = tiny
    expected = unbatched_scores(model, tokenizer, NLI.instruction, ["yes", "it is not possible to tell", "no"])
    scores = option_scores(model, tokenizer, [PARAPHRASE, NLI], **kwargs())[1]
    assert scores == pytest.approx(expected, abs=1e-4)
    best = max(range(3), key=expected.__getitem__)
    assert (
        option_predictions(model, tokenizer, [PARAPHRASE, NLI], **kwargs())[1]
        == ["yes", "it is not possible to tell", "no"][best]
    )


def test_padding_does_not_change_scores(tiny):
    model, tokenizer = tiny
    alone = option_scores(model, tokenizer, [NLI], **kwargs())[0]
    with_long = option_scores(model, tokenizer, [LONG, NLI], **kwargs())
    assert with_long[1] == pytest.approx(alone, abs=1e-4)
    # And the long item scores the same as on its own (it is the one that is not padded).
    assert with_long[0] == pytest.approx(option_scores(model, tokenizer, [LONG], **kwargs())[0], abs=1e-4)


def test_batch_size_does_not_change_scores(tiny):
    model, tokenizer = tiny
    items = [NLI, FREE, LONG, PARAPHRASE]
    one_by_one = option_scores(model, tokenizer, items, **kwargs(batch_size=1))
    together = option_scores(model, tokenizer, items, **kwargs(batch_size=4))
    assert one_by_one[1] is None and together[1] is None
    for a, b in zip(one_by_one, together):
        if a is not None:
            assert b == pytest.approx(a, abs=1e-4)


def test_items_without_options_give_none(tiny):
    model, tokenizer = tiny
    assert option_predictions(model, tokenizer, [FREE, NLI, FREE], **kwargs())[0::2] == [None, None]
    assert option_scores(model, tokenizer, [FREE], **kwargs()) == [None]


def test_length_normalised_is_the_mean_over_option_and_eos_tokens(tiny):
    model, tokenizer = tiny
    summed = option_scores(model, tokenizer, [NLI], **kwargs())[0]
    mean = option_scores(model, tokenizer, [NLI], **kwargs(), length_normalised=True)[0]
    # The tiny tokenizer is byte-level: one token per character, plus EOS.
    lengths = [len("yes") + 1, len("it is not possible to tell") + 1, len("no") + 1]
    assert mean == pytest.approx([s / n for s, n in zip(summed, lengths)], abs=1e-5)


def test_ties_go_to_the_first_listed_option(tiny, monkeypatch):
    model, tokenizer = tiny
    monkeypatch.setattr(evaluate, "option_scores", lambda *args, **kw: [[-1.0, -3.0, -1.0], [-2.0, -0.5]])
    assert option_predictions(model, tokenizer, [NLI, PARAPHRASE], **kwargs()) == ["yes", "yes"]


def test_option_accuracy_is_one_for_the_argmax_and_zero_for_another_option(tiny):
    model, tokenizer = tiny
    items = [NLI, FREE, PARAPHRASE, LONG]
    predicted = option_predictions(model, tokenizer, items, **kwargs())
    others = {
        NLI: ["yes", "it is not possible to tell", "no"],
        PARAPHRASE: ["no", "yes"],
        LONG: ["unacceptable", "acceptable"],
    }
    right = [Example(e.instruction, p if p is not None else e.output, e.task) for e, p in zip(items, predicted)]
    wrong = [
        Example(e.instruction, next(o for o in others[e] if o != p), e.task) if p is not None else e
        for e, p in zip(items, predicted)
    ]
    common = {"batch_size": 3, "max_new_tokens": 2, "bf16_autocast": False}
    scores = evaluate_adapter(model, tokenizer, right, **common)
    assert scores["option_accuracy"] == 1.0
    assert scores["option_items"] == 3
    assert scores["items-option_correct"] == [1.0, 1.0, 1.0]
    scores = evaluate_adapter(model, tokenizer, wrong, **common)
    assert scores["option_accuracy"] == 0.0
    assert scores["items-option_correct"] == [0.0, 0.0, 0.0]
    half = [right[0], right[1], wrong[2], wrong[3]]
    scores = evaluate_adapter(model, tokenizer, half, **common)
    assert scores["option_accuracy"] == pytest.approx(1 / 3)
    assert scores["items-option_correct"] == [1.0, 0.0, 0.0]
    assert len(scores["items-rouge1"]) == 4


def test_per_item_lists_average_to_the_reported_means(tiny, monkeypatch):
    model, tokenizer = tiny
    # Fixed generations make the ROUGE and exact-match values hand-checkable.
    monkeypatch.setattr(evaluate, "generate_answers", lambda *args, **kw: ["the cat sat", "dog sun", "yes"])
    items = [
        Example("Say it: the cat sat on", "the cat sat on", "copy"),
        FREE,
        Example(NLI.instruction, "no", NLI.task),
    ]
    scores = evaluate_adapter(model, tokenizer, items, batch_size=2, max_new_tokens=2, bf16_autocast=False)
    f = 2 * 1 * 0.75 / 1.75  # P = 3/3, R = 3/4
    assert scores["items-rouge1"] == pytest.approx([f, 1.0, 0.0])
    assert scores["items-rougeL"] == pytest.approx([f, 1.0, 0.0])
    assert scores["items-exact_match"] == [0.0, 1.0, 0.0]
    for name in ("rouge1", "rougeL", "exact_match"):
        assert scores[name] == pytest.approx(sum(scores[f"items-{name}"]) / 3)
    assert scores["option_items"] == 1 and len(scores["items-option_correct"]) == 1
    assert scores["option_accuracy"] == scores["items-option_correct"][0]
    # Everything fits a Flower MetricRecord, with no NaN and the right types.
    MetricRecord(scores)
    assert isinstance(scores["option_items"], int)
    assert all(
        isinstance(v, float) and math.isfinite(v) for k, v in scores.items() if k.startswith("items-") for v in v
    )


def test_option_keys_absent_without_options_or_when_disabled(tiny):
    model, tokenizer = tiny
    common = {"batch_size": 2, "max_new_tokens": 2, "bf16_autocast": False}
    option_keys = {"option_accuracy", "option_items", "items-option_correct"}
    expected = {"rouge1", "rougeL", "exact_match", "items-rouge1", "items-rougeL", "items-exact_match", "eval-seconds"}
    assert set(evaluate_adapter(model, tokenizer, [FREE, FREE], **common)) == expected
    disabled = evaluate_adapter(model, tokenizer, [NLI, FREE], **common, score_options=False)
    assert set(disabled) == expected and not option_keys & set(disabled)
    assert set(evaluate_adapter(model, tokenizer, [NLI, FREE], **common)) == expected | option_keys


def test_score_items_are_per_answer_and_average_to_score_answers():
    items = score_items(["a b", "x", "the cat sat"], ["a b", "y", "the cat sat on"])
    f = 2 * 1 * 0.75 / 1.75  # P = 3/3, R = 3/4
    assert items["exact_match"] == [1.0, 0.0, 0.0]
    assert items["rouge1"] == pytest.approx([1.0, 0.0, f])
    assert score_answers(["a b", "x", "the cat sat"], ["a b", "y", "the cat sat on"]) == pytest.approx(
        {name: sum(values) / 3 for name, values in items.items()}
    )


def test_score_items_validates_like_score_answers():
    with pytest.raises(ValueError, match="empty"):
        score_items([], [])
    with pytest.raises(ValueError, match="differ in length"):
        score_items(["a"], [])
