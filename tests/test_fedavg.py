"""FedAvg (FedIT) of LoRA adapters: hand-computed weighted means; everyone gets the same adapter."""

import numpy as np
import pytest
from flwr.app import ArrayRecord

from fedbilevel.mixing import weighted_average
from fedbilevel.strategies.fedavg import FedAvg
from fedbilevel.testing import INITIAL, FakeClient, FakeGrid, update_of


def test_weighted_average_by_hand():
    adapters = [{"w": np.array([0.0, 4.0], np.float32)}, {"w": np.array([4.0, 0.0], np.float32)}]
    out = weighted_average(adapters, [1, 3])
    np.testing.assert_allclose(out["w"], [3.0, 1.0])
    assert out["w"].dtype == np.float32
    with pytest.raises(ValueError, match=r"weights: \[0.0, 0.0\] is not allowed"):
        weighted_average(adapters, [0, 0])


@pytest.mark.usefixtures("server_identity")
def test_every_client_receives_the_same_global_adapter():
    clients = {p: FakeClient(p) for p in range(3)}
    strategy = FedAvg(initial_adapter=INITIAL, min_nodes=3)
    strategy.start(FakeGrid({30 + p: c for p, c in clients.items()}), ArrayRecord(), num_rounds=2)
    mean_update = {k: np.mean([update_of(p, 1)[k] for p in range(3)], axis=0) for k in INITIAL}
    for client in clients.values():
        _kind, server_round, received = client.received[2]  # round 2 train message
        assert server_round == 2
        for k in INITIAL:
            np.testing.assert_allclose(received[k], INITIAL[k] + mean_update[k], rtol=1e-6)
