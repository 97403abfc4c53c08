"""FedSA-LoRA and FFA-LoRA end to end through flwr run: what each client ends with is what its paper shares."""

import json

import numpy as np
import pytest
from peft import PeftModel
from simulated import NUM_CLIENTS, simulate

from fedbilevel.config import RunConfig
from fedbilevel.models.adapter import get_adapter_arrays, initial_adapter_arrays
from fedbilevel.models.base import load_base_model
from fedbilevel.models.zoo import TINY_MODEL
from fedbilevel.strategies.fedsa_lora import is_lora_a


def all_equal(values: list[np.ndarray]) -> bool:
    return all(np.array_equal(values[0], value) for value in values[1:])


@pytest.mark.parametrize("strategy", ["fedsa-lora", "ffa-lora"])
def test_every_client_ends_with_the_shared_factor_and_its_own_or_the_averaged_b(tmp_path, strategy):
    config, run_dir = simulate(tmp_path, strategy=strategy, **{"num-server-rounds": 1})  # one round shows the split
    results = json.loads((run_dir / "results.json").read_text())
    clients = {str(p) for p in range(NUM_CLIENTS)}
    for record in results["rounds"]:
        assert record["failures"] == [] and set(record["train"]) == set(record["eval"]) == clients
    cfg = RunConfig.from_run_config(config)
    initial = initial_adapter_arrays(TINY_MODEL, cfg.lora, seed=cfg.seed)
    adapters = []
    for p in range(NUM_CLIENTS):
        model = PeftModel.from_pretrained(load_base_model(TINY_MODEL), run_dir / "clients" / str(p))
        adapters.append(get_adapter_arrays(model))
    assert all(list(adapter) == list(initial) for adapter in adapters)
    for name, start in initial.items():
        values = [adapter[name] for adapter in adapters]
        if is_lora_a(name):
            assert all_equal(values), f"{name}: A is shared by both"
            # FFA-LoRA freezes A at θ⁰'s; FedSA-LoRA trains and averages it.
            assert np.array_equal(values[0], start) == (strategy == "ffa-lora"), name
        else:
            assert not np.array_equal(values[0], start), f"{name}: B trained"
            # FFA-LoRA averages B into one global B; FedSA-LoRA keeps each client's own.
            assert all_equal(values) == (strategy == "ffa-lora"), name
