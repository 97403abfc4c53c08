"""FFA-LoRA end to end through flwr run: every client ends with θ⁰'s A and one averaged, trained B.

FFA-LoRA is the LoRA baseline whose clients act differently (they freeze A), so it gets the run; FedSA-LoRA's
clients train as FedAvg's do and its split is checked by hand in test_fedsa_lora.py (one simulation costs
about a minute of the suite).
"""

import json

import numpy as np
from peft import PeftModel
from simulated import NUM_CLIENTS, simulate

from fedbilevel.config import RunConfig
from fedbilevel.models.adapter import get_adapter_arrays, initial_adapter_arrays
from fedbilevel.models.base import load_base_model
from fedbilevel.models.zoo import TINY_MODEL
from fedbilevel.strategies.fedsa_lora import is_lora_a


def test_every_client_ends_with_the_initial_a_and_the_same_trained_b(tmp_path):
    config, run_dir = simulate(tmp_path, strategy="ffa-lora", **{"num-server-rounds": 1})  # one round shows it
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
        assert all(np.array_equal(values[0], value) for value in values[1:]), f"{name}: one adapter for all"
        # A stays θ⁰'s (frozen on every client, kept by the server); B trains and is averaged.
        assert np.array_equal(values[0], start) == is_lora_a(name), name
