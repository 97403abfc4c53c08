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
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from transformers import get_scheduler

from fedbilevel.config import OPTIMIZERS
from fedbilevel.data.prompts import PROMPT_TEMPLATE, format_prompt
from fedbilevel.data.types import Example
from fedbilevel.models.adapter import enable_gradient_checkpointing, lora_a_frozen

if TYPE_CHECKING:
    from fedbilevel.client.privacy import DpSgd

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
    gradient_accumulation_steps: int = 1,
    lr_scheduler: str = "constant",
    warmup_steps: int = 0,
    max_grad_norm: float = 0.0,
    gradient_checkpointing: bool = False,
    freeze_lora_a: bool = False,
    dp_sgd: DpSgd | None = None,
    optimizer: str = "adamw",
    momentum: float = 0.0,
) -> TrainResult:
    """Fine-tune the model's trainable (LoRA) parameters in place for ``steps`` optimizer steps.

    Batches are drawn without replacement from a seeded shuffle, reshuffled each epoch,
    so a run is reproducible for a given seed.

    Parameters
    ----------
    model : torch.nn.Module
        A peft model; only its parameters that require grad are trained.
    codec : Codec
    examples : sequence
        The client's training examples (at least one).
    steps : int
        Optimizer steps (run-config ``local-steps``).
    batch_size : int
        Examples per forward and backward pass.
    learning_rate : float
        The optimizer's peak learning rate.
    bf16_autocast : bool
        Compute in bfloat16 under ``torch.autocast``.
    seed : int
        Of the shuffle and of LoRA dropout.
    device : torch.device or str, default "cpu"
        Where the model is.
    extra_loss : callable, optional
        A term of the parameters (e.g. :func:`proximal_term`), added once per optimizer step.
    gradient_accumulation_steps : int, default 1
        Batches per optimizer step. Each batch's mean loss is weighted by its share of the
        step's labelled targets, so k batches of b give the gradient of one batch of k·b.
    lr_scheduler : str, default "constant"
        A transformers schedule name (``transformers.get_scheduler``) over the ``steps``.
    warmup_steps : int, default 0
        Of the schedule's linear warm-up from 0.
    max_grad_norm : float, default 0.0
        When positive, the gradient's global L2 norm is clipped to it before each step.
    gradient_checkpointing : bool, default False
        Switch the model to recompute activations in the backward pass
        (:func:`~fedbilevel.models.adapter.enable_gradient_checkpointing`; it stays on).
    freeze_lora_a : bool, default False
        Train with the LoRA A factors frozen, for this call only
        (:func:`~fedbilevel.models.adapter.lora_a_frozen`; FFA-LoRA's ``freeze-lora-a``).
    dp_sgd : DpSgd, optional
        Train with DP-SGD (:class:`~fedbilevel.client.privacy.DpSgd`): each step's batch is its
        Poisson sample of the examples (not the shuffle), each example's gradient is clipped and
        noise is added; ``extra_loss`` and ``max_grad_norm`` then apply to the noisy gradient.
    optimizer : {"adamw", "sgd"}, default "adamw"
        ``torch.optim.AdamW`` (no weight decay) or ``torch.optim.SGD``, fresh for this call.
    momentum : float, default 0.0
        SGD's momentum (run-config ``momentum``).

    Returns
    -------
    TrainResult
        The losses are per optimizer step (over all its batches, ``extra_loss`` included).

    Raises
    ------
    fedbilevel.options.ConfigError
        When ``gradient_checkpointing`` is set for a model that cannot checkpoint.
    ValueError
        For no examples, an unknown ``optimizer``, or a ``momentum`` without ``optimizer="sgd"``.
    """
    if not examples:
        raise ValueError("examples: a client needs at least one training example")
    if optimizer not in OPTIMIZERS or (momentum and optimizer != "sgd"):
        raise ValueError(
            f"optimizer {optimizer!r} with momentum {momentum}: expected 'adamw', or 'sgd' with a momentum"
        )
    started = time.time()
    encoded = codec.encode(examples)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # LoRA dropout draws from the global generator
    # FFA-LoRA: A stays as received; requires_grad is restored afterwards (the model serves every client).
    with lora_a_frozen(model) if freeze_lora_a else nullcontext(), ExitStack() as private:
        parameters = [p for p in model.parameters() if p.requires_grad]
        if optimizer == "sgd":
            step_rule: torch.optim.Optimizer = torch.optim.SGD(parameters, lr=learning_rate, momentum=momentum)
        else:
            step_rule = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
        scheduler = get_scheduler(lr_scheduler, step_rule, num_warmup_steps=warmup_steps, num_training_steps=steps)
        order: list[int] = []
        losses = []
        model.train()
        if dp_sgd is not None:
            private.enter_context(
                dp_sgd.attach(
                    model, step_rule, num_examples=len(encoded), extra_loss=extra_loss, max_grad_norm=max_grad_norm
                )
            )
        for _ in range(steps):
            if dp_sgd is not None:
                losses.append(
                    dp_sgd.step(codec, encoded, batch_size=batch_size, device=device, bf16_autocast=bf16_autocast)
                )
                scheduler.step()
                continue
            batches = []
            for _ in range(gradient_accumulation_steps):
                batch, order = _next_batch(order, batch_size, len(encoded), generator)
                batches.append(codec.collate([encoded[i] for i in batch]))
            # A model's loss is the mean over a batch's labelled targets (a causal LM's first label is
            # always a masked prompt token, so its shift changes no count): weighting each batch by its
            # share of the step's targets makes their sum the mean over all of them.
            targets = [int((inputs["labels"] != IGNORE_INDEX).sum()) for inputs in batches]
            step_rule.zero_grad(set_to_none=True)
            step_loss = 0.0
            for index, inputs in enumerate(batches):
                inputs = {k: v.to(device) for k, v in inputs.items()}
                with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16_autocast):
                    loss = model(**inputs).loss * (targets[index] / sum(targets))
                    if extra_loss is not None and index == 0:
                        loss = loss + extra_loss(model)
                loss.backward()
                step_loss += loss.item()
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
            step_rule.step()
            scheduler.step()
            losses.append(step_loss)
        model.eval()
    return TrainResult(loss=sum(losses) / len(losses), last_loss=losses[-1], seconds=time.time() - started)


def _next_batch(
    order: list[int], batch_size: int, num_examples: int, generator: torch.Generator
) -> tuple[list[int], list[int]]:
    """(the next batch's example indices, the indices left) from this epoch's shuffled ``order``."""
    if len(order) < batch_size:
        order = order + torch.randperm(num_examples, generator=generator).tolist()
        if len(order) < batch_size:  # fewer examples than one batch: repeat the data
            order += torch.randperm(num_examples, generator=generator).tolist() * (batch_size // num_examples + 1)
    return order[:batch_size], order[batch_size:]
