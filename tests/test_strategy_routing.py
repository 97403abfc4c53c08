"""The FedBip strategy routes each client exactly its own adapter, keyed by partition id.

A fake Grid stands in for Flower's transport: fake clients answer QUERY/TRAIN/EVALUATE
messages like the real ClientApp and remember every adapter they were sent.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedbilevel import protocol
from fedbilevel.aggregation import fedbip_aggregate
from fedbilevel.strategies.fedbip import FedBip

@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    # Messages read the sender's identity, which Flower's runtime sets in a real ServerApp.
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in {"_run_id": 1, "_node_id": 0, "_task_id": 1}.items():
        monkeypatch.setattr(TaskIdentity, name, value)


INITIAL = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32)}


def update_of(partition_id: int, server_round: int) -> dict[str, np.ndarray]:
    """A distinct task vector per client and round (clients 0,1 and 2,3 point alike)."""
    rng = np.random.default_rng(1000 * partition_id + server_round)
    direction = np.ones(10) if partition_id < 2 else np.r_[np.ones(5), -np.ones(5)]
    flat = (direction + 0.3 * rng.normal(size=10)).astype(np.float32)
    return {"a": flat[:6].reshape(2, 3), "b": flat[6:]}


class FakeClient:
    def __init__(self, partition_id: int, behaviour: str = "good"):
        self.partition_id = partition_id
        self.behaviour = behaviour
        self.received: list[tuple[str, int, dict[str, np.ndarray]]] = []

    def handle(self, message: Message) -> Message:
        if message.metadata.message_type == MessageType.QUERY:
            info = ConfigRecord({protocol.PARTITION_ID: self.partition_id, "task": f"task{self.partition_id // 2}"})
            return Message(RecordDict({protocol.INFO: info}), reply_to=message)
        config = message.content.config_records[protocol.CONFIG]
        assert config[protocol.PARTITION_ID] == self.partition_id, "message routed to the wrong client"
        adapter = protocol.record_to_adapter(message.content.array_records[protocol.ARRAYS])
        server_round = int(config[protocol.SERVER_ROUND])
        self.received.append((message.metadata.message_type, server_round, adapter))
        metrics = {protocol.PARTITION_ID: self.partition_id, protocol.NUM_EXAMPLES: 10}
        if message.metadata.message_type == MessageType.EVALUATE:
            metrics["exact_match"] = float(self.partition_id)
            return Message(RecordDict({protocol.METRICS: MetricRecord(metrics)}), reply_to=message)
        if self.behaviour == "raise":
            return Message(Error(code=0, reason="CUDA out of memory"), reply_to=message)
        trained = {k: v + update_of(self.partition_id, server_round)[k] for k, v in adapter.items()}
        if self.behaviour == "nan":
            trained["b"][0] = np.nan
        if self.behaviour == "shape":
            trained["b"] = np.zeros(5, np.float32)
        if self.behaviour == "impostor":
            metrics[protocol.PARTITION_ID] = 0
        metrics["train-loss"] = 1.0
        content = RecordDict({protocol.ARRAYS: protocol.adapter_to_record(trained), protocol.METRICS: MetricRecord(metrics)})
        return Message(content, reply_to=message)


class FakeGrid(Grid):
    """In-process grid: node id -> FakeClient; node ids can be reassigned (a restart)."""

    def __init__(self, nodes: dict[int, FakeClient]):
        self.nodes = nodes

    def set_run(self, run):
        pass

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id)

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        return [self.nodes[m.metadata.dst_node_id].handle(m) for m in messages]


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
    expected = {p: INITIAL for p in range(4)}
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


@pytest.mark.parametrize("behaviour, reason", [
    ("raise", "client error: CUDA out of memory"),
    ("nan", "contains NaN or Inf"),
    ("shape", "array 'b': shape (5,), expected (4,)"),
    ("impostor", "partition-id 0 in reply; the message was for 3"),
])
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
