"""FedBip with absent clients: `keep` weighs the round's clients among themselves, `remember` also weighs
the absent clients' last task vectors, discounted by their age (hand-computed cases)."""

import numpy as np
import pytest
from flwr.app import ArrayRecord

from fedbilevel.aggregation import FedBipSettings
from fedbilevel.checkpoint import STORE, load_checkpoint, save_checkpoint
from fedbilevel.options import ConfigError
from fedbilevel.strategies.fedbip import FedBip
from fedbilevel.strategies.sampling import SamplingSettings
from fedbilevel.testing import INITIAL, FakeClient, FakeGrid

ZERO = {"w": np.zeros(2, np.float32)}
# Round 1: everyone trains; client 2's task vector [1, 1] is what `remember` keeps of it.
ROUND_1 = {0: [1.0, 0.0], 1: [0.0, 1.0], 2: [1.0, 1.0]}
# Round 2: clients 0 and 1 train, 2 is absent (its task vector is 1 round old).
ROUND_2 = {0: [1.0, 0.0], 1: [0.0, 2.0]}


def two_rounds(**settings):
    strategy = FedBip(initial_adapter=ZERO, settings=FedBipSettings(**settings))
    strategy.clients = {p: {} for p in range(3)}
    rounds = []
    for server_round, updates in enumerate((ROUND_1, ROUND_2), start=1):
        before = {p: strategy.adapter_for(p)["w"].copy() for p in range(3)}
        trained = {p: {"w": (before[p] + np.float32(u)).astype(np.float32)} for p, u in updates.items()}
        fields = strategy.personalize(server_round, trained, dict.fromkeys(trained, 10))
        rounds.append(({p: strategy.adapter_for(p)["w"] - before[p] for p in range(3)}, fields))
    return strategy, rounds


def test_keep_weighs_the_rounds_clients_among_themselves_and_leaves_absent_ones_unchanged():
    _, (_, (change, fields)) = two_rounds(absent_rule="keep")
    # cos([1,0], [0,2]) = 0: each client keeps its own update.
    np.testing.assert_allclose(change[0], [1, 0], atol=1e-6)
    np.testing.assert_allclose(change[1], [0, 2], atol=1e-6)
    np.testing.assert_array_equal(change[2], [0, 0])
    assert fields["participants"] == [0, 1] and "remembered" not in fields


def test_remember_weighs_the_absent_clients_last_task_vector_discounted_by_its_age():
    _, (_, (change, fields)) = two_rounds(absent_rule="remember", staleness_decay=0.5)
    # Columns 0, 1, 2 (2 remembered, age 1): cos(τ0, τ2) = cos(τ1, τ2) = 1/√2, cos(τ0, τ1) = 0.
    # Row 0: S = [1, 0, 0.70711] · d = [1, 1, 0.5] -> [1, 0, 0.35355] / 1.35355;
    #   Δθ̄0 = ([1, 0] + 0.35355 · [1, 1]) / 1.35355 = [1, 0.26120].
    # Row 1: S = [0, 1, 0.70711] · d -> [0, 1, 0.35355] / 1.35355;
    #   Δθ̄1 = ([0, 2] + 0.35355 · [1, 1]) / 1.35355 = [0.26120, 1.73880].
    np.testing.assert_allclose(change[0], [1, 0.26120], atol=1e-5)
    np.testing.assert_allclose(change[1], [0.26120, 1.73880], atol=1e-5)
    np.testing.assert_array_equal(change[2], [0, 0])  # an absent client's adapter never changes
    assert fields["remembered"] == {"2": 1} and fields["columns"] == [0, 1, 2]
    np.testing.assert_allclose(fields["weights"], [[0.738796, 0, 0.261204], [0, 0.738796, 0.261204]], atol=1e-6)


def test_remember_without_decay_is_mifas_undiscounted_memory_and_decay_zero_is_keep():
    _, (_, (change, _)) = two_rounds(absent_rule="remember", staleness_decay=1.0)
    # Row 0: [1, 0, 0.70711] / 1.70711; Δθ̄0 = [1.70711, 0.70711] / 1.70711 = [1, 0.41421].
    np.testing.assert_allclose(change[0], [1, 0.41421], atol=1e-5)
    _, (_, (zero, _)) = two_rounds(absent_rule="remember", staleness_decay=0.0)
    _, (_, (keep, _)) = two_rounds(absent_rule="keep")
    for p in range(3):
        np.testing.assert_allclose(zero[p], keep[p], atol=1e-7)


def test_a_task_vector_older_than_max_staleness_is_forgotten():
    strategy, _ = two_rounds(absent_rule="remember", max_staleness=1)
    trained = {p: {"w": strategy.adapter_for(p)["w"] + np.float32(1)} for p in (0, 1)}
    fields = strategy.personalize(3, trained, {0: 10, 1: 10})  # client 2 is now 2 rounds old
    assert "remembered" not in fields and 2 not in strategy._memory and list(strategy._memory) == [0, 1]


def test_bad_staleness_values_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"run-config key 'staleness-decay': value 1\.5 is not allowed"):
        FedBipSettings(staleness_decay=1.5)
    with pytest.raises(ConfigError, match=r"run-config key 'max-staleness': value 0 is not allowed"):
        FedBipSettings(max_staleness=0)
    with pytest.raises(ConfigError, match=r"run-config key 'absent-client-rule': value 'drop' is not allowed"):
        FedBipSettings(absent_rule="drop")


@pytest.mark.usefixtures("server_identity")
def test_remember_over_sampled_rounds_records_ages_and_resumes_to_the_same_state(tmp_path):
    sampling = SamplingSettings(fraction_train=0.5, min_train_nodes=2)
    settings = FedBipSettings(absent_rule="remember", similarity_ema=0.5)

    def make(records):
        return FedBip(
            initial_adapter=INITIAL,
            settings=settings,
            min_nodes=6,
            sampling=sampling,
            seed=2,
            on_round_end=records.append,
        )

    def grid():
        return FakeGrid({10 + p: FakeClient(p) for p in range(6)})

    unbroken_records = []
    unbroken = make(unbroken_records)
    unbroken.start(grid(), ArrayRecord(), num_rounds=4)
    later = [r for r in unbroken_records if "remembered" in r]
    assert later, "no round remembered an absent client"
    for record in later:
        for partition in map(int, record["remembered"]):
            row = record["weights"][partition]
            assert all(value is None for value in row)  # it did not take part: no row of weights
            assert all(record["weights"][p][partition] is not None for p in record["participants"])  # but a column

    first = make([])
    first.store.attach(tmp_path / STORE)
    first.start(grid(), ArrayRecord(), num_rounds=2)
    save_checkpoint(tmp_path, first.checkpoint())
    resumed_records = []
    resumed = make(resumed_records)
    resumed.store.attach(tmp_path / STORE)
    resumed.restore(load_checkpoint(tmp_path))
    resumed.start(grid(), ArrayRecord(), num_rounds=2)
    assert [r["weights"] for r in resumed_records] == [r["weights"] for r in unbroken_records[2:]]
    for p in range(6):
        for name in INITIAL:
            np.testing.assert_array_equal(resumed.adapter_for(p)[name], unbroken.adapter_for(p)[name])
