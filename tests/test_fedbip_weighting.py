"""FedBip with the weighting options (issue 7): hand-computed aggregation, EMA across rounds, config."""

import math
import re

import numpy as np
import pytest
from flwr.app import ArrayRecord

from fedbilevel.aggregation import FedBipSettings, cosine_similarity_matrix, fedbip_aggregate_detailed
from fedbilevel.config import ConfigError, RunConfig, load_app_config
from fedbilevel.strategies.fedbip import FedBip
from fedbilevel.testing import INITIAL, FakeClient, FakeGrid, update_of
from fedbilevel.weighting import Weighting

R2 = math.sqrt(2.0)


def adapters(*rows):
    return [{"w": np.asarray(r, dtype=np.float32)} for r in rows]


def test_softmax_weighting_by_hand():
    start = adapters([0, 0], [0, 0], [0, 0])
    trained = adapters([1, 0], [1, 1], [0, 1])  # cosines: 1/√2 between neighbours, 0 between 0 and 2
    result = fedbip_aggregate_detailed(start, trained, weighting=Weighting(rule="softmax", temperature=0.5))
    # Row 0: exp([1, 1/√2, 0] / 0.5) normalised.
    logits = np.exp(np.array([1, 1 / R2, 0]) / 0.5)
    p = logits / logits.sum()
    np.testing.assert_allclose(result.weights[0], p, rtol=1e-6)
    np.testing.assert_allclose(
        result.adapters[0]["w"], p[0] * np.array([1, 0]) + p[1] * np.array([1, 1]) + p[2] * np.array([0, 1]), rtol=1e-6
    )


def test_centering_removes_the_common_direction_by_hand():
    # τ = common + specific: [5, 1, 0], [5, -1, 0], [5, 0, 1]; the mean is [5, 0, 1/3].
    start = adapters([0, 0, 0], [0, 0, 0], [0, 0, 0])
    trained = adapters([5, 1, 0], [5, -1, 0], [5, 0, 1])
    plain = fedbip_aggregate_detailed(start, trained)
    assert plain.similarity[0, 1] > 0.9  # the common direction hides that 0 and 1 disagree
    centred = fedbip_aggregate_detailed(start, trained, weighting=Weighting(centering="mean"))
    c = np.array([[0, 1, -1 / 3], [0, -1, -1 / 3], [0, 0, 2 / 3]])
    np.testing.assert_allclose(centred.similarity, cosine_similarity_matrix(c), atol=1e-6)
    # cos(c0, c1) = (-1 + 1/9) / (1 + 1/9) = -0.8, clipped to 0: client 0 no longer takes client 1's update.
    assert centred.similarity[0, 1] == pytest.approx(-0.8, abs=1e-6)
    assert centred.weights[0, 1] == 0.0


