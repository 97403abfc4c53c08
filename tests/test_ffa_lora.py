"""FFA-LoRA: A fixed at θ⁰'s, B and the head averaged (by hand); clients train with lora_A frozen."""

from functools import partial

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from in_process import started_client

from fedbilevel import protocol
from fedbilevel.client.train import train_adapter
from fedbilevel.client.vision import ImageCodec
from fedbilevel.config import RunConfig, load_app_config
from fedbilevel.data.digits import make_digits_client_data
from fedbilevel.models.adapter import (
    build_lora_model,
    get_adapter_arrays,
    initial_adapter_arrays,
    lora_a_frozen,
    set_adapter_arrays,
)
from fedbilevel.models.settings import LoraSettings
from fedbilevel.models.zoo import DIGITS_VIT, TINY_MODEL
from fedbilevel.strategies import build_strategy
from fedbilevel.strategies.fedsa_lora import FedSaLora, is_lora_a
from fedbilevel.strategies.ffa_lora import FfaLora
from fedbilevel.strategies.sampling import SamplingSettings
from fedbilevel.testing import (
    INITIAL,
    LORA_A,
    LORA_B,
    LORA_HEAD,
    LORA_THETA0,
    FakeGrid,
    assert_adapters_equal,
    fake_federation,
    resumed_and_unbroken,
)

A, B, HEAD, THETA0 = LORA_A, LORA_B, LORA_HEAD, LORA_THETA0  # short names for the hand-computed cases


def step(partition_id: int, server_round: int) -> dict[str, np.ndarray]:
    """What client p's training adds in round t: (p + 1)·t to A (a client ignoring the freeze), 10 times
    that to B, 100 times to the head."""
    scale = np.float32((partition_id + 1) * server_round)
    return {A: np.full((2, 3), scale), B: np.full((3, 2), 10 * scale), HEAD: np.full(2, 100 * scale)}


# federation(size): node id -> fake client, partitions 0..size-1 on nodes 10, 11, ..., starting from θ⁰ and
# training by `step`.
federation = partial(fake_federation, initial=THETA0, update=step)


def adapter(b: float, head: float, a: float = 0.0) -> dict[str, np.ndarray]:
    """θ⁰ plus b on B, head on the head and a on A."""
    return {A: THETA0[A] + a, B: THETA0[B] + b, HEAD: THETA0[HEAD] + head}


@pytest.mark.usefixtures("server_identity")
def test_two_rounds_average_b_and_head_keep_theta0s_a_and_ask_clients_to_freeze_it():
    clients = federation(3)
    strategy = FfaLora(initial_adapter=THETA0, min_nodes=3)
    strategy.start(FakeGrid(clients), ArrayRecord(), num_rounds=2)
    # Round 1 from θ⁰: B ← mean(10, 20, 30) = 20, head ← θ⁰ + 200; the clients' moved A is not taken.
    # Round 2 from that: B ← 20 + mean(20, 40, 60) = 60, head ← θ⁰ + 600; A is θ⁰'s still.
    for client in clients.values():
        assert [(kind, r) for kind, r, _ in client.received] == [
            (MessageType.TRAIN, 1),
            (MessageType.EVALUATE, 1),
            (MessageType.TRAIN, 2),
            (MessageType.EVALUATE, 2),
        ]
        assert [config[protocol.FREEZE_LORA_A] for config in client.configs] == [True] * 4
        for got, expected in zip([r[2] for r in client.received], [THETA0, *[adapter(20, 200)] * 2, adapter(60, 600)]):
            assert_adapters_equal(got, expected)
            np.testing.assert_array_equal(got[A], THETA0[A])  # exactly
    for p in range(3):
        assert_adapters_equal(strategy.personalized_adapter(p), adapter(60, 600))


def test_b_and_head_are_example_weighted_and_a_is_theta0s_whatever_the_replies_carry():
    strategy = FfaLora(initial_adapter=THETA0)
    trained = {0: adapter(10, 100, a=1), 1: adapter(30, 300, a=5)}
    assert strategy.personalize(1, trained, {0: 1, 1: 3}) == {"participants": [0, 1]}
    # (1·10 + 3·30) / 4 = 25, (1·100 + 3·300) / 4 = 250
    for p in (0, 1, 2):
        assert_adapters_equal(strategy.adapter_for(p), adapter(25, 250))


@pytest.mark.usefixtures("server_identity")
def test_with_sampling_the_rounds_clients_are_averaged_and_every_client_gets_the_result():
    records = []
    sampling = SamplingSettings(fraction_train=0.5, min_train_nodes=2)
    strategy = FfaLora(initial_adapter=THETA0, min_nodes=4, sampling=sampling, seed=1, on_round_end=records.append)
    clients = federation(4)
    strategy.start(FakeGrid(clients), ArrayRecord(), num_rounds=3)
    states = {0: dict(THETA0)}  # round -> the global adapter after it, replayed by hand
    for record in records:
        server_round, sampled = record["round"], record["sampled"]["train"]
        assert len(sampled) == 2
        before = states[server_round - 1]
        states[server_round] = {
            A: THETA0[A],
            **{
                name: np.mean([before[name] + step(p, server_round)[name] for p in sampled], axis=0)
                for name in (B, HEAD)
            },
        }
    for node, client in clients.items():
        trained_in = [r["round"] for r in records if node - 10 in r["sampled"]["train"]]
        assert [r for kind, r, _ in client.received if kind == MessageType.TRAIN] == trained_in
        for kind, server_round, got in client.received:
            assert_adapters_equal(got, states[server_round - 1 if kind == MessageType.TRAIN else server_round])


