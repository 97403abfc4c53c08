"""A SuperNode killed and restarted with the same --node-config: its partition fails once per phase, not twice."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord

from fedbilevel.strategies.fedbip import FedBip
from fedbilevel.testing import INITIAL, FakeClient, FakeGrid, UnavailableNode

pytestmark = pytest.mark.usefixtures("server_identity")


def test_a_restarted_supernode_is_one_failure_per_phase_for_its_partition_then_serves_again():
    clients = {p: FakeClient(p) for p in range(2)}
    grid = FakeGrid({10: clients[0], 11: clients[1]})
    records = []

    def on_round_end(record):
        records.append(record)
        if record["round"] == 1:  # SuperNode 1 killed and restarted: the SuperLink still lists its old node
            grid.nodes = {10: clients[0], 11: UnavailableNode(), 12: clients[1]}
        if record["round"] == 2:  # the SuperLink has dropped the old node
            grid.nodes = {10: clients[0], 12: clients[1]}

    strategy = FedBip(initial_adapter=INITIAL, min_nodes=2, min_available_fraction=0.5, on_round_end=on_round_end)
    strategy.start(grid, ArrayRecord(), num_rounds=3)

    # Round 2: Flower's "Node Unavailable" replies (sent by the SuperLink, node 1) are matched to the
    # messages they answer: one failure per phase, both for partition 1, none "missing" or for partition None.
    failures = [(f["phase"], f["partition_id"], f["node_id"]) for f in records[1]["failures"]]
    assert failures == [("train", 1, 11), ("evaluate", 1, 11)]
    assert all("Node Unavailable" in f["reason"] for f in records[1]["failures"])
    assert records[1]["participants"] == [0]
    # Round 3: the restarted node serves partition 1 again, from the adapter kept for it in round 2.
    assert records[2]["failures"] == [] and records[2]["participants"] == [0, 1]
    _, server_round, received = clients[1].received[-2]
    assert server_round == 3
    after_round_1 = clients[1].received[1][2]  # its round-1 evaluate message: the adapter after round 1
    for name in INITIAL:
        np.testing.assert_array_equal(received[name], after_round_1[name])
