"""A resumed run must be the same experiment: anything earlier rounds depend on that changed is refused."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord

from fedbilevel.data.types import ClientData, Example, ImageExample, data_digest
from fedbilevel.options import ConfigError
from fedbilevel.protocol import adapter_digest
from fedbilevel.results import package_versions
from fedbilevel.server import check_same_experiment
from fedbilevel.strategies.fedbip import FedBip
from fedbilevel.testing import INITIAL, FakeClient, FakeGrid


@pytest.mark.usefixtures("server_identity")
def test_a_client_whose_data_changed_since_the_checkpoint_is_refused_naming_it(tmp_path):
    first = FedBip(initial_adapter=INITIAL, min_nodes=2)
    first.start(FakeGrid({1: FakeClient(0, data_digest="aa"), 2: FakeClient(1, data_digest="bb")}), ArrayRecord(), 1)
    resumed = FedBip(initial_adapter=INITIAL, min_nodes=2)
    for strategy in (first, resumed):
        strategy.store.attach(tmp_path)
    resumed.restore(first.checkpoint())
    changed = FakeGrid({3: FakeClient(0, data_digest="aa"), 4: FakeClient(1, data_digest="cc")})
    with pytest.raises(ConfigError, match=r"client 1 \(node 4\): its data \(digest cc\) differs .* used \(bb\)"):
        resumed.start(changed, ArrayRecord(), 1)


def _saved_run(versions=None, experiment=None):
    """What config.json holds of the resumed run."""
    return {"versions": versions or package_versions(), "experiment": experiment or {"model": "m1"}}


def test_a_changed_package_version_or_model_is_refused_naming_it():
    check_same_experiment(_saved_run(), {"model": "m1"})  # the same: accepted
    with pytest.raises(ConfigError, match=r"package 'torch': version .* differs from the resumed run's 0\.0"):
        check_same_experiment(_saved_run(versions={**package_versions(), "torch": "0.0"}), {"model": "m1"})
    with pytest.raises(ConfigError, match="model: digest m2 differs from the resumed run's m1"):
        check_same_experiment(_saved_run(), {"model": "m2"})
    with pytest.raises(ConfigError, match="initial adapter: digest b differs from the resumed run's a"):
        check_same_experiment(_saved_run(experiment={"initial_adapter": "a"}), {"initial_adapter": "b"})


def test_digests_see_every_value_and_name():
    text = ClientData("t", [Example("i", "o", "t")], [Example("j", "p", "t")])
    assert data_digest(text) == data_digest(ClientData("t", [Example("i", "o", "t")], [Example("j", "p", "t")]))
    assert data_digest(text) != data_digest(ClientData("t", [Example("i", "o2", "t")], [Example("j", "p", "t")]))
    assert data_digest(text) != data_digest(ClientData("t", [], [Example("i", "o", "t"), Example("j", "p", "t")]))
    pixels = np.zeros((1, 2, 2), np.float32)
    image = ClientData("d", [ImageExample(pixels, 1, "d")], [])
    assert data_digest(image) != data_digest(ClientData("d", [ImageExample(pixels + 1, 1, "d")], []))
    assert adapter_digest(INITIAL) != adapter_digest({**INITIAL, "b": INITIAL["b"] + 1})
    assert adapter_digest(INITIAL) != adapter_digest({"c" if k == "a" else k: v for k, v in INITIAL.items()})
