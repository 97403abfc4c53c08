"""The one evaluation loop every strategy shares: batched greedy generation, option scoring, then scores.

Every test item is answered by greedy generation and scored by ROUGE and exact match
(:mod:`fedbilevel.client.metrics`: answers and references are cut, normalised and tokenized alike). Items whose
instruction lists answer options (Flan's ``OPTIONS:`` lists, see :func:`fedbilevel.data.flan.answer_options`)
are also classified by option likelihood, the standard Flan/T0 rank-classification evaluation: the
predicted option is the one whose tokens (and the EOS token) the model finds most likely after the prompt.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import TypeVar

import torch

from fedbilevel import protocol
from fedbilevel.client.metrics import (
    clean_answer,
    exact_match,
    mean_scores,
    score_items,
)
from fedbilevel.client.train import encode_answer, encode_prompt
from fedbilevel.data.flan import answer_options
from fedbilevel.data.prompts import format_prompt
from fedbilevel.data.types import Example

T = TypeVar("T")
# Entered around the model's calls on the evaluated items at these indices (FedDPA's per-item adapter weights).
Rows = Callable[[range], AbstractContextManager]


def batches(items: Sequence[T], batch_size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of ``items`` with at most ``batch_size`` items each."""
    if batch_size < 1:
        raise ValueError(f"batch_size: {batch_size}; expected an integer >= 1")
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def _in_groups(count: int, size: int, rows: Rows | None, run: Callable[[slice], list[T]]) -> list[T]:
    """``run`` over the ``count`` items at once, or, with ``rows``, over consecutive groups of at most ``size``
    items, each inside ``rows(their indices)``; the results concatenated."""
    if rows is None:
        return run(slice(0, count))
    out: list[T] = []
    for start in range(0, count, size):
        part = range(start, min(start + size, count))
        with rows(part):
            out += run(slice(part.start, part.stop))
    return out


