"""End to end: Flower's simulation runtime (flwr run), the real ClientApp/ServerApp, the tiny model.

One simulation per strategy (module-scoped) feeds several assertions on what a run leaves
in outputs/<run-name>/: config.json, results.json (the documented contract) and one PEFT
adapter per client. The other end-to-end files (test_simulation_*.py) share tests/simulated.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from peft import PeftModel
from simulated import NUM_CLIENTS, ROUNDS, simulate

from fedbilevel.config import RunConfig
from fedbilevel.models.adapter import get_adapter_arrays, initial_adapter_arrays
from fedbilevel.models.base import load_base_model
from fedbilevel.models.zoo import TINY_MODEL


@pytest.fixture(scope="module", params=["fedbip", "fedbip-l", "fedamp"])
def run(request, tmp_path_factory):
    config, run_dir = simulate(tmp_path_factory.mktemp(request.param), strategy=request.param)
    assert (run_dir / "results.json").exists(), "the simulation wrote no results"
    return config, run_dir


def test_results_json_contract(run):
    config, run_dir = run
    results = json.loads((run_dir / "results.json").read_text())
    assert results["strategy"] == config["strategy"]
    assert results["clients"] == {
        # Every synthetic answer is its own input transformed, so no constant answer is ever right.
        str(p): {
            "task": "reverse" if p < 2 else "uppercase",
            "num_train": 16,
            "num_test": 6,
            "majority_exact_match": 0.0,
            "num_truncated": 0,
        }
        for p in range(NUM_CLIENTS)
    }
    assert [r["round"] for r in results["rounds"]] == list(range(1, ROUNDS + 1))
    for record in results["rounds"]:
        assert set(record["train"]) == set(record["eval"]) == {str(p) for p in range(NUM_CLIENTS)}
        for scores in record["train"].values():
            assert np.isfinite(scores["loss"]) and scores["loss"] > 0
            assert 0 < scores["rss-mb"] <= scores["peak-rss-mb"]  # the client process's memory
        assert 0 < record["server_memory_mb"]["rss-mb"] <= record["server_memory_mb"]["peak-rss-mb"]
        for scores in record["eval"].values():
            for metric in ("rouge1", "rougeL", "exact_match"):
                assert 0.0 <= scores[metric] <= 1.0
        for matrix in ("similarity", "weights"):
            assert np.array(record[matrix]).shape == (NUM_CLIENTS, NUM_CLIENTS)
        np.testing.assert_allclose(np.array(record["weights"]).sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(np.diag(record["similarity"]), 1.0, atol=1e-5)
        assert record["bytes_down"] > 0 and record["bytes_up"] > 0 and record["seconds"] > 0
        assert record["failures"] == []
        split = record["time_split"]
        assert split["client_train"] > 0 and split["client_evaluate"] > 0
        parts = split["client_train"] + split["client_evaluate"] + split["aggregation"] + split["other"]
        assert parts == pytest.approx(record["seconds"], rel=1e-6)
    summary = results["summary"]
    assert summary["best_round"] in range(1, ROUNDS + 1)
    assert summary["personalized_mean"] == results["rounds"][-1]["personalized_mean"]
    last_eval = results["rounds"][-1]["eval"]
    assert summary["personalized_mean"]["rougeL"] == pytest.approx(np.mean([s["rougeL"] for s in last_eval.values()]))


def test_config_json_has_resolved_config_and_seed(run):
    config, run_dir = run
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["run_config"] == RunConfig.from_run_config(config).to_run_config()
    assert saved["seed"] == config["seed"]
    assert saved["versions"]["flwr"] and saved["versions"]["torch"]


def test_same_task_clients_are_most_similar(run):
    _, run_dir = run
    results = json.loads((run_dir / "results.json").read_text())
    similarity = np.array(results["rounds"][-1]["similarity"])
    same = [similarity[0, 1], similarity[2, 3]]
    different = [similarity[i, j] for i in (0, 1) for j in (2, 3)]
    assert min(same) > max(different), similarity


def test_saved_adapters_load_with_peft_and_are_personal(run):
    config, run_dir = run
    cfg = RunConfig.from_run_config(config)
    initial = initial_adapter_arrays(TINY_MODEL, cfg.lora, seed=cfg.seed)
    adapters = []
    for p in range(NUM_CLIENTS):
        model = PeftModel.from_pretrained(load_base_model(TINY_MODEL), run_dir / "clients" / str(p))
        arrays = get_adapter_arrays(model)
        assert list(arrays) == list(initial)
        adapters.append(arrays)
    lora_b = next(name for name in initial if "lora_B" in name)
    assert np.all(initial[lora_b] == 0) and not np.allclose(adapters[0][lora_b], 0)
    # Personalized: no two clients end with the same adapter.
    for i in range(NUM_CLIENTS):
        for j in range(i + 1, NUM_CLIENTS):
            assert not np.allclose(adapters[i][lora_b], adapters[j][lora_b])


def test_eval_global_of_fedavg_equals_its_personalized_score(tmp_path):
    # Under FedAvg every client holds the global adapter, so both scores must agree exactly.
    _, run_dir = simulate(tmp_path, strategy="fedavg", **{"num-server-rounds": 1, "eval-global": True})
    record = json.loads((run_dir / "results.json").read_text())["rounds"][0]
    for scores in record["eval"].values():
        assert scores["global-exact_match"] == scores["exact_match"] and scores["global-rougeL"] == scores["rougeL"]
    assert record["global_mean"] == record["personalized_mean"]
