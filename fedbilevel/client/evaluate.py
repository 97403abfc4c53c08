"""The one evaluation loop every strategy shares: batched greedy generation, then scores."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from fedbilevel.client.metrics import clean_answer, score_answers
from fedbilevel.data.prompts import Example, format_prompt


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
    """Greedy answers to the instructions, cut at the end-of-response marker.

    Prompts are left-padded (the tokenizer's padding side must be "left") so that every
    sequence in a batch continues from its own last prompt token.
    """
    if tokenizer.padding_side != "left":
        raise ValueError(f"tokenizer.padding_side: {tokenizer.padding_side!r}; batched generation needs 'left'")
    model.eval()
    answers: list[str] = []
    for start in range(0, len(instructions), batch_size):
        prompts = [format_prompt(text) for text in instructions[start : start + batch_size]]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16_autocast):
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        answers += [clean_answer(text) for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


def evaluate_adapter(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int,
    max_new_tokens: int,
    bf16_autocast: bool,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """ROUGE-1, ROUGE-L and exact match of the model's greedy answers on ``examples``."""
    started = time.time()
    predictions = generate_answers(
        model,
        tokenizer,
        [example.instruction for example in examples],
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        bf16_autocast=bf16_autocast,
        device=device,
    )
    scores = score_answers(predictions, [example.output for example in examples])
    scores["eval-seconds"] = time.time() - started
    return scores