@pytest.mark.usefixtures("server_identity")
def test_resume_from_a_checkpoint_matches_an_unbroken_run(tmp_path):
    def make():
        sampling = SamplingSettings(fraction_train=0.5, min_train_nodes=2)
        return FfaLora(initial_adapter=THETA0, min_nodes=4, sampling=sampling, seed=1)

    resumed, unbroken, _ = resumed_and_unbroken(make, lambda: federation(4), tmp_path, num_rounds=3)
    assert resumed.history[-1]["round"] == 3
    for p in range(4):
        assert_adapters_equal(resumed.adapter_for(p), unbroken.adapter_for(p))


def test_an_adapter_without_lora_a_is_refused_and_the_registry_builds_it():
    with pytest.raises(
        ValueError, match=r"initial_adapter: no lora_A array among 2 \(e\.g\. 'a'\); strategy 'ffa-lora'"
    ):
        FfaLora(initial_adapter=INITIAL)
    config = RunConfig.from_run_config({**load_app_config(), "strategy": "ffa-lora"})
    assert isinstance(build_strategy(config, initial_adapter=THETA0), FfaLora)


def fail_inside(model):
    with lora_a_frozen(model):
        raise RuntimeError("inside")


@pytest.mark.parametrize("model_name", [TINY_MODEL, DIGITS_VIT], ids=["text", "image"])
def test_real_adapters_share_or_freeze_exactly_the_lora_a_arrays(model_name):
    initial = initial_adapter_arrays(model_name, LoraSettings(), seed=0)
    a_names = {name for name in initial if name.endswith("lora_A.weight")}
    assert a_names and {name for name in initial if is_lora_a(name)} == a_names
    assert FedSaLora(initial_adapter=initial).shared_names == a_names
    assert FfaLora(initial_adapter=initial).frozen_names == a_names
    model = build_lora_model(model_name, LoraSettings(), seed=0)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    with lora_a_frozen(model):
        frozen = trainable - {name for name, p in model.named_parameters() if p.requires_grad}
    assert len(frozen) == len(a_names) and all(".lora_A." in name for name in frozen)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == trainable
    with pytest.raises(RuntimeError, match="inside"):
        fail_inside(model)
    assert {name for name, p in model.named_parameters() if p.requires_grad} == trainable  # restored on error too
    with pytest.raises(ValueError, match="freeze-lora-a: the model has no trainable lora_A parameter"):
        lora_a_frozen(torch.nn.Linear(2, 2)).__enter__()


def with_nonzero_b(initial: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """θ⁰ with small random B matrices: with B = 0 the gradient of A is zero, so A would not move anyway."""
    rng = np.random.default_rng(0)
    return {
        name: (0.1 * rng.standard_normal(array.shape)).astype(np.float32) if ".lora_B." in name else array
        for name, array in initial.items()
    }


def test_the_client_app_trains_b_with_a_left_exactly_as_received_then_unfreezes_it(server_identity):
    config = {
        **load_app_config(),
        "model-name": TINY_MODEL,
        "precision": "fp32",
        "synthetic-train-examples": 8,
        "synthetic-test-examples": 4,
        "local-steps": 2,
        "learning-rate": 0.01,
    }
    app, context = started_client(config)
    run_config = RunConfig.from_run_config(config)
    sent = with_nonzero_b(initial_adapter_arrays(run_config.model.name, run_config.lora, seed=run_config.seed))

    def train(freeze: bool) -> dict[str, np.ndarray]:
        values = {
            protocol.SERVER_ROUND: 1,
            protocol.PARTITION_ID: 0,
            protocol.ADAPTER_DIGEST: protocol.adapter_digest(sent),
        }
        if freeze:
            values[protocol.FREEZE_LORA_A] = True
        content = RecordDict({protocol.CONFIG: ConfigRecord(values), protocol.ARRAYS: protocol.adapter_to_record(sent)})
        reply = app(Message(content, 5, MessageType.TRAIN), context)
        return protocol.record_to_adapter(reply.content.array_records[protocol.ARRAYS])

    a_names = [name for name in sent if ".lora_A." in name]
    b_names = [name for name in sent if ".lora_B." in name]
    frozen = train(freeze=True)
    assert all(np.array_equal(frozen[name], sent[name]) for name in a_names)
    assert all(not np.array_equal(frozen[name], sent[name]) for name in b_names)
    # The process's one model serves the next client: without the flag its A trains again.
    unfrozen = train(freeze=False)
    assert all(not np.array_equal(unfrozen[name], sent[name]) for name in a_names)


def test_an_image_classifier_trains_b_and_head_with_a_frozen():
    data = make_digits_client_data(2, 8, seed=0, test_fraction=0.2)
    model = build_lora_model(DIGITS_VIT, LoraSettings(), seed=0)
    sent = with_nonzero_b(get_adapter_arrays(model))
    set_adapter_arrays(model, sent)
    train_adapter(
        model,
        ImageCodec(),
        data.train,
        steps=2,
        batch_size=8,
        learning_rate=0.01,
        bf16_autocast=False,
        seed=0,
        freeze_lora_a=True,
    )
    after = get_adapter_arrays(model)
    for name, array in sent.items():
        assert np.array_equal(after[name], array) == (".lora_A." in name), name  # A exactly; B and head moved
    assert all(p.requires_grad for name, p in model.named_parameters() if ".lora_A." in name)