def autocast_bf16(device: torch.device | str, enabled: bool) -> torch.autocast:
    """bf16 autocast on ``device``'s type when ``enabled``, else a no-op context."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer,
    instructions: Sequence[str],
    *,
    batch_size: int,
    max_new_tokens: int,
    bf16_autocast: bool,
    device: torch.device | str = "cpu",
) -> list[str]:
    """Greedy answers to the instructions, cut at the end of the response.

    Prompts are left-padded (the tokenizer's padding side must be "left") so that every
    sequence in a batch continues from its own last prompt token. Each continuation is cut at its
    first end-of-sequence token, decoded as written (special tokens dropped, no clean-up of spaces
    before punctuation, which would change the answer but not the reference), then cut where it
    starts a new template block (:func:`clean_answer`: a line starting ``### Instruction:`` or
    ``### Response:``).

    Parameters
    ----------
    model : torch.nn.Module
        A causal LM (e.g. the LoRA-wrapped model) on ``device``; it is put in eval mode.
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer, with ``padding_side="left"`` and a pad token.
    instructions : sequence of str
        Instructions without the template (:func:`format_prompt` is applied).
    batch_size : int
        Prompts per ``generate`` call.
    max_new_tokens : int
        Longest continuation.
    bf16_autocast : bool
        Run the model under bfloat16 autocast.
    device : torch.device or str, default "cpu"
        Where the model is.

    Returns
    -------
    list of str
        One answer per instruction, in order.

    Raises
    ------
    ValueError
        If the tokenizer pads on the right.
    """
    if tokenizer.padding_side != "left":
        raise ValueError(f"tokenizer.padding_side: {tokenizer.padding_side!r}; batched generation needs 'left'")
    model.eval()
    answers: list[str] = []
    for batch in batches(instructions, batch_size):
        prompts = [format_prompt(text) for text in batch]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with autocast_bf16(device, bf16_autocast):
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        new_tokens = [
            _before_eos(row.tolist(), tokenizer.eos_token_id) for row in output[:, inputs["input_ids"].shape[1] :]
        ]
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        answers += [clean_answer(text) for text in texts]
    return answers


def _before_eos(token_ids: list[int], eos_token_id: int | None) -> list[int]:
    """The token ids before the first end-of-sequence token (all of them if there is none)."""
    if eos_token_id is None or eos_token_id not in token_ids:
        return token_ids
    return token_ids[: token_ids.index(eos_token_id)]


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _left_padded(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows aligned to the right edge: (input ids, attention mask)."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        input_ids[r, width - len(row) :] = torch.tensor(row)
        mask[r, width - len(row) :] = 1
    return input_ids, mask


def _options_log_probs(
    model: torch.nn.Module,
    prompts: Sequence[list[int]],
    answers: Sequence[Sequence[list[int]]],
    *,
    pad_id: int,
    bf16_autocast: bool,
    device: torch.device | str,
    length_normalised: bool,
) -> list[list[float]]:
    """Per prompt, the log-probability of each of its answers (token ids) following it.

    The prompts go through the model once (left-padded, positions counted from each row's
    first token) and their key/value cache is repeated for each of their answers, which then
    go through in one right-padded pass: the shared prompt is not recomputed per option, and
    logits are computed at the answer tokens only. Log-softmax in float32.
    """
    prompt_ids, prompt_mask = _left_padded(prompts, pad_id)
    with autocast_bf16(device, bf16_autocast):
        prompt_out = model(
            input_ids=prompt_ids.to(device),
            attention_mask=prompt_mask.to(device),
            position_ids=(prompt_mask.cumsum(dim=1) - 1).clamp(min=0).to(device),
            use_cache=True,
            logits_to_keep=1,
        )
    owner = torch.tensor([p for p, listed in enumerate(answers) for _ in listed])
    rows = [answer for listed in answers for answer in listed]
    width = max(len(answer) for answer in rows)
    answer_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    answer_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, answer in enumerate(rows):
        answer_ids[r, : len(answer)] = torch.tensor(answer)
        answer_mask[r, : len(answer)] = 1
    # transformers renamed past_key_values to cache (5.2x); accept both spellings.
    keyword = "cache" if "cache" in inspect.signature(_causal_lm(model).forward).parameters else "past_key_values"
    cache = prompt_out[keyword]
    cache.batch_select_indices(owner.to(device))  # each prompt's cache, once per answer
    positions = prompt_mask.sum(dim=1)[owner].unsqueeze(1) + torch.arange(width).unsqueeze(0)
    with autocast_bf16(device, bf16_autocast):
        logits = model(
            input_ids=answer_ids.to(device),
            attention_mask=torch.cat([prompt_mask[owner], answer_mask], dim=1).to(device),
            position_ids=positions.to(device),
            **{keyword: cache},
        ).logits  # (rows, width, vocabulary): column t predicts answer token t + 1
    # Answer token 0 is predicted by the prompt's last position, token t by answer column t - 1.
    predicting = torch.cat([prompt_out.logits[owner.to(device), -1:], logits[:, :-1]], dim=1)
    scored = answer_mask.bool().to(device)
    picked = predicting[scored].float().log_softmax(dim=-1)  # (answer tokens, vocabulary)
    token_log_probs = torch.zeros(scored.shape, dtype=torch.float32, device=picked.device)
    token_log_probs[scored] = picked.gather(-1, answer_ids.to(device)[scored].unsqueeze(-1)).squeeze(-1)
    totals = token_log_probs.sum(dim=1)
    if length_normalised:
        totals = totals / scored.sum(dim=1)
    totals = totals.tolist()
    out, first = [], 0
    for listed in answers:
        out.append(totals[first : first + len(listed)])
        first += len(listed)
    return out


@torch.no_grad()
def option_scores(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int,
    bf16_autocast: bool,
    device: torch.device | str = "cpu",
    length_normalised: bool = False,
) -> list[list[float] | None]:
    """Log-likelihood of each answer option of each example, given its prompt.

    An option is scored as if it were the example's answer: the prompt
    (``format_prompt(instruction)``) and the option followed by the EOS token, tokenized
    exactly as in training (:func:`fedbilevel.client.train.encode_for_training`: prompt and
    answer apart, no truncation), and its score is the sum of the log-probabilities of the
    option's tokens and the EOS token. The EOS token makes an option that is only a prefix of
    the model's answer (e.g. ``"no"`` against ``"not"``) less likely than the complete one.

    The sum (the default) is the option's log-probability as a whole, the standard scoring of
    Flan/T0 rank classification; it favours short options. ``length_normalised=True`` divides
    by the number of scored tokens (option tokens + 1), the mean per-token log-probability,
    which removes that bias but mis-ranks options that share a long likely prefix.

    ``batch_size`` examples (those with options; the others are skipped) go through the model
    together: their prompts once, then all their options on the prompts' cache.

    Parameters
    ----------
    model : torch.nn.Module
        A causal LM on ``device``; it is put in eval mode.
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer, with an EOS and a pad token (its padding side does not matter).
    examples : sequence of Example
        Items to score; only their instructions are used.
    batch_size : int
        Examples per batch (a batch holds all their options).
    bf16_autocast : bool
        Run the model under bfloat16 autocast (log-softmax is taken in float32).
    device : torch.device or str, default "cpu"
        Where the model is.
    length_normalised : bool, default False
        Divide each sum by its number of scored tokens.

    Returns
    -------
    list of (list of float or None)
        Per example, the scores of the options that
        :func:`fedbilevel.data.flan.answer_options` reads from its instruction (in that order),
        or ``None`` if the instruction lists no options.
    """
    options = [answer_options(example.instruction) for example in examples]
    with_options = [index for index, listed in enumerate(options) if listed]
    scores: list[list[float] | None] = [None] * len(examples)
    model.eval()
    for chunk in batches(with_options, batch_size):
        prompts = [encode_prompt(tokenizer, examples[i].instruction) for i in chunk]
        answers = [[encode_answer(tokenizer, option) for option in options[i]] for i in chunk]
        totals = _options_log_probs(
            model,
            prompts,
            answers,
            pad_id=tokenizer.pad_token_id,
            bf16_autocast=bf16_autocast,
            device=device,
            length_normalised=length_normalised,
        )
        for i, item_scores in zip(chunk, totals):
            scores[i] = item_scores
    return scores


def option_predictions(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int,
    bf16_autocast: bool,
    device: torch.device | str = "cpu",
    length_normalised: bool = False,
) -> list[str | None]:
    """The most likely answer option of each example (rank classification).

    Parameters
    ----------
    model, tokenizer, examples, batch_size, bf16_autocast, device, length_normalised
        As for :func:`option_scores`, which scores the options.

    Returns
    -------
    list of (str or None)
        Per example, the option with the highest score (ties: the first listed), or ``None``
        if its instruction lists no options.
    """
    predictions: list[str | None] = []
    scored = option_scores(
        model,
        tokenizer,
        examples,
        batch_size=batch_size,
        bf16_autocast=bf16_autocast,
        device=device,
        length_normalised=length_normalised,
    )
    for example, scores in zip(examples, scored):
        if scores is None:
            predictions.append(None)
            continue
        best = max(range(len(scores)), key=scores.__getitem__)  # max keeps the first of equal keys
        predictions.append(answer_options(example.instruction)[best])
    return predictions


def evaluate_adapter(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int,
    max_new_tokens: int,
    bf16_autocast: bool,
    device: torch.device | str = "cpu",
    score_options: bool = True,
    option_length_normalised: bool = False,
    rows: Rows | None = None,
) -> dict[str, float | int | list[float]]:
    """Scores of the model's greedy answers on ``examples``, and its option accuracy.

    Parameters
    ----------
    model : torch.nn.Module
        The model to evaluate (the LoRA-wrapped model with the adapter loaded), on ``device``.
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer (``padding_side="left"``, see :func:`generate_answers`).
    examples : sequence of Example
        The test items, at least one.
    batch_size : int
        Items per generation batch and per option-scoring forward pass.
    max_new_tokens : int
        Longest generated answer.
    bf16_autocast : bool
        Run the model under bfloat16 autocast.
    device : torch.device or str, default "cpu"
        Where the model is.
    score_options : bool, default True
        Also classify the items that list answer options by option likelihood
        (:func:`option_predictions`); one extra forward pass per batch of such items.
    option_length_normalised : bool, default False
        Rank options by mean instead of summed token log-probability (see :func:`option_scores`).
    rows : callable, optional
        ``indices -> context manager`` entered around the model's calls on the items at those indices
        (FedDPA's per-item adapter weights): generation then runs ``batch_size`` items at a time and
        option scoring one item (with all its options) at a time.

    Returns
    -------
    dict
        Values fit a Flower ``MetricRecord`` (int, float or a list of floats; no NaN):

        * ``"rouge1"``, ``"rougeL"``, ``"exact_match"`` (float): means over all items of the
          generated answers' scores (:func:`fedbilevel.client.metrics.score_items`).
        * ``"items-rouge1"``, ``"items-rougeL"``, ``"items-exact_match"`` (list of float): the
          per-item scores, one per example in the order of ``examples``; their means are the
          three values above.
        * ``"option_accuracy"`` (float), ``"option_items"`` (int), ``"items-option_correct"``
          (list of float): only if ``score_options`` and at least one item lists options
          (otherwise the keys are absent). ``items-option_correct`` has one entry per item
          *with options* (1.0 if its most likely option exactly matches the reference, see
          :func:`fedbilevel.client.metrics.exact_match`: the same normalisation as for generated
          answers, case-sensitive; else 0.0), in the order of ``examples``,
          skipping items without options; ``option_items`` is its length and
          ``option_accuracy`` its mean.
        * ``"eval-seconds"`` (float): wall-clock time of the whole evaluation (generation and
          option scoring).

    Raises
    ------
    ValueError
        If ``examples`` is empty.
    """
    started = time.time()
    references = [example.output for example in examples]
    instructions = [example.instruction for example in examples]
    predictions = _in_groups(
        len(examples),
        batch_size,
        rows,
        lambda part: generate_answers(
            model,
            tokenizer,
            instructions[part],
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            bf16_autocast=bf16_autocast,
            device=device,
        ),
    )
    items = score_items(predictions, references)
    scores: dict[str, float | int | list[float]] = dict(mean_scores(items))
    if score_options:
        chosen = _in_groups(
            len(examples),
            1,
            rows,
            lambda part: option_predictions(
                model,
                tokenizer,
                examples[part],
                batch_size=batch_size,
                bf16_autocast=bf16_autocast,
                device=device,
                length_normalised=option_length_normalised,
            ),
        )
        correct = [
            exact_match(option, reference) for option, reference in zip(chosen, references) if option is not None
        ]
        if correct:
            scores["option_accuracy"] = mean_scores({"option_correct": correct})["option_correct"]
            scores["option_items"] = len(correct)
            items["option_correct"] = correct
    scores.update({f"{protocol.ITEMS_PREFIX}{name}": values for name, values in items.items()})
    scores[protocol.EVAL_SECONDS] = time.time() - started
    return scores
