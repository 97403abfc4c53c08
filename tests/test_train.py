"""The shared training loop: label masking, truncation, reproducibility."""

import numpy as np
import pytest

from fedbilevel.client.train import IGNORE_INDEX, TextCodec, encode_for_training, fit_report, train_adapter
from fedbilevel.data.prompts import format_prompt
from fedbilevel.data.synthetic import make_client_data
from fedbilevel.data.types import Example
from fedbilevel.models.adapter import build_lora_model, get_adapter_arrays
from fedbilevel.models.settings import LoraSettings
from fedbilevel.models.zoo import TINY_MODEL, load_tokenizer


def test_only_answer_tokens_and_eos_are_labelled():
    tokenizer = load_tokenizer(TINY_MODEL)
    example = Example(instruction="Count the words: a b", output="2", task="count")
    ((ids, labels),) = encode_for_training(tokenizer, [example], max_seq_len=512)
    prompt_len = len(tokenizer(format_prompt(example.instruction), add_special_tokens=False)["input_ids"])
    assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:]
    assert ids[-1] == tokenizer.eos_token_id


def test_a_max_seq_len_that_cannot_hold_template_and_answer_is_an_error_naming_the_counts():
    tokenizer = load_tokenizer(TINY_MODEL)
    train, _ = make_client_data(0, 2, seed=0, num_train=4, num_test=1)
    # The byte-level template alone is 35 tokens: nothing fits in 16, and the answer is never cut.
    match = r"run-config key 'max-seq-len': value 16 cannot hold the prompt template and the whole answer of 4 of 4"
    with pytest.raises(ValueError, match=match):
        encode_for_training(tokenizer, train, max_seq_len=16)
    with pytest.raises(ValueError, match=match):
        fit_report(tokenizer, train, max_seq_len=16)


def test_a_long_instruction_loses_its_middle_and_keeps_template_answer_start_and_end():
    tokenizer = load_tokenizer(TINY_MODEL)  # byte-level: one token per byte of ASCII text
    instruction = "TASK: answer. " + "passage " * 40 + "QUESTION? OPTIONS:\n- yes\n- no"
    example = Example(instruction=instruction, output="yes", task="qa")
    short = Example(instruction="Count the words: a b", output="2", task="count")
    (ids, labels), (short_ids, _) = encode_for_training(tokenizer, [example, short], max_seq_len=96)
    assert len(ids) == 96  # cut to the limit exactly
    answer = tokenizer("yes", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids[-len(answer) :] == answer and labels[-len(answer) :] == answer  # the whole answer, learned
    assert labels[: len(ids) - len(answer)] == [IGNORE_INDEX] * (len(ids) - len(answer))
    text = tokenizer.decode(ids[: -len(answer)])
    assert text.startswith("### Instruction:\nTASK: answer.") and text.endswith("- no\n\n### Response:\n")
    assert short_ids == tokenizer(format_prompt(short.instruction) + "2", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]  # an example that fits is encoded as before
    report = fit_report(tokenizer, [example, short], max_seq_len=96)
    assert (report.examples, report.truncated) == (2, 1)
    assert report.longest == len(tokenizer(format_prompt(instruction), add_special_tokens=False)["input_ids"]) + 4


def test_same_seed_same_adapter():
    tokenizer = load_tokenizer(TINY_MODEL)
    train, _ = make_client_data(0, 2, seed=0, num_train=6, num_test=1)
    results = []
    for _ in range(2):
        model = build_lora_model(TINY_MODEL, LoraSettings(), seed=0)
        outcome = train_adapter(
            model,
            TextCodec(tokenizer, 128),
            train,
            steps=3,
            batch_size=4,
            learning_rate=0.01,
            bf16_autocast=False,
            seed=5,
        )
        assert np.isfinite(outcome.loss)
        results.append(get_adapter_arrays(model))
    for name in results[0]:
        np.testing.assert_array_equal(results[0][name], results[1][name])
