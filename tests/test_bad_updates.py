"""A reply that would make any strategy's arithmetic non-finite is rejected like NaN/Inf, naming the client."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, MessageType

from fedbilevel import protocol
from fedbilevel.protocol import AlaSettings
from fedbilevel.strategies.cluster_oracle import ClusterOracle
from fedbilevel.strategies.fedala import FedAla
from fedbilevel.strategies.fedamp import FedAmp
from fedbilevel.strategies.fedavg import FedAvg
from fedbilevel.strategies.fedbip import FedBip
from fedbilevel.strategies.fedprox import FedProx
from fedbilevel.strategies.local import LocalOnly
from fedbilevel.strategies.replies import MAX_SQUARED_NORM
from fedbilevel.testing import INITIAL, FakeClient, FakeGrid

pytestmark = pytest.mark.usefixtures("server_identity")

STRATEGIES = {
    "fedbip": lambda **kw: FedBip(**kw),
    "fedbip-l": lambda **kw: FedBip(layerwise=True, **kw),
    "fedavg": lambda **kw: FedAvg(**kw),
    "fedprox": lambda **kw: FedProx(proximal_mu=0.01, **kw),
    "fedamp": lambda **kw: FedAmp(proximal_lambda=0.01, sigma=50.0, self_weight=0.5, **kw),
    "fedala": lambda **kw: FedAla(ala=AlaSettings(), **kw),
    "local": lambda **kw: LocalOnly(**kw),
    "cluster-oracle": lambda **kw: ClusterOracle(**kw),
}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_a_huge_finite_update_is_rejected_and_the_others_aggregate(name):
    # Issue input: --faulty-clients 2 --faulty-scale 1e25 stopped the server ("squared norms overflow
    # float32", exit 1, no results.json, no client named).
    clients = {0: FakeClient(0), 1: FakeClient(1), 2: FakeClient(2, "huge")}
    records = []
    strategy = STRATEGIES[name](initial_adapter=INITIAL, min_nodes=3, on_round_end=records.append)
    strategy.start(FakeGrid({20 + p: c for p, c in clients.items()}), ArrayRecord(), num_rounds=2)
    for record in records:
        assert [(f["phase"], f["partition_id"]) for f in record["failures"]] == [("train", 2)]
        assert "squared norm" in record["failures"][0]["reason"]
        assert record["participants"] == [0, 1]
        assert set(record["eval"]) == {"0", "1", "2"}
    for partition_id in range(3):
        for array in strategy.personalized_adapter(partition_id).values():
            assert np.all(np.isfinite(array))


def test_the_largest_accepted_adapter_keeps_task_vector_norms_finite_in_float32():
    # ‖θ − θ̄‖² ≤ 2‖θ‖² + 2‖θ̄‖² ≤ 4 · MAX_SQUARED_NORM = float32's largest value.
    assert pytest.approx(float(np.finfo(np.float32).max)) == 4 * MAX_SQUARED_NORM
    edge = np.full(4, np.sqrt(MAX_SQUARED_NORM / 4), np.float32)
    tau = edge - (-edge)
    assert np.isfinite(np.dot(tau, tau))


class NanScoreClient(FakeClient):
    """Evaluates to a NaN score (e.g. a metric divided by zero items)."""

    def handle(self, message):
        reply = super().handle(message)
        if message.metadata.message_type == MessageType.EVALUATE:
            reply.content.metric_records[protocol.METRICS]["exact_match"] = float("nan")
        return reply


def test_a_nan_score_is_rejected_so_the_round_mean_stays_finite():
    clients = {0: FakeClient(0), 1: NanScoreClient(1)}
    records = []
    strategy = FedBip(initial_adapter=INITIAL, min_nodes=2, on_round_end=records.append)
    strategy.start(FakeGrid({30 + p: c for p, c in clients.items()}), ArrayRecord(), num_rounds=1)
    assert [(f["phase"], f["partition_id"]) for f in records[0]["failures"]] == [("evaluate", 1)]
    assert "metric 'exact_match'" in records[0]["failures"][0]["reason"]
    assert set(records[0]["eval"]) == {"0"}
