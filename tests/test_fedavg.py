"""FedAvg (FedIT) of LoRA adapters: hand-computed weighted means (by examples or uniform); everyone gets the same
adapter."""

import numpy as np
import pytest
from flwr.app import ArrayRecord

from fedbilevel import options, protocol
from fedbilevel.config import RunConfig
from fedbilevel.mixing import weighted_average
from fedbilevel.options import ConfigError
from fedbilevel.strategies import build_strategy
from fedbilevel.strategies.fedavg import FedAvg
from fedbilevel.strategies.local import LocalOnly
from fedbilevel.testing import INITIAL, LORA_THETA0, FakeClient, FakeGrid, update_of


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


@pytest.mark.usefixtures("server_identity")
@pytest.mark.parametrize(("aggregation_weights", "weights"), [("examples", [1, 3]), ("uniform", [1, 1])])
def test_aggregation_weights_weigh_by_training_examples_or_equally(aggregation_weights, weights):
    clients = {p: FakeClient(p, num_examples=[1, 3][p]) for p in range(2)}
    strategy = FedAvg(initial_adapter=INITIAL, min_nodes=2, aggregation_weights=aggregation_weights)
    strategy.start(FakeGrid({30 + p: c for p, c in clients.items()}), ArrayRecord(), num_rounds=2)
    _kind, _round, received = clients[0].received[2]  # round 2 train message: θ⁰ + the weighted mean update
    for k in INITIAL:
        mean_update = (weights[0] * update_of(0, 1)[k] + weights[1] * update_of(1, 1)[k]) / sum(weights)
        np.testing.assert_allclose(received[k], INITIAL[k] + mean_update, rtol=1e-6)


@pytest.mark.parametrize(("aggregation_weights", "expected"), [("examples", 7.5), ("uniform", 5.0)])
def test_the_global_adapter_follows_aggregation_weights(aggregation_weights, expected):
    strategy = LocalOnly(initial_adapter=INITIAL, aggregation_weights=aggregation_weights)
    strategy.clients = {0: {protocol.NUM_TRAIN: 1}, 1: {protocol.NUM_TRAIN: 3}}
    strategy.adapters[0] = {k: np.zeros_like(v) for k, v in INITIAL.items()}
    strategy.adapters[1] = {k: np.full_like(v, 10.0) for k, v in INITIAL.items()}
    for k, array in strategy.global_adapter().items():
        np.testing.assert_allclose(array, np.full_like(INITIAL[k], expected))  # (1·0 + 3·10)/4, or (0 + 10)/2


def test_aggregation_weights_is_a_run_config_key_that_reaches_the_strategy():
    config = RunConfig.from_run_config(options.defaults(RunConfig), {"strategy": "fedsa-lora"})
    assert config.aggregation_weights == "examples"
    for strategy in ("fedavg", "fedprox", "fedala", "fedsa-lora", "ffa-lora", "feddpa"):
        uniform = RunConfig.from_run_config(
            config.to_run_config(), {"aggregation-weights": "uniform", "strategy": strategy}
        )
        assert build_strategy(uniform, initial_adapter=LORA_THETA0).aggregation_weights == "uniform", strategy
    with pytest.raises(ConfigError, match=r"^run-config key 'aggregation-weights': value 'median' is not allowed"):
        RunConfig.from_run_config(config.to_run_config(), {"aggregation-weights": "median"})
    with pytest.raises(ValueError, match="aggregation_weights: 'median'"):
        FedAvg(initial_adapter=INITIAL, aggregation_weights="median")
