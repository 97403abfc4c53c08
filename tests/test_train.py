"""The shared training loop: label masking, truncation, reproducibility."""

import numpy as np
import pytest

from fedbilevel.client.train import IGNORE_INDEX, TextCodec, encode_for_training, train_adapter
from fedbilevel.data.prompts import format_prompt
from fedbilevel.data.types import Example
from fedbilevel.data.synthetic import make_client_data
from fedbilevel.models.adapter import build_lora_model, get_adapter_arrays
from fedbilevel.models.settings import LoraSettings
from fedbilevel.models.zoo import TINY_MODEL, load_tokenizer


def test_only_answer_tokens_and_eos_are_labelled():
    tokenizer = load_tokenizer(TINY_MODEL)
    example = Example(instruction="Count the words: a b", output="2", task="count")
    (ids, labels), = encode_for_training(tokenizer, [example], max_seq_len=512)
    prompt_len = len(tokenizer(format_prompt(example.instruction), add_special_tokens=False)["input_ids"])
    assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:]
    assert ids[-1] == tokenizer.eos_token_id


def test_truncation_that_removes_every_answer_token_is_an_error():
    tokenizer = load_tokenizer(TINY_MODEL)
    train, _ = make_client_data(0, 2, seed=0, num_train=4, num_test=1)
    with pytest.raises(ValueError, match=r"run-config key 'max-seq-len': value 16 leaves no answer token in 4 of 4"):
        encode_for_training(tokenizer, train, max_seq_len=16)


def test_same_seed_same_adapter():
    tokenizer = load_tokenizer(TINY_MODEL)
    train, _ = make_client_data(0, 2, seed=0, num_train=6, num_test=1)
    results = []
    for _ in range(2):
        model = build_lora_model(TINY_MODEL, LoraSettings(), seed=0)
        outcome = train_adapter(model, TextCodec(tokenizer, 128), train, steps=3, batch_size=4, learning_rate=0.01,
                                bf16_autocast=False, seed=5)
        assert np.isfinite(outcome.loss)
        results.append(get_adapter_arrays(model))
    for name in results[0]:
        np.testing.assert_array_equal(results[0][name], results[1][name])
