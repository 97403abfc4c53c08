"""Training essentials for real models (issue 21): gradient accumulation, gradient checkpointing,
a learning-rate schedule with warm-up, gradient clipping, and their bad values."""

import dataclasses
import inspect
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedbilevel.client.train import TextCodec, train_adapter
from fedbilevel.config import ConfigError, RunConfig, TrainSettings, load_app_config
from fedbilevel.data.synthetic import make_client_data
from fedbilevel.models.adapter import build_lora_model, enable_gradient_checkpointing, get_adapter_arrays
from fedbilevel.models.settings import LoraSettings
from fedbilevel.models.zoo import TINY_MODEL, load_tokenizer

DEFAULTS = load_app_config(Path(__file__).resolve().parents[1] / "pyproject.toml")


def _train(lora=None, examples=8, **keywords):
    """A fresh tiny model trained on the same examples; (model, result)."""
    tokenizer = load_tokenizer(TINY_MODEL)
    train, _ = make_client_data(0, 2, seed=0, num_train=examples, num_test=1)
    model = build_lora_model(TINY_MODEL, lora or LoraSettings(), seed=0)
    settings = {"steps": 2, "batch_size": 4, "learning_rate": 0.01, "bf16_autocast": False, "seed": 5} | keywords
    return model, train_adapter(model, TextCodec(tokenizer, 128), train, **settings)


def _assert_same_adapter(first, second, atol):
    for name, value in first.items():
        np.testing.assert_allclose(second[name], value, rtol=0, atol=atol, err_msg=name)


def test_two_accumulated_batches_of_4_give_the_update_of_one_batch_of_8():
    # Dropout off: its masks depend on the batch's shape. The 8 answers differ in length, so an
    # unweighted mean of the two batches' losses would not be the mean over one batch of 8.
    no_dropout = LoraSettings(dropout=0.0)
    whole, whole_result = _train(no_dropout, batch_size=8)
    halves, halves_result = _train(no_dropout, batch_size=4, gradient_accumulation_steps=2)
    trained = get_adapter_arrays(whole)
    assert any(np.abs(value).max() > 1e-3 for name, value in trained.items() if "lora_B" in name)  # it moved
    _assert_same_adapter(trained, get_adapter_arrays(halves), atol=1e-5)
    assert halves_result.loss == pytest.approx(whole_result.loss, rel=1e-5)
    assert halves_result.last_loss == pytest.approx(whole_result.last_loss, rel=1e-5)


def test_gradient_checkpointing_trains_the_same_adapter_and_recomputes_each_layer():
    # LoRA dropout is on: the recomputation replays the same masks.
    reference, _ = _train()
    checkpointed, _ = _train(gradient_checkpointing=True)
    _assert_same_adapter(get_adapter_arrays(reference), get_adapter_arrays(checkpointed), atol=1e-6)
    embeddings = checkpointed.get_base_model().get_input_embeddings()
    assert len(embeddings._forward_hooks) == 1  # makes the embeddings' output require grad
    enable_gradient_checkpointing(checkpointed)
    assert len(embeddings._forward_hooks) == 1  # a second call (the next round) adds nothing

    def layer_calls(model):
        """Calls of the first decoder layer's attention in one training step of one batch."""
        calls = []
        hook = model.get_base_model().model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
        tokenizer = load_tokenizer(TINY_MODEL)
        train, _ = make_client_data(0, 2, seed=0, num_train=4, num_test=1)
        train_adapter(
            model,
            TextCodec(tokenizer, 128),
            train,
            steps=1,
            batch_size=4,
            learning_rate=0.01,
            bf16_autocast=False,
            seed=1,
        )
        hook.remove()
        return len(calls)

    assert (layer_calls(reference), layer_calls(checkpointed)) == (1, 2)  # forward, and again in the backward pass


