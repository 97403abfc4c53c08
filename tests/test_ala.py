"""FedALA's client step: the weight update by hand, which arrays it mixes, and its state."""

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from fedbilevel import protocol
from fedbilevel.client import ala
from fedbilevel.client.ala import (
    adaptive_local_aggregation,
    ala_weight_step,
    remember_local,
    top_arrays,
)
from fedbilevel.client.train import TextCodec
from fedbilevel.data.synthetic import make_client_data
from fedbilevel.models.adapter import build_lora_model, get_adapter_arrays, set_adapter_arrays
from fedbilevel.models.settings import LoraSettings
from fedbilevel.models.zoo import TINY_MODEL, load_tokenizer
from fedbilevel.protocol import AlaSettings


def test_weight_step_by_hand():
    weights = torch.tensor([1.0, 0.5, 0.2])
    gradient = torch.tensor([2.0, -1.0, 0.5])
    delta = torch.tensor([0.1, 0.3, -1.0])
    np.testing.assert_allclose(ala_weight_step(weights, gradient, delta, eta=1.0), [0.8, 0.8, 0.7], rtol=1e-6)
    # Clipped to [0, 1]: 1 − 2 → 0, 0.5 + 3 → 1, 0.2 + 5 → 1.
    np.testing.assert_allclose(ala_weight_step(weights, gradient, delta, eta=10.0), [0.0, 1.0, 1.0])


def test_top_arrays_are_the_highest_blocks_and_arrays_outside_blocks():
    names = [f"model.layers.{k}.q.lora_{x}.weight" for k in range(4) for x in "AB"] + ["classifier.weight"]
    assert top_arrays(names, 1.0) == names
    assert top_arrays(names, 0.5) == names[4:]
    assert top_arrays(names, 0.1) == names[6:]  # ⌈0.4⌉ = 1 block: layer 3, plus the head


def test_settings_travel_in_the_message_config():
    settings = AlaSettings(eta=0.5, data_fraction=0.25, top_fraction=1.0, start_epochs=3)
    assert AlaSettings.from_config(settings.to_config()) == settings
    assert AlaSettings.from_config({"proximal-mu": 0.1}) is None


@pytest.fixture(scope="module")
def tiny():
    model = build_lora_model(TINY_MODEL, LoraSettings(), seed=0)
    train, _ = make_client_data(0, 2, seed=0, num_train=8, num_test=1)
    return model, load_tokenizer(TINY_MODEL), train


def perturbed(adapter, seed, scale=0.05):
    rng = np.random.default_rng(seed)
    return {k: (v + scale * rng.normal(size=v.shape)).astype(np.float32) for k, v in adapter.items()}


def test_adaptive_local_aggregation_mixes_between_local_and_global_and_keeps_state(tiny):
    model, tokenizer, train = tiny
    base = get_adapter_arrays(model)
    local, received = perturbed(base, 1), perturbed(base, 2)
    state = RecordDict()
    settings = AlaSettings(eta=1e4, data_fraction=0.5, top_fraction=0.5, start_epochs=2)

    def run():
        return adaptive_local_aggregation(
            model, TextCodec(tokenizer, 128), train, state, settings, batch_size=2, seed=0
        )

    # First round: no local model yet, the global adapter is used as it is.
    set_adapter_arrays(model, received)
    assert run() == {"ala-epochs": 0}
    assert all(np.array_equal(get_adapter_arrays(model)[k], received[k]) for k in received)

    remember_local(state, local)
    set_adapter_arrays(model, received)
    step = run()
    assert step["ala-epochs"] == 2 and 0.0 <= step["ala-mean-weight"] < 1.0 and np.isfinite(step["ala-loss"])
    mixed = get_adapter_arrays(model)
    top = set(top_arrays(list(mixed), 0.5))
    assert top and all(".layers.1." in name for name in top)  # the tiny model has blocks 0 and 1
    weights = protocol.record_to_adapter(state.array_records[ala.WEIGHTS])
    assert set(weights) == top
    for name in mixed:
        if name in top:  # θ̂ = θ + (Θ − θ) ⊙ W, with W in [0, 1]
            assert weights[name].min() >= 0.0 and weights[name].max() <= 1.0
            np.testing.assert_allclose(
                mixed[name], local[name] + (received[name] - local[name]) * weights[name], atol=1e-6
            )
        else:  # lower blocks take the global adapter
            np.testing.assert_array_equal(mixed[name], received[name])
    assert any(not np.allclose(weights[name], 1.0) for name in top), "W never moved"

    # The same global again (evaluate, then the next train message): θ̂ is reused, not relearned.
    set_adapter_arrays(model, received)
    assert run() == {"ala-epochs": 0}
    assert all(np.array_equal(get_adapter_arrays(model)[k], mixed[k]) for k in mixed)

    # A new global: W carries over and is learned for one epoch.
    set_adapter_arrays(model, perturbed(base, 3))
    assert run()["ala-epochs"] == 1
    assert sum(p.requires_grad for p in model.parameters()) == len(base)  # lower blocks unfrozen again
