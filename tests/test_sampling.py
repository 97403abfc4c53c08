"""Seeded client sampling: Flower's sample size, a draw that a resumed run repeats, absent clients kept."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
from flwr.app import ArrayRecord, MessageType

from fedbilevel.config import RunConfig, load_app_config
from fedbilevel.options import ConfigError
from fedbilevel.strategies.fedbip import FedBip
from fedbilevel.strategies.rounds import over_all_clients
from fedbilevel.strategies.sampling import SamplingSettings, sample_clients, sample_size
from fedbilevel.testing import INITIAL, FakeClient, FakeGrid


def test_sample_size_is_flowers():
    assert sample_size(10, 0.1, 2, key="min-train-nodes") == 2  # int(1.0) below the minimum
    assert sample_size(100, 0.1, 2, key="min-train-nodes") == 10
    assert sample_size(20, 0.25, 2, key="min-train-nodes") == 5
    assert sample_size(8, 1.0, 2, key="min-train-nodes") == 8
    with pytest.raises(
        ConfigError, match="run-config key 'min-train-nodes': value 9 is not allowed; the federation has 8"
    ):
        sample_size(8, 0.5, 9, key="min-train-nodes")


def test_sample_is_seeded_by_run_round_and_phase_and_drawn_without_replacement():
    clients = list(range(20))
    first = sample_clients(clients, 5, seed=3, server_round=2, phase="train")
    assert first == sample_clients(reversed(clients), 5, seed=3, server_round=2, phase="train")  # order-free
    assert first == sorted(first) and len(set(first)) == 5 and set(first) <= set(clients)
    rng = np.random.default_rng([3, 2, 0])  # the documented generator: seed, round, phase (train = 0)
    assert first == sorted(rng.choice(20, size=5, replace=False).tolist())
    others = [sample_clients(clients, 5, seed=3, server_round=r, phase="train") for r in range(3, 8)]
    assert any(other != first for other in others)
    assert sample_clients(clients, 5, seed=3, server_round=2, phase="evaluate") != first
    assert sample_clients(clients, 25, seed=3, server_round=2, phase="train") == clients  # all, no draw


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [("fraction-train", 0.0, "(0.0, 1.0]"), ("fraction-evaluate", 1.5, "(0.0, 1.0]"), ("min-train-nodes", 0, "≥ 1")],
)
def test_bad_sampling_values_fail_in_one_line(key, value, allowed):
    with pytest.raises(
        ConfigError, match=rf"run-config key '{key}': value {value!r} is not allowed.*{re.escape(allowed)}"
    ):
        RunConfig.from_run_config(load_app_config(), {key: value})


@pytest.mark.usefixtures("server_identity")
def test_half_the_clients_train_each_round_the_others_keep_their_adapters_and_everyone_evaluates():
    clients = {p: FakeClient(p) for p in range(6)}
    records = []
    sampling = SamplingSettings(fraction_train=0.5, min_train_nodes=2)
    strategy = FedBip(initial_adapter=INITIAL, min_nodes=6, sampling=sampling, seed=7, on_round_end=records.append)
    strategy.start(FakeGrid({40 + p: c for p, c in clients.items()}), ArrayRecord(), num_rounds=3)
    for record in records:
        expected = sample_clients(range(6), 3, seed=7, server_round=record["round"], phase="train")
        assert record["sampled"] == {"train": expected, "evaluate": list(range(6))}
        assert record["participants"] == expected and sorted(map(int, record["train"])) == expected
        assert record["failures"] == []  # a client that was not sampled is not missing
        assert sorted(map(int, record["eval"])) == list(range(6))
    for partition_id, client in clients.items():
        trained_in = [r for kind, r, _ in client.received if kind == MessageType.TRAIN]
        assert trained_in == [r["round"] for r in records if partition_id in r["sampled"]["train"]]
        # Between evaluations, a client that did not train keeps its adapter unchanged.
        evaluated = [(r, adapter) for kind, r, adapter in client.received if kind == MessageType.EVALUATE]
        for (_, before), (round_, after) in itertools.pairwise(evaluated):
            if round_ not in trained_in:
                for name in INITIAL:
                    np.testing.assert_array_equal(before[name], after[name])


@pytest.mark.usefixtures("server_identity")
def test_a_resumed_run_draws_the_same_clients(tmp_path):
    sampling = SamplingSettings(fraction_train=0.5, min_train_nodes=2)

    def grid():
        return FakeGrid({50 + p: FakeClient(p) for p in range(6)})

    unbroken = []
    whole = FedBip(initial_adapter=INITIAL, min_nodes=6, sampling=sampling, seed=1, on_round_end=unbroken.append)
    whole.start(grid(), ArrayRecord(), num_rounds=3)
    first = FedBip(initial_adapter=INITIAL, min_nodes=6, sampling=sampling, seed=1)
    first.start(grid(), ArrayRecord(), num_rounds=1)
    resumed_records = []
    resumed = FedBip(
        initial_adapter=INITIAL, min_nodes=6, sampling=sampling, seed=1, on_round_end=resumed_records.append
    )
    for strategy in (first, resumed):
        strategy.store.attach(tmp_path / "store")
    resumed.restore(first.checkpoint())
    resumed.start(grid(), ArrayRecord(), num_rounds=2)
    assert [r["sampled"] for r in resumed_records] == [r["sampled"] for r in unbroken[1:]]
    for partition_id in range(6):
        for name in INITIAL:
            np.testing.assert_array_equal(
                resumed.adapter_for(partition_id)[name], whole.adapter_for(partition_id)[name]
            )


@pytest.mark.usefixtures("server_identity")
def test_a_minimum_above_the_federation_stops_the_first_round_naming_the_key():
    strategy = FedBip(initial_adapter=INITIAL, min_nodes=3, sampling=SamplingSettings(min_train_nodes=5))
    with pytest.raises(
        ConfigError, match="run-config key 'min-train-nodes': value 5 is not allowed; the federation has 3"
    ):
        strategy.start(FakeGrid({60 + p: FakeClient(p) for p in range(3)}), ArrayRecord(), num_rounds=1)


def test_matrices_spread_over_every_client_with_absent_ones_none():
    fields = {"participants": [0, 2], "similarity": [[1.0, 0.5], [0.5, 1.0]], "weights": [[0.6, 0.4], [0.3, 0.7]]}
    spread = over_all_clients(fields, [0, 1, 2])
    assert spread["similarity"] == [[1.0, None, 0.5], [None, None, None], [0.5, None, 1.0]]
    assert spread["weights"] == [[0.6, None, 0.4], [None, None, None], [0.3, None, 0.7]]
    assert spread["participants"] == [0, 2]
    everyone = {"participants": [0, 1], "similarity": [[1.0, 0.2], [0.2, 1.0]]}
    assert over_all_clients(everyone, [0, 1]) == everyone


@pytest.mark.usefixtures("server_identity")
def test_a_sampled_round_records_its_matrices_over_all_clients():
    records = []
    sampling = SamplingSettings(fraction_train=0.5, min_train_nodes=2)
    strategy = FedBip(initial_adapter=INITIAL, min_nodes=6, sampling=sampling, seed=2, on_round_end=records.append)
    strategy.start(FakeGrid({80 + p: FakeClient(p) for p in range(6)}), ArrayRecord(), num_rounds=1)
    (record,) = records
    similarity = record["similarity"]
    assert len(similarity) == 6 and all(len(row) == 6 for row in similarity)
    for i in range(6):
        for j in range(6):
            taking_part = i in record["participants"] and j in record["participants"]
            assert (similarity[i][j] is not None) == taking_part
    assert all(np.isclose(sum(v for v in record["weights"][i] if v is not None), 1.0) for i in record["participants"])