class _Scalar(torch.nn.Module):
    """A one-parameter model fitting its labels in squared error: the loop's mechanics, quickly."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def forward(self, labels):
        return SimpleNamespace(loss=((self.weight - labels) ** 2).mean())


class _ScalarCodec:
    def encode(self, examples):
        return list(examples)

    def collate(self, items):
        return {"labels": torch.tensor(items, dtype=torch.float32)}


def test_the_schedules_learning_rates_by_hand(monkeypatch):
    seen = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    # 5 steps, peak 0.1, 2 of warm-up: 0, 0.05, then from the peak down over the 3 steps left.
    third = math.cos(math.pi / 3)  # the cosine at a third of the decay: 0.5
    expected = {
        "constant": [0.1, 0.1, 0.1, 0.1, 0.1],
        "constant_with_warmup": [0.0, 0.05, 0.1, 0.1, 0.1],
        "linear": [0.0, 0.05, 0.1, 0.1 * 2 / 3, 0.1 * 1 / 3],
        "cosine": [0.0, 0.05, 0.1, 0.1 * (1 + third) / 2, 0.1 * (1 - third) / 2],  # 0.075, 0.025
    }
    for name, rates in expected.items():
        del seen[:]
        train_adapter(
            _Scalar(),
            _ScalarCodec(),
            [1.0, 2.0, 3.0],
            steps=5,
            batch_size=2,
            learning_rate=0.1,
            bf16_autocast=False,
            seed=0,
            lr_scheduler=name,
            warmup_steps=0 if name == "constant" else 2,
        )
        assert seen == pytest.approx(rates, abs=1e-12), name


@pytest.mark.parametrize(
    ("optimizer", "momentum", "expected"),
    [
        # Every step sees all of the labels 1, 2, 3 from w = 0: the gradient of mean((w − l)²) is 2(w − 2).
        ("sgd", 0.0, [0.4, 0.4 + 0.1 * 3.2]),  # w − lr·g: g = −4, then 2(0.4 − 2) = −3.2
        ("sgd", 0.9, [0.4, 0.4 + 0.1 * (0.9 * 4 + 3.2)]),  # the buffer 0.9·(−4) − 3.2 = −6.8
        # Adam's first step moves by the learning rate (m̂/√v̂ = −1); the second by 0.1·m̂/√v̂ with
        # g = 2(0.1 − 2) = −3.8: m̂ = (0.09·(−4) + 0.1·(−3.8))/0.19, v̂ = (0.000999·16 + 0.001·3.8²)/0.001999.
        ("adamw", 0.0, [0.1, 0.1 + 0.1 * (0.74 / 0.19) / math.sqrt((0.015984 + 0.01444) / 0.001999)]),
    ],
)
def test_each_optimizer_steps_as_by_hand(optimizer, momentum, expected):
    weights = []
    for steps in (1, 2):
        model = _Scalar()
        train_adapter(
            model,
            _ScalarCodec(),
            [1.0, 2.0, 3.0],
            steps=steps,
            batch_size=3,
            learning_rate=0.1,
            bf16_autocast=False,
            seed=0,
            optimizer=optimizer,
            momentum=momentum,
        )
        weights.append(float(model.weight))
    assert weights == pytest.approx(expected, abs=1e-6)


def test_max_grad_norm_scales_the_gradient_down_to_the_bound():
    # After training, the parameters hold the last step's gradient (after any clipping); one step
    # from the same start has the same gradient before clipping.
    def last_gradient(**keywords):
        model, _ = _train(steps=1, **keywords)
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    def norm(gradient):
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gradient])))

    free = last_gradient()
    bound = norm(free) / 4
    clipped = last_gradient(max_grad_norm=bound)
    assert norm(clipped) == pytest.approx(bound, rel=1e-5)
    for before, after in zip(free, clipped, strict=True):
        torch.testing.assert_close(after, before * bound / norm(free), rtol=1e-5, atol=1e-12)
    unchanged = last_gradient(max_grad_norm=2 * norm(free))  # a bound above the norm changes nothing
    for before, after in zip(free, unchanged, strict=True):
        torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_the_defaults_turn_every_essential_off():
    train = RunConfig.from_run_config(DEFAULTS).train
    assert (
        train.gradient_accumulation_steps,
        train.lr_scheduler,
        train.warmup_steps,
        train.max_grad_norm,
        train.gradient_checkpointing,
        train.optimizer,
        train.momentum,
    ) == (1, "constant", 0, 0.0, False, "adamw", 0.0)


def test_every_training_key_reaches_train_adapter_under_its_own_name():
    """A key added to TrainSettings must reach every caller: the client, dp_cost.py and
    supernode_cost.py all pass ``loop_options()`` (local-steps and max-seq-len go elsewhere)."""
    train = TrainSettings(optimizer="sgd", momentum=0.9, batch_size=3, learning_rate=0.5)
    options = train.loop_options()
    parameters = inspect.signature(train_adapter).parameters
    fields = {field.name for field in dataclasses.fields(TrainSettings)} - {"local_steps", "max_seq_len"}
    assert set(options) == fields
    assert all(parameters[name].kind is inspect.Parameter.KEYWORD_ONLY for name in options)
    assert (options["optimizer"], options["momentum"], options["batch_size"], options["learning_rate"]) == (
        "sgd",
        0.9,
        3,
        0.5,
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"local-steps": 10, "lr-scheduler": "linear", "warmup-steps": 11},
            "run-config key 'warmup-steps': value 11 is not allowed; expected at most local-steps (10)",
        ),
        (
            {"warmup-steps": 2},
            "run-config key 'warmup-steps': value 2 is not allowed; lr-scheduler 'constant' has no warm-up: "
            "expected 0, or another lr-scheduler",
        ),
        (
            {"gradient-accumulation-steps": 0},
            "run-config key 'gradient-accumulation-steps': value 0 is not allowed; expected an integer ≥ 1",
        ),
        (
            {"lr-scheduler": "cosine_with_restarts"},
            "run-config key 'lr-scheduler': value 'cosine_with_restarts' is not allowed; "
            "choose one of constant, constant_with_warmup, linear, cosine",
        ),
        (
            {"max-grad-norm": -1.0},
            "run-config key 'max-grad-norm': value -1.0 is not allowed; expected a number in [0.0, inf)",
        ),
        (
            {"momentum": 0.9},
            "run-config key 'momentum': value 0.9 is not allowed; optimizer 'adamw' has no momentum key: "
            "expected 0, or 'sgd'",
        ),
        (
            {"optimizer": "adam"},
            "run-config key 'optimizer': value 'adam' is not allowed; choose one of adamw, sgd",
        ),
        (
            {"gradient-checkpointing": 1},
            "run-config key 'gradient-checkpointing': value 1 is not allowed; expected true or false",
        ),
    ],
)
def test_a_bad_value_fails_in_one_line_naming_the_key(values, message):
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_run_config(DEFAULTS, values)
    assert str(caught.value) == message


def test_settings_built_in_code_are_checked_the_same_way():
    with pytest.raises(ConfigError, match=r"^run-config key 'warmup-steps': value 4 is not allowed; expected at most"):
        TrainSettings(local_steps=3, lr_scheduler="cosine", warmup_steps=4)
    assert TrainSettings(local_steps=3, lr_scheduler="cosine", warmup_steps=3).warmup_steps == 3  # all warm-up


def test_checkpointing_a_model_that_cannot_is_one_line_naming_the_key(monkeypatch):
    model = build_lora_model(TINY_MODEL, LoraSettings(), seed=0)
    monkeypatch.setattr(type(model.get_base_model()), "supports_gradient_checkpointing", False)
    with pytest.raises(ConfigError) as caught:
        enable_gradient_checkpointing(model)
    assert str(caught.value) == (
        "run-config key 'gradient-checkpointing': value True is not allowed; "
        "LlamaForCausalLM cannot checkpoint its layers; expected false"
    )
