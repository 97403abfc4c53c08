"""Rounds survive missing clients; a checkpointed strategy resumes to the same state."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, MessageType

from fedbilevel import protocol
from fedbilevel.aggregation import FedBipSettings, fedbip_aggregate
from fedbilevel.checkpoint import load_checkpoint, save_checkpoint
from fedbilevel.strategies.fedamp import FedAmp
from fedbilevel.strategies.fedbip import FedBip
from fedbilevel.testing import INITIAL, FakeClient, FakeGrid, update_of

pytestmark = pytest.mark.usefixtures("server_identity")


def test_a_silent_client_is_recorded_and_keeps_its_adapter():
    clients = {p: FakeClient(p, "silent" if p == 2 else "good") for p in range(4)}
    records = []
    strategy = FedBip(initial_adapter=INITIAL, min_nodes=4, on_round_end=records.append)
    strategy.start(FakeGrid({10 + p: c for p, c in clients.items()}), ArrayRecord(), num_rounds=1)
    failures = records[0]["failures"]
    assert failures == [
        {
            "phase": "train",
            "partition_id": 2,
            "node_id": 12,
            "reason": "no reply within round-timeout (node lost or too slow)",
        }
    ]
    assert all(np.array_equal(strategy.adapter_for(2)[k], INITIAL[k]) for k in INITIAL)
    # The others are aggregated among themselves.
    trained = [{k: INITIAL[k] + update_of(p, 1)[k] for k in INITIAL} for p in (0, 1, 3)]
    expected = fedbip_aggregate([INITIAL] * 3, trained)
    for p, adapter in zip((0, 1, 3), expected):
        np.testing.assert_allclose(strategy.adapter_for(p)["a"], adapter["a"], rtol=1e-6)


def test_too_few_replies_skip_aggregation_and_keep_every_adapter():
    clients = {p: FakeClient(p, "good" if p == 0 else "raise") for p in range(4)}
    records = []
    strategy = FedBip(initial_adapter=INITIAL, min_nodes=4, min_available_fraction=0.5, on_round_end=records.append)
    strategy.start(FakeGrid({10 + p: c for p, c in clients.items()}), ArrayRecord(), num_rounds=2)
    assert records[0]["aggregation_skipped"] == "1 of 4 clients replied validly, 2 needed (min-available-fraction)"
    assert len(records[0]["failures"]) == 3
    kind, server_round, received = clients[0].received[2]
    assert (kind, server_round) == (MessageType.TRAIN, 2)
    assert all(np.array_equal(received[k], INITIAL[k]) for k in INITIAL), (
        "client 0's adapter changed although the round was skipped"
    )
    with pytest.raises(ValueError, match=r"min_available_fraction: 0 is not allowed; expected a number in \(0, 1\]"):
        FedBip(initial_adapter=INITIAL, min_available_fraction=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: FedBip(initial_adapter=INITIAL, min_nodes=4, settings=FedBipSettings(similarity_ema=0.5)),
        lambda: FedAmp(initial_adapter=INITIAL, min_nodes=4, proximal_lambda=0.1, sigma=5.0, self_weight=0.5),
    ],
    ids=["fedbip-ema", "fedamp"],
)
def test_resume_from_a_checkpoint_matches_an_unbroken_run(make, tmp_path):
    def run(rounds, strategy):
        clients = {p: FakeClient(p) for p in range(4)}
        strategy.start(FakeGrid({20 + p: c for p, c in clients.items()}), ArrayRecord(), num_rounds=rounds)
        return clients

    unbroken = make()
    run(3, unbroken)

    first = make()
    run(2, first)
    first.store.attach(tmp_path / "store")
    save_checkpoint(tmp_path, first.checkpoint())
    resumed = make()
    resumed.store.attach(tmp_path / "store")
    resumed.restore(load_checkpoint(tmp_path))
    assert resumed.round_offset == 2 and resumed.clients == first.clients
    clients = run(1, resumed)
    # The resumed round is numbered 3 (client seeds depend on it) and everything ends equal.
    assert [r for _, r, _ in clients[0].received] == [3, 3]
    assert resumed.history[-1]["round"] == 3
    np.testing.assert_allclose(resumed.history[-1]["weights"], unbroken.history[-1]["weights"], rtol=1e-12)
    for p in range(4):
        for k in INITIAL:
            np.testing.assert_array_equal(resumed.adapter_for(p)[k], unbroken.adapter_for(p)[k])
            np.testing.assert_array_equal(resumed.personalized_adapter(p)[k], unbroken.personalized_adapter(p)[k])


def test_a_folder_without_checkpoint_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"run-config key 'resume-from': .* has no checkpoint\.json"):
        load_checkpoint(tmp_path)


def test_faulty_client_harness_sends_a_scaled_random_update():
    from fedbilevel.simulation import random_updates

    received = {"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float32)}
    trained = {"a": np.full((2, 3), 0.5, np.float32), "b": np.ones(4, np.float32)}  # update norm √(6·0.25)
    corrupt = random_updates([2], scale=10.0, seed=0)
    assert corrupt(1, 1, received, trained) is trained  # not a faulty client
    sent = corrupt(2, 1, received, trained)
    norm = np.sqrt(sum(np.sum((sent[k].astype(np.float64) - received[k]) ** 2) for k in received))
    assert norm == pytest.approx(10 * np.sqrt(6 * 0.25), rel=1e-5)
    again = corrupt(2, 1, received, trained)
    assert all(np.array_equal(sent[k], again[k]) for k in sent) and sent["a"].dtype == np.float32
    assert not np.allclose(corrupt(2, 2, received, trained)["a"], sent["a"])  # a new direction every round


def test_a_run_where_no_client_can_start_stops_with_the_reason():
    class Broken(FakeClient):
        def handle(self, message):
            if message.metadata.message_type == MessageType.QUERY:
                from flwr.app import Error, Message

                return Message(Error(code=0, reason="data folder /nowhere: not found"), reply_to=message)
            return super().handle(message)

    strategy = FedBip(initial_adapter=INITIAL, min_nodes=2)
    with pytest.raises(
        RuntimeError, match="no client could start; the first error: client error: data folder /nowhere: not found"
    ):
        strategy.start(FakeGrid({1: Broken(0), 2: Broken(1)}), ArrayRecord(), num_rounds=1)


def test_fault_harness_absent_clients_fail_every_round_and_others_pass_through():
    from fedbilevel.config import ConfigError
    from fedbilevel.simulation import fault_harness

    received = {"a": np.zeros((2, 3), np.float32)}
    trained = {"a": np.full((2, 3), 0.5, np.float32)}
    assert fault_harness({"seed": 0}) is None  # everyone honest: no harness at all
    corrupt = fault_harness({"seed": 0}, faulty_clients=[1], absent_clients=[3])
    assert corrupt(0, 1, received, trained) is trained
    assert not np.allclose(corrupt(1, 1, received, trained)["a"], trained["a"])
    for server_round in (1, 2):
        with pytest.raises(RuntimeError, match=f"client 3 is absent .* round {server_round}"):
            corrupt(3, server_round, received, trained)
    with pytest.raises(ConfigError, match=r"clients \[2\] are both faulty and absent"):
        fault_harness({"seed": 0}, faulty_clients=[1, 2], absent_clients=[2])


class CannotStart(FakeClient):
    """Reports at the partition query why it cannot start (as the ClientApp does when its data fails to load)."""

    def handle(self, message):
        if message.metadata.message_type == MessageType.QUERY:
            from flwr.app import ConfigRecord, Message, RecordDict

            info = {protocol.PARTITION_ID: self.partition_id, protocol.START_ERROR: "ValueError: test.jsonl: no lines"}
            return Message(RecordDict({protocol.INFO: ConfigRecord(info)}), reply_to=message)
        return super().handle(message)


def test_clients_that_cannot_start_are_recorded_every_round_and_count_against_min_available_fraction():
    clients = {0: FakeClient(0), 1: CannotStart(1), 2: CannotStart(2), 3: FakeClient(3, "silent")}
    records = []
    strategy = FedBip(initial_adapter=INITIAL, min_nodes=4, min_available_fraction=0.5, on_round_end=records.append)
    strategy.start(FakeGrid({10 + p: c for p, c in clients.items()}), ArrayRecord(), num_rounds=2)
    for record in records:
        starts = [(f["partition_id"], f["reason"]) for f in record["failures"] if f["phase"] == "start"]
        assert starts == [(1, "ValueError: test.jsonl: no lines"), (2, "ValueError: test.jsonl: no lines")]
        # 1 valid reply of 4 clients (2 could not start, 1 silent): below one half, so nothing is aggregated.
        assert record["aggregation_skipped"].startswith("1 of 4 clients replied validly, 2 needed")


def test_too_few_clients_able_to_start_stop_the_run_at_start_up_with_the_reason():
    # Issue input, kind: a max-seq-len that leaves 6 of 8 clients' data unusable ran every round training
    # nothing for them; now the run stops before any work, with the counts and the first reason.
    clients = {p: (CannotStart(p) if p >= 2 else FakeClient(p)) for p in range(8)}
    strategy = FedBip(initial_adapter=INITIAL, min_nodes=8, min_available_fraction=0.5)
    match = r"only 2 of 8 clients could start, 4 needed \(min-available-fraction\); the first error: ValueError"
    with pytest.raises(RuntimeError, match=match):
        strategy.start(FakeGrid({70 + p: c for p, c in clients.items()}), ArrayRecord(), num_rounds=1)
    assert [client.received for client in clients.values()] == [[]] * 8  # nobody trained
