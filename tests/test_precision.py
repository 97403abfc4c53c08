"""Base-model precision modes: bf16 weights keep float32 adapters; 4-bit refuses what it cannot do."""

import importlib.util

import numpy as np
import pytest
import torch

from fedbilevel.client.train import TextCodec, train_adapter
from fedbilevel.data.synthetic import make_client_data
from fedbilevel.models import base
from fedbilevel.models.adapter import build_lora_model, get_adapter_arrays, initial_adapter_arrays
from fedbilevel.models.settings import LoraSettings
from fedbilevel.models.zoo import TINY_MODEL, load_tokenizer


def test_bf16_weights_keep_float32_adapters_that_train():
    model = build_lora_model(TINY_MODEL, LoraSettings(), seed=3, precision="bf16")
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}
    before = get_adapter_arrays(model)
    initial = initial_adapter_arrays(TINY_MODEL, LoraSettings(), seed=3)
    assert all(np.array_equal(before[name], initial[name]) for name in initial)  # same start as fp32 clients
    train, _ = make_client_data(0, 2, seed=0, num_train=4, num_test=1)
    outcome = train_adapter(
        model,
        TextCodec(load_tokenizer(TINY_MODEL), 128),
        train,
        steps=2,
        batch_size=2,
        learning_rate=0.01,
        bf16_autocast=True,
        seed=0,
    )
    after = get_adapter_arrays(model)
    assert np.isfinite(outcome.loss)
    assert all(after[name].dtype == np.float32 and np.all(np.isfinite(after[name])) for name in after)
    assert any(not np.array_equal(after[name], before[name]) for name in after)


def test_4bit_without_a_gpu_is_refused_with_the_key_and_the_way_out():
    with pytest.raises(
        ValueError, match=r"run-config key 'precision': value '4bit' is not allowed on device 'cpu'; .*use 'bf16'"
    ):
        build_lora_model(TINY_MODEL, LoraSettings(), precision="4bit", device="cpu")


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_4bit_without_bitsandbytes_names_the_package():
    with pytest.raises(ValueError, match=r"'4bit' needs the bitsandbytes package"):
        base._precision_options("4bit", torch.device("cuda"))
