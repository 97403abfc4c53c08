"""The one local training loop every strategy and model family shares.

The loop fine-tunes the trainable (LoRA, and an image classifier's head) parameters on
batches that a *codec* builds from examples: :class:`TextCodec` for causal LMs (prompt +
answer, loss on the answer tokens only), :class:`fedbilevel.client.vision.ImageCodec` for
image classifiers. Strategies that change the client's objective (e.g. a proximal term)
pass ``extra_loss``; nothing else differs between strategies.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fedbilevel.data.prompts import PROMPT_TEMPLATE, format_prompt
from fedbilevel.data.types import Example

IGNORE_INDEX = -100  # label value that PyTorch's cross-entropy skips
# The template's text before and after the instruction: kept whole when an instruction is cut.
_TEMPLATE_PARTS = tuple(PROMPT_TEMPLATE.split("{instruction}"))


def proximal_term(model: torch.nn.Module, mu: float) -> Callable[[torch.nn.Module], torch.Tensor]:
    """μ/2 ‖θ − θ₀‖² over the trainable parameters, with θ₀ their values now (the received adapter)."""
    anchors = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]

    def term(_model: torch.nn.Module) -> torch.Tensor:
        return 0.5 * mu * sum(((p - anchor) ** 2).sum() for p, anchor in anchors)

    return term


@dataclass(frozen=True)
class TrainResult:
    """Mean loss over the local steps, the last step's loss, and wall-clock seconds."""

    loss: float
    last_loss: float
    seconds: float


def encode_prompt(tokenizer, instruction: str) -> list[int]:
    """Token ids of the prompt template around ``instruction``."""
    return tokenizer(format_prompt(instruction), add_special_tokens=False)["input_ids"]


def encode_answer(tokenizer, answer: str) -> list[int]:
    """Token ids of ``answer`` as the model learns to give it: tokenized alone, then EOS."""
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@dataclass(frozen=True)
class FitReport:
    """How a client's training examples fit ``max-seq-len``: how many had their instruction cut."""

    examples: int
    truncated: int
    longest: int  # tokens of the longest example before any cut


def _fit(
    tokenizer, example: Example, max_seq_len: int, template: tuple[list[int], list[int]]
) -> tuple[list[int], list[int], int] | None:
    """(input ids, labels, tokens before any cut) with the instruction cut to fit, or None if it cannot be.

    An example longer than ``max_seq_len`` keeps the template and the whole answer (+ EOS) and loses
    the middle of its instruction: its start (the task) and its end (question, options) stay, as
    SFT tools keep the answer a model is trained on. None: the template and the answer alone do not fit.
    ``template``: the token ids of the template before and after the instruction.
    """
    prompt_ids = encode_prompt(tokenizer, example.instruction)
    answer_ids = encode_answer(tokenizer, example.output)
    full = len(prompt_ids) + len(answer_ids)
    if full <= max_seq_len:
        return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids, full
    before, after = template
    instruction = tokenizer(example.instruction, add_special_tokens=False)["input_ids"]
    budget = max_seq_len - len(before) - len(after) - len(answer_ids)
    if budget < 1:
        return None
    head = (budget + 1) // 2
    kept = instruction[:head] + instruction[len(instruction) - (budget - head) :]
    prompt_ids = before + kept + after
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids, full


def fit_report(tokenizer, examples: Sequence[Example], max_seq_len: int) -> FitReport:
    """How ``examples`` fit ``max_seq_len`` (:func:`encode_for_training`), checked once at start-up.

    Raises
    ------
    ValueError
        One line naming ``max-seq-len``, when the template and the whole answer of some example do
        not fit: with their count and the length that would hold them all.
    """
    return _encode(tokenizer, examples, max_seq_len)[1]


def encode_for_training(tokenizer, examples: Sequence[Example], max_seq_len: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per example; prompt tokens are masked out of the labels.

    The answer ends with the EOS token so that the model learns where to stop. An example
    longer than ``max_seq_len`` has the middle of its instruction cut (:func:`fit_report`
    counts them); one whose template and answer alone exceed it is an error, never a silent
    cut of the answer it is meant to learn.
    """
    return _encode(tokenizer, examples, max_seq_len)[0]


def _encode(tokenizer, examples: Sequence[Example], max_seq_len: int):
    template = tuple(tokenizer(part, add_special_tokens=False)["input_ids"] for part in _TEMPLATE_PARTS)
    encoded, truncated, unfit, longest, needed = [], 0, 0, 0, 0
    for example in examples:
        fitted = _fit(tokenizer, example, max_seq_len, template)
        if fitted is None:  # needed: the template, the whole answer and one instruction token
            unfit += 1
            needed = max(needed, sum(map(len, template)) + len(encode_answer(tokenizer, example.output)) + 1)
            continue
        input_ids, labels, full = fitted
        truncated += full > max_seq_len
        longest = max(longest, full)
        encoded.append((input_ids, labels))
    if unfit:
        raise ValueError(
            f"run-config key 'max-seq-len': value {max_seq_len} cannot hold the prompt template and the whole "
            f"answer of {unfit} of {len(examples)} training examples; raise it to at least {needed}"
        )
    return encoded, FitReport(examples=len(examples), truncated=truncated, longest=longest)


def collate(batch: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, labels and attention mask of encoded examples."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        attention[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


class Codec(Protocol):
    """Turns a client's examples into model inputs: ``encode`` once, ``collate`` per batch."""

    def encode(self, examples: Sequence[Any]) -> list[Any]: ...

    def collate(self, items: Sequence[Any]) -> dict[str, torch.Tensor]: ...


class TextCodec:
    """Causal-LM batches: :func:`encode_for_training` then right-padded :func:`collate`."""

    def __init__(self, tokenizer, max_seq_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len

    def encode(self, examples: Sequence[Example]) -> list[tuple[list[int], list[int]]]:
        return encode_for_training(self.tokenizer, examples, self.max_seq_len)

    def collate(self, items: Sequence[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        return collate(items, self.tokenizer.pad_token_id)


def train_adapter(
    model: torch.nn.Module,
    codec: Codec,
    examples: Sequence[Any],
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    bf16_autocast: bool,
    seed: int,
    device: torch.device | str = "cpu",
    extra_loss: Callable[[torch.nn.Module], torch.Tensor] | None = None,
) -> TrainResult:
    """Fine-tune the model's trainable (LoRA) parameters in place for ``steps`` steps.

    Batches are drawn without replacement from a seeded shuffle, reshuffled each epoch,
    so a run is reproducible for a given seed.
    """
    if not examples:
        raise ValueError("examples: a client needs at least one training example")
    started = time.time()
    encoded = codec.encode(examples)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # LoRA dropout draws from the global generator
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    order: list[int] = []
    losses = []
    model.train()
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(encoded), generator=generator).tolist()
            if len(order) < batch_size:  # fewer examples than one batch: repeat the data
                order += torch.randperm(len(encoded), generator=generator).tolist() * (batch_size // len(encoded) + 1)
        batch, order = order[:batch_size], order[batch_size:]
        inputs = {k: v.to(device) for k, v in codec.collate([encoded[i] for i in batch]).items()}
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16_autocast):
            loss = model(**inputs).loss
            if extra_loss is not None:
                loss = loss + extra_loss(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return TrainResult(loss=sum(losses) / len(losses), last_loss=losses[-1], seconds=time.time() - started)
