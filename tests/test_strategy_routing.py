"""The FedBip strategy routes each client exactly its own adapter, keyed by partition id."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, MessageType

from fedbilevel.aggregation import FedBipSettings, fedbip_aggregate
from fedbilevel.strategies.fedbip import FedBip
from fedbilevel.testing import INITIAL, FakeClient, FakeGrid, update_of

pytestmark = pytest.mark.usefixtures("server_identity")


def run_rounds(strategy, grid, rounds):
    strategy.start(grid, ArrayRecord(), num_rounds=rounds)


def test_each_client_receives_exactly_its_own_adapter_across_restarts():
    clients = {p: FakeClient(p) for p in range(4)}
    # Node ids unrelated to partition ids, in scrambled order.
    grid = FakeGrid({901: clients[2], 17: clients[0], 4242: clients[3], 5: clients[1]})
    strategy = FedBip(initial_adapter=INITIAL, min_nodes=4)
    run_rounds(strategy, grid, 2)
    # Restart: every SuperNode comes back with a new node id.
    grid.nodes = {11: clients[3], 12: clients[1], 13: clients[0], 14: clients[2]}
    strategy.start(grid, ArrayRecord(), num_rounds=1)  # continues from the kept state

    # Independent replay of the FedBip math over what the clients trained.
    expected = dict.fromkeys(range(4), INITIAL)
    rounds_seen = [1, 2, 1]  # server-round numbers of the three rounds run
    for step, server_round in enumerate(rounds_seen):
        for p, client in clients.items():
            kind, round_no, got = client.received[2 * step]
            assert (kind, round_no) == (MessageType.TRAIN, server_round)
            for k in INITIAL:
                np.testing.assert_array_equal(got[k], expected[p][k])
        trained = [{k: expected[p][k] + update_of(p, server_round)[k] for k in INITIAL} for p in range(4)]
        expected = dict(enumerate(fedbip_aggregate([expected[p] for p in range(4)], trained)))
        for p, client in clients.items():
            kind, _, got = client.received[2 * step + 1]
            assert kind == MessageType.EVALUATE
            for k in INITIAL:
                np.testing.assert_allclose(got[k], expected[p][k], rtol=1e-6)
    # Personalization actually differs between clients, so "own" is a meaningful check.
    assert not np.allclose(expected[0]["a"], expected[2]["a"])
    assert strategy.node_partitions == {11: 3, 12: 1, 13: 0, 14: 2}


def test_round_record_lists_matrices_in_partition_order():
    clients = {p: FakeClient(p) for p in range(4)}
    grid = FakeGrid({50 - p: clients[p] for p in range(4)})
    records = []
    strategy = FedBip(initial_adapter=INITIAL, min_nodes=4, on_round_end=records.append)
    run_rounds(strategy, grid, 1)
    record = records[0]
    assert record["participants"] == [0, 1, 2, 3]
    sim = np.array(record["similarity"])
    assert sim.shape == (4, 4)
    # Clients 0,1 share a direction, as do 2,3 (see update_of).
    assert sim[0, 1] > 0.5 and sim[2, 3] > 0.5 and sim[0, 2] < 0.3
    np.testing.assert_allclose(np.array(record["weights"]).sum(axis=1), 1, atol=1e-5)
    assert record["eval"]["3"]["exact_match"] == 3.0
    assert set(record["train"]) == {"0", "1", "2", "3"}
    assert record["bytes_down"] > 0 and record["bytes_up"] > 0
    assert record["failures"] == []


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [
        ("raise", "client error: RuntimeError: CUDA out of memory"),
        ("nan", "contains NaN or Inf"),
        ("shape", "array 'b': shape (5,), expected (4,)"),
        ("impostor", "partition-id 0 in reply; the message was for 3"),
    ],
)
def test_bad_reply_is_excluded_and_its_adapter_kept(behaviour, reason):
    clients = {p: FakeClient(p) for p in range(3)}
    clients[3] = FakeClient(3, behaviour)
    grid = FakeGrid({100 + p: c for p, c in clients.items()})
    records = []
    strategy = FedBip(initial_adapter=INITIAL, min_nodes=4, on_round_end=records.append)
    run_rounds(strategy, grid, 1)
    assert records[0]["participants"] == [0, 1, 2]
    assert [f["partition_id"] for f in records[0]["failures"]] == [3]
    assert reason in records[0]["failures"][0]["reason"]
    if behaviour == "raise":  # the log and results say the exception in one line; the traceback is kept as detail
        assert records[0]["failures"][0]["reason"] == "client error: RuntimeError: CUDA out of memory"
        assert records[0]["failures"][0]["detail"].startswith("Traceback")
    for k in INITIAL:
        np.testing.assert_array_equal(strategy.adapter_for(3)[k], INITIAL[k])
        assert np.all(np.isfinite(strategy.adapter_for(0)[k]))
    # The others were aggregated among themselves only.
    trained = [{k: INITIAL[k] + update_of(p, 1)[k] for k in INITIAL} for p in range(3)]
    expected = fedbip_aggregate([INITIAL] * 3, trained)
    np.testing.assert_allclose(strategy.adapter_for(1)["a"], expected[1]["a"], rtol=1e-6)


def test_duplicate_partition_claim_is_left_out():
    grid = FakeGrid({1: FakeClient(0), 2: FakeClient(1), 3: FakeClient(1)})
    strategy = FedBip(initial_adapter=INITIAL, min_nodes=3)
    run_rounds(strategy, grid, 1)
    assert sorted(strategy.node_partitions.values()) == [0, 1]
    assert len(grid.nodes[3].received) == 0


def test_local_strategy_keeps_each_trained_adapter():
    from fedbilevel.strategies.local import LocalOnly

    clients = {p: FakeClient(p) for p in range(3)}
    strategy = LocalOnly(initial_adapter=INITIAL, min_nodes=3)
    run_rounds(strategy, FakeGrid({10 + p: c for p, c in clients.items()}), 2)
    for p in range(3):
        expected = {k: INITIAL[k] + update_of(p, 1)[k] + update_of(p, 2)[k] for k in INITIAL}
        for k in INITIAL:
            np.testing.assert_allclose(strategy.adapter_for(p)[k], expected[k], rtol=1e-6)


def test_rounds_without_evaluation_send_no_evaluate_messages():
    clients = {p: FakeClient(p) for p in range(2)}
    records = []
    strategy = FedBip(
        initial_adapter=INITIAL, min_nodes=2, on_round_end=records.append, evaluate_round=lambda r: r == 2
    )
    run_rounds(strategy, FakeGrid({7: clients[0], 8: clients[1]}), 2)
    assert [kind for kind, _, _ in clients[0].received] == [MessageType.TRAIN, MessageType.TRAIN, MessageType.EVALUATE]
    assert records[0]["eval"] == {} and set(records[1]["eval"]) == {"0", "1"}


def test_a_round_without_evaluation_after_one_with_it_records_no_missing_evaluate_replies():
    # Fault: the record of who was sent evaluate messages outlived its round, so round 2 (no evaluation)
    # listed every client as "evaluate reply missing".
    clients = {p: FakeClient(p) for p in range(2)}
    records = []
    strategy = FedBip(
        initial_adapter=INITIAL, min_nodes=2, on_round_end=records.append, evaluate_round=lambda r: r != 2
    )
    run_rounds(strategy, FakeGrid({7: clients[0], 8: clients[1]}), 3)
    assert [record["failures"] for record in records] == [[], [], []]
    assert [set(record["eval"]) for record in records] == [{"0", "1"}, set(), {"0", "1"}]


def test_covered_time_counts_parallel_clients_once():
    from fedbilevel.strategies.rounds import _covered

    intervals = [(1.0, 3.0), (2.0, 4.0), (6.0, 7.0), (9.0, 12.0)]
    assert _covered(intervals, 0.0, 10.0) == pytest.approx(3.0 + 1.0 + 1.0)
    assert _covered(intervals, 2.5, 6.5) == pytest.approx(1.5 + 0.5)
    assert _covered([], 0.0, 5.0) == 0.0
    assert _covered(intervals, None, 5.0) == 0.0


def test_round_time_split_adds_up():
    clients = {p: FakeClient(p) for p in range(3)}
    records = []
    strategy = FedBip(initial_adapter=INITIAL, min_nodes=3, on_round_end=records.append)
    run_rounds(strategy, FakeGrid({20 + p: c for p, c in clients.items()}), 1)
    split = records[0]["time_split"]
    # The fake grid runs clients one after another: 3 clients × ≥5 ms per phase.
    assert split["client_train"] >= 0.015 and split["client_evaluate"] >= 0.015
    total = split["client_train"] + split["client_evaluate"] + split["aggregation"] + split["other"]
    assert total == pytest.approx(records[0]["seconds"], rel=1e-6)
    assert 0.0 <= split["other_fraction"] < 1.0
    assert "client-started" not in records[0]["eval"]["0"]


def test_fedbip_passes_its_similarity_space_to_the_math():
    lora = {
        "m.layers.0.q.lora_A.weight": np.zeros((2, 3), np.float32),
        "m.layers.0.q.lora_B.weight": np.zeros((4, 2), np.float32),
    }
    rng = np.random.default_rng(3)
    # Non-zero start so that ΔW = B·A differs from the raw parameter direction.
    start = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in lora.items()}
    strategy = FedBip(initial_adapter=start, min_nodes=3, settings=FedBipSettings(similarity_space="lora-product"))
    deltas = {p: {k: rng.normal(size=v.shape).astype(np.float32) for k, v in lora.items()} for p in range(3)}
    trained = {p: {k: start[k] + deltas[p][k] for k in lora} for p in range(3)}
    strategy.personalize(1, trained, dict.fromkeys(range(3), 1))
    expected = fedbip_aggregate([start] * 3, [trained[p] for p in range(3)], similarity="lora-product")
    flat = fedbip_aggregate([start] * 3, [trained[p] for p in range(3)])
    for p in range(3):
        for k in lora:
            np.testing.assert_allclose(strategy.adapter_for(p)[k], expected[p][k], rtol=1e-6)
    assert not np.allclose(expected[0]["m.layers.0.q.lora_A.weight"], flat[0]["m.layers.0.q.lora_A.weight"])


def test_eval_global_sends_the_mean_personalized_adapter_with_evaluate_messages():
    clients = {p: FakeClient(p) for p in range(4)}
    strategy = FedBip(initial_adapter=INITIAL, min_nodes=4, evaluate_global=True)
    run_rounds(strategy, FakeGrid({60 + p: c for p, c in clients.items()}), 1)
    # The fakes report no training-set size, so every client weighs 1.
    mean = {k: np.mean([strategy.personalized_adapter(p)[k] for p in range(4)], axis=0) for k in INITIAL}
    for client in clients.values():
        assert len(client.globals) == 1  # evaluate messages only
        for k in INITIAL:
            np.testing.assert_allclose(client.globals[0][k], mean[k], rtol=1e-5, atol=1e-7)
    assert not FakeClient(0).globals
