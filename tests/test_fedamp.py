"""FedAMP strategy: clients train from their cloud model uᵢ, evaluate their own wᵢ."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, MessageType

from fedbilevel.strategies.fedamp import FedAmp
from fedbilevel.testing import INITIAL, FakeClient, FakeGrid, update_of

SIGMA, SELF_WEIGHT, LAMBDA = 3.0, 0.4, 0.05


def flat(adapter):
    return np.concatenate([adapter[k].ravel() for k in INITIAL]).astype(np.float64)


@pytest.mark.usefixtures("server_identity")
def test_clients_train_from_attentive_cloud_models_and_evaluate_their_own():
    clients = {p: FakeClient(p) for p in range(4)}
    strategy = FedAmp(
        proximal_lambda=LAMBDA, sigma=SIGMA, self_weight=SELF_WEIGHT, initial_adapter=INITIAL, min_nodes=4
    )
    strategy.start(FakeGrid({50 + p: c for p, c in clients.items()}), ArrayRecord(), num_rounds=2)

    trained = [{k: INITIAL[k] + update_of(p, 1)[k] for k in INITIAL} for p in range(4)]
    vectors = [flat(w) for w in trained]
    for i, client in clients.items():
        kinds = [(kind, server_round) for kind, server_round, _ in client.received]
        assert kinds == [
            (MessageType.TRAIN, 1),
            (MessageType.EVALUATE, 1),
            (MessageType.TRAIN, 2),
            (MessageType.EVALUATE, 2),
        ]
        # Round-1 evaluation: the client's own trained model wᵢ.
        for k in INITIAL:
            np.testing.assert_allclose(client.received[1][2][k], trained[i][k], rtol=1e-6)
        # Round-2 training starts from uᵢ = ξᵢᵢ wᵢ + Σⱼ≠ᵢ ξᵢⱼ wⱼ, ξᵢⱼ ∝ exp(σ cos(wᵢ, wⱼ)).
        others = [j for j in range(4) if j != i]
        scores = np.array(
            [
                np.exp(SIGMA * vectors[i] @ vectors[j] / np.linalg.norm(vectors[i]) / np.linalg.norm(vectors[j]))
                for j in others
            ]
        )
        xi = dict(zip(others, (1 - SELF_WEIGHT) * scores / scores.sum()))
        expected = SELF_WEIGHT * vectors[i] + sum(xi[j] * vectors[j] for j in others)
        np.testing.assert_allclose(flat(client.received[2][2]), expected, rtol=1e-5)
        assert all(config["proximal-mu"] == LAMBDA for config in client.configs)
    # Same-task clients (0,1 and 2,3 in the fakes) attend to each other most.
    weights = np.array(strategy.history[0]["weights"])
    assert weights[0, 1] > max(weights[0, 2], weights[0, 3]) and weights[2, 3] > max(weights[2, 0], weights[2, 1])
    np.testing.assert_allclose(np.diag(weights), SELF_WEIGHT)


def test_negative_lambda_is_refused():
    with pytest.raises(ValueError, match="proximal_lambda: -1 is not allowed"):
        FedAmp(proximal_lambda=-1, sigma=1.0, self_weight=0.5, initial_adapter=INITIAL)