def test_self_weight_floor_in_aggregation():
    start = adapters([0, 0], [0, 0])
    trained = adapters([1, 0], [1, 0])  # identical updates: paper weights 1/2 each
    result = fedbip_aggregate_detailed(start, trained, weighting=Weighting(self_floor=0.8))
    np.testing.assert_allclose(result.weights, [[0.8, 0.2], [0.2, 0.8]])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"self_floor": -0.1}, "'self-weight-floor': value -0.1 is not allowed; expected a number in [0.0, 1.0]"),
        ({"self_floor": 1.5}, "'self-weight-floor': value 1.5 is not allowed"),
        (
            {"rule": "softmax", "temperature": 0.0},
            "'weighting-temperature': value 0.0 is not allowed; expected a number in (0.0",
        ),
        (
            {"top_k": 0},
            "'weighting-top-k': value 0 is not allowed; expected an integer ≥ 1",
        ),  # checked whatever the rule
    ],
)
def test_a_bad_weighting_option_fails_when_built(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Weighting(**options)


def test_negative_keep_is_only_allowed_with_the_paper_rule():
    with pytest.raises(ConfigError, match="'negative-cosine': value 'keep' is not allowed; with weighting='softmax'"):
        Weighting(rule="softmax", negative="keep")
    with pytest.raises(ValueError, match="not allowed together with weighting"):
        fedbip_aggregate_detailed(adapters([0]), adapters([1]), negative="keep", weighting=Weighting())
    config = {**load_app_config(), "negative-cosine": "keep", "weighting": "softmax"}
    with pytest.raises(
        ConfigError, match="run-config key 'negative-cosine': value 'keep' is not allowed; with weighting='softmax'"
    ):
        RunConfig.from_run_config(config)
    with pytest.raises(
        ConfigError, match="run-config key 'weighting': value 'sharpest' is not allowed; choose one of paper, softmax"
    ):
        RunConfig.from_run_config({**load_app_config(), "weighting": "sharpest"})


@pytest.mark.usefixtures("server_identity")
def test_similarity_ema_smooths_each_pair_across_rounds():
    clients = {p: FakeClient(p) for p in range(3)}
    records = []
    settings = FedBipSettings(similarity_ema=0.25)
    strategy = FedBip(initial_adapter=INITIAL, min_nodes=3, settings=settings, on_round_end=records.append)
    strategy.start(FakeGrid({70 + p: c for p, c in clients.items()}), ArrayRecord(), num_rounds=2)

    def raw(server_round):  # the fakes' task vectors are update_of(p, round)
        flat = [np.concatenate([update_of(p, server_round)[k].ravel() for k in INITIAL]) for p in range(3)]
        return cosine_similarity_matrix(np.array(flat, dtype=np.float64))

    np.testing.assert_allclose(records[0]["similarity"], raw(1), atol=1e-5)
    np.testing.assert_allclose(records[1]["similarity"], 0.25 * raw(1) + 0.75 * raw(2), atol=1e-5)
    with pytest.raises(ConfigError, match=r"'similarity-ema': value 1\.0 is not allowed"):
        FedBipSettings(similarity_ema=1.0)


def test_the_default_weighting_is_the_papers_rule():
    assert Weighting().is_paper and Weighting().negative == "clip"
    assert RunConfig.from_run_config(load_app_config()).fedbip.weighting == Weighting()


@pytest.mark.parametrize(("name", "layerwise"), [("fedbip-plus", False), ("fedbip-plus-l", True)])
def test_a_preset_sets_its_weighting_and_runs_fedbip(name, layerwise):
    from fedbilevel.strategies import FEDBIP_PRESETS, build_strategy

    base, preset = FEDBIP_PRESETS[name]
    assert base == ("fedbip-l" if layerwise else "fedbip")
    config = RunConfig.from_run_config({**load_app_config(), "strategy": name})
    resolved = config.to_run_config()
    assert {key: resolved[key] for key in preset} == preset and resolved["strategy"] == name
    assert RunConfig.from_run_config(resolved) == config  # config.json reloads to the same run
    strategy = build_strategy(config, initial_adapter=INITIAL)
    assert isinstance(strategy, FedBip) and strategy.layerwise is layerwise
    assert strategy.settings.weighting.rule == resolved["weighting"] and not strategy.settings.weighting.is_paper


def test_a_preset_refuses_a_weighting_key_set_otherwise_and_accepts_its_own_value():
    from fedbilevel.strategies import FEDBIP_PRESETS

    _, preset = FEDBIP_PRESETS["fedbip-plus"]
    key, value = next(iter(preset.items()))
    RunConfig.from_run_config({**load_app_config(), "strategy": "fedbip-plus", key: value})
    other = "softmax" if value != "softmax" else "power"
    with pytest.raises(
        ConfigError,
        match=re.escape(
            f"run-config key '{key}': value {other!r} is not allowed with strategy='fedbip-plus', "
            f"which sets {key}={value!r}; use strategy='fedbip' to choose the weighting yourself"
        ),
    ):
        RunConfig.from_run_config({**load_app_config(), "strategy": "fedbip-plus", key: other})
