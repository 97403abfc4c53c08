"""Cluster oracle: task vectors averaged within the true task groups, by hand."""

import numpy as np
import pytest
from flwr.app import ArrayRecord

from fedbilevel.strategies.cluster_oracle import ClusterOracle
from fedbilevel.testing import INITIAL, FakeClient, FakeGrid, update_of


@pytest.mark.usefixtures("server_identity")
def test_clients_get_the_mean_update_of_their_task_group():
    clients = {p: FakeClient(p) for p in range(4)}  # the fakes report task p // 2
    strategy = ClusterOracle(initial_adapter=INITIAL, min_nodes=4)
    strategy.start(FakeGrid({80 + p: c for p, c in clients.items()}), ArrayRecord(), num_rounds=2)
    for group in ((0, 1), (2, 3)):
        after_one = {k: INITIAL[k] + (update_of(group[0], 1)[k] + update_of(group[1], 1)[k]) / 2 for k in INITIAL}
        after_two = {k: after_one[k] + (update_of(group[0], 2)[k] + update_of(group[1], 2)[k]) / 2 for k in INITIAL}
        for p in group:
            round_two_start = clients[p].received[2][2]
            for k in INITIAL:
                np.testing.assert_allclose(round_two_start[k], after_one[k], rtol=1e-6)
                np.testing.assert_allclose(strategy.adapter_for(p)[k], after_two[k], rtol=1e-6)
    np.testing.assert_allclose(
        strategy.history[0]["weights"], [[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]]
    )
