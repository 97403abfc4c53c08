"""FedSA-LoRA: the A matrices averaged and shared, each client's B matrices and head its own; by hand."""

from functools import partial

import numpy as np
import pytest
from flwr.app import ArrayRecord, MessageType

from fedbilevel.checkpoint import load_checkpoint
from fedbilevel.config import RunConfig, load_app_config
from fedbilevel.strategies import build_strategy
from fedbilevel.strategies.fedsa_lora import FedSaLora, is_lora_a
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
    """What client p's training adds in round t: (p + 1)·t to A, 10 times that to B, 100 times to the head."""
    scale = np.float32((partition_id + 1) * server_round)
    return {A: np.full((2, 3), scale), B: np.full((3, 2), 10 * scale), HEAD: np.full(2, 100 * scale)}


# federation(size): node id -> fake client, partitions 0..size-1 on nodes 10, 11, ..., starting from θ⁰ and
# training by `step`.
federation = partial(fake_federation, initial=THETA0, update=step)


def adapter(a: float, b: float, head: float) -> dict[str, np.ndarray]:
    """θ⁰ plus a on A, b on B and head on the head."""
    return {A: THETA0[A] + a, B: THETA0[B] + b, HEAD: THETA0[HEAD] + head}


def test_lora_a_names_as_peft_saves_them():
    assert is_lora_a("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    assert is_lora_a("base_model.model.model.embed_tokens.lora_embedding_A")
    assert is_lora_a("lora_A.weight")
    for name in ("x.q_proj.lora_B.weight", "x.lora_embedding_B", "base_model.model.classifier.weight", "x.lora_Ax"):
        assert not is_lora_a(name), name


@pytest.mark.usefixtures("server_identity")
def test_two_rounds_share_the_mean_a_and_keep_each_clients_b_and_head():
    clients = federation(3)
    strategy = FedSaLora(initial_adapter=THETA0, min_nodes=3)
    strategy.start(FakeGrid(clients), ArrayRecord(), num_rounds=2)
    # Round 1 from θ⁰: A ← θ⁰_A + mean(1, 2, 3) = θ⁰_A + 2; client p keeps B = 10(p + 1), head θ⁰ + 100(p + 1).
    # Round 2 from those: A ← θ⁰_A + 2 + mean(2, 4, 6) = θ⁰_A + 6; B = 10(p + 1) + 20(p + 1), head likewise.
    for node, client in clients.items():
        p = node - 10
        kinds = [(kind, server_round) for kind, server_round, _ in client.received]
        assert kinds == [
            (MessageType.TRAIN, 1),
            (MessageType.EVALUATE, 1),
            (MessageType.TRAIN, 2),
            (MessageType.EVALUATE, 2),
        ]
        assert_adapters_equal(client.received[0][2], THETA0)
        after_one = adapter(2, 10 * (p + 1), 100 * (p + 1))
        assert_adapters_equal(client.received[1][2], after_one)  # evaluates shared A with its own B
        assert_adapters_equal(client.received[2][2], after_one)  # and trains from them next round
        after_two = adapter(6, 30 * (p + 1), 300 * (p + 1))
        assert_adapters_equal(client.received[3][2], after_two)
        assert_adapters_equal(strategy.adapter_for(p), after_two)
        assert_adapters_equal(strategy.personalized_adapter(p), after_two)
    assert strategy.history[-1]["participants"] == [0, 1, 2]


def test_the_shared_a_is_the_example_weighted_mean_and_a_client_that_never_trained_has_theta0s_b():
    strategy = FedSaLora(initial_adapter=THETA0)
    trained = {0: adapter(1, 10, 100), 1: adapter(5, 20, 200)}
    assert strategy.personalize(1, trained, {0: 1, 1: 3}) == {"participants": [0, 1]}
    # (1·1 + 3·5) / 4 = 4
    assert_adapters_equal(strategy.adapter_for(0), adapter(4, 10, 100))
    assert_adapters_equal(strategy.adapter_for(1), adapter(4, 20, 200))
    assert_adapters_equal(strategy.adapter_for(2), adapter(4, 0, 0))


def expected_states(records, partitions):
    """Round -> partition -> adapter after that round, replaying FedSA-LoRA on the sampled clients by hand."""
    shared = THETA0[A]
    own = {p: {B: THETA0[B], HEAD: THETA0[HEAD]} for p in partitions}
    states = {0: {p: {A: shared, **own[p]} for p in partitions}}
    for record in records:
        server_round, sampled = record["round"], record["sampled"]["train"]
        updates = {p: step(p, server_round) for p in sampled}
        shared = np.mean([shared + updates[p][A] for p in sampled], axis=0)  # equal example counts
        for p in sampled:
            own[p] = {name: own[p][name] + updates[p][name] for name in (B, HEAD)}
        states[server_round] = {p: {A: shared, B: own[p][B], HEAD: own[p][HEAD]} for p in partitions}
    return states


@pytest.mark.usefixtures("server_identity")
def test_absent_clients_keep_their_b_and_head_and_receive_the_current_shared_a():
    records = []
    sampling = SamplingSettings(fraction_train=0.5, min_train_nodes=2)
    strategy = FedSaLora(initial_adapter=THETA0, min_nodes=4, sampling=sampling, seed=1, on_round_end=records.append)
    clients = federation(4)
    strategy.start(FakeGrid(clients), ArrayRecord(), num_rounds=3)
    sampled = [record["sampled"]["train"] for record in records]
    assert all(len(chosen) == 2 for chosen in sampled) and len(set(map(tuple, sampled))) > 1
    states = expected_states(records, range(4))
    for node, client in clients.items():
        p = node - 10
        trained_in = [r for r, chosen in enumerate(sampled, start=1) if p in chosen]
        received = [(kind, server_round) for kind, server_round, _ in client.received]
        expected = []
        for server_round in (1, 2, 3):
            if server_round in trained_in:
                expected.append((MessageType.TRAIN, server_round))
            expected.append((MessageType.EVALUATE, server_round))  # every client evaluates every round
        assert received == expected
        for kind, server_round, got in client.received:
            # A client trains from the state after the previous round and evaluates the state after this one.
            state = states[server_round - 1 if kind == MessageType.TRAIN else server_round][p]
            assert_adapters_equal(got, {name: state[name] for name in THETA0})
        assert_adapters_equal(strategy.adapter_for(p), {name: states[3][p][name] for name in THETA0})


@pytest.mark.usefixtures("server_identity")
def test_resume_from_a_checkpoint_matches_an_unbroken_run(tmp_path):
    def make():
        sampling = SamplingSettings(fraction_train=0.5, min_train_nodes=2)
        return FedSaLora(initial_adapter=THETA0, min_nodes=4, sampling=sampling, seed=1)

    resumed, unbroken, clients = resumed_and_unbroken(make, lambda: federation(4), tmp_path, num_rounds=3)
    assert set(load_checkpoint(tmp_path)["store"]) == {"shared", "local"}
    assert {server_round for client in clients.values() for _, server_round, _ in client.received} == {3}
    for p in range(4):
        assert_adapters_equal(resumed.adapter_for(p), unbroken.adapter_for(p))


def test_an_adapter_without_lora_a_is_refused_and_the_registry_builds_it():
    with pytest.raises(
        ValueError, match=r"initial_adapter: no lora_A array among 2 \(e\.g\. 'a'\); strategy 'fedsa-lora'"
    ):
        FedSaLora(initial_adapter=INITIAL)
    config = RunConfig.from_run_config({**load_app_config(), "strategy": "fedsa-lora"})
    assert isinstance(build_strategy(config, initial_adapter=THETA0), FedSaLora)
