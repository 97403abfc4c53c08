"""End to end: Flower's simulation runtime (flwr run), the real ClientApp/ServerApp, the tiny model.

One simulation per strategy (module-scoped) feeds several assertions on what a run leaves
in outputs/<run-name>/: config.json, results.json (the documented contract) and one PEFT
adapter per client.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from peft import PeftModel

from fedbilevel.config import RunConfig, load_app_config
from fedbilevel.models.adapter import get_adapter_arrays, initial_adapter_arrays
from fedbilevel.models.base import load_base_model
from fedbilevel.models.zoo import TINY_MODEL
from fedbilevel.simulation import simulate as run_in_simulation

ROOT = Path(__file__).resolve().parents[1]
NUM_CLIENTS = 4
ROUNDS = 2


def simulate(tmp_path: Path, harness: dict | None = None, **overrides) -> tuple[dict, Path]:
    config = {
        **load_app_config(ROOT / "pyproject.toml"),
        "model-name": TINY_MODEL,
        "precision": "fp32",
        "num-server-rounds": ROUNDS,
        "synthetic-tasks": "reverse,uppercase",  # clients 0,1 reverse; 2,3 uppercase
        "synthetic-train-examples": 16,
        "synthetic-test-examples": 6,
        "local-steps": 4,
        "learning-rate": 0.01,
        "eval-max-new-tokens": 6,
        "output-dir": str(tmp_path),
        "run-name": "e2e",
        **overrides,
    }
    run_in_simulation(config, num_supernodes=NUM_CLIENTS, **(harness or {}))
    return config, tmp_path / "e2e"


# The tests of one simulated run share it: under pytest-xdist (make test) they go to one worker.
ONE_WORKER = pytest.mark.xdist_group("simulated-runs")


@pytest.fixture(scope="module", params=["fedbip", "fedbip-l", "fedamp"])
def run(request, tmp_path_factory):
    config, run_dir = simulate(tmp_path_factory.mktemp(request.param), strategy=request.param)
    assert (run_dir / "results.json").exists(), "the simulation wrote no results"
    return config, run_dir


@ONE_WORKER
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


@ONE_WORKER
def test_config_json_has_resolved_config_and_seed(run):
    config, run_dir = run
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["run_config"] == RunConfig.from_run_config(config).to_run_config()
    assert saved["seed"] == config["seed"]
    assert saved["versions"]["flwr"] and saved["versions"]["torch"]


@ONE_WORKER
def test_same_task_clients_are_most_similar(run):
    _, run_dir = run
    results = json.loads((run_dir / "results.json").read_text())
    similarity = np.array(results["rounds"][-1]["similarity"])
    same = [similarity[0, 1], similarity[2, 3]]
    different = [similarity[i, j] for i in (0, 1) for j in (2, 3)]
    assert min(same) > max(different), similarity


@ONE_WORKER
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


def test_fedala_keeps_client_state_across_rounds(tmp_path):
    # Evaluation only after the last round, so round 2's train message brings the first
    # global model that meets a local one: the client must have kept round 1's adapter.
    _, run_dir = simulate(tmp_path, strategy="fedala", **{"eval-every": 0, "fedala-start-epochs": 2})
    results = json.loads((run_dir / "results.json").read_text())
    first, second = results["rounds"]
    assert {scores["ala-epochs"] for scores in first["train"].values()} == {0.0}  # nothing local yet
    assert {scores["ala-epochs"] for scores in second["train"].values()} == {2.0}  # the start phase
    assert all(0.0 <= scores["ala-mean-weight"] <= 1.0 for scores in second["train"].values())
    assert set(second["eval"]) == {str(p) for p in range(NUM_CLIENTS)} and first["eval"] == {}
    # The evaluate message brings the new global model: W is learned again, for one epoch.
    assert {scores["ala-epochs"] for scores in second["eval"].values()} == {1.0}


def test_an_absent_client_of_the_robustness_harness_fails_every_round(tmp_path):
    # The harness needs a ClientApp the app's entry point does not build: flwr run gets a generated app.
    _, run_dir = simulate(tmp_path, harness={"absent_clients": [3]}, **{"num-server-rounds": 1})
    (record,) = json.loads((run_dir / "results.json").read_text())["rounds"]
    assert [(f["phase"], f["partition_id"]) for f in record["failures"]] == [("train", 3)]
    assert "client 3 is absent (test harness --absent-clients): no update in round 1" in record["failures"][0]["reason"]
    assert set(record["train"]) == {"0", "1", "2"}


def test_a_run_resumed_from_its_checkpoint_matches_an_unbroken_run(tmp_path):
    # "Killed after round 2": a 2-round run leaves the same checkpoint a crash in round 3 would.
    _, unbroken = simulate(tmp_path / "unbroken", strategy="fedbip", **{"num-server-rounds": 3})
    _, broken = simulate(tmp_path / "broken", strategy="fedbip", **{"num-server-rounds": 2})
    simulate(tmp_path / "broken", strategy="fedbip", **{"num-server-rounds": 3, "resume-from": str(broken)})
    expected = json.loads((unbroken / "results.json").read_text())
    resumed = json.loads((broken / "results.json").read_text())
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    for mine, theirs in zip(resumed["rounds"], expected["rounds"]):
        assert {p: t["loss"] for p, t in mine["train"].items()} == {p: t["loss"] for p, t in theirs["train"].items()}

        def scores(record):
            return {p: {m: s[m] for m in ("rouge1", "rougeL", "exact_match")} for p, s in record["eval"].items()}

        assert scores(mine) == scores(theirs) and mine["weights"] == theirs["weights"]
    config = json.loads((broken / "config.json").read_text())
    assert config["run_config"]["num-server-rounds"] == 3 and [r["after_round"] for r in config["resumes"]] == [2]
    for p in range(NUM_CLIENTS):
        for name in ("adapter_model.safetensors",):
            assert (broken / "clients" / str(p) / name).read_bytes() == (
                unbroken / "clients" / str(p) / name
            ).read_bytes()
    # Changing what the run computes is refused, with the key named.
    with pytest.raises(
        Exception, match=r"run-config key 'learning-rate': value 0\.5 differs from the resumed run's 0\.01"
    ):
        simulate(
            tmp_path / "broken",
            strategy="fedbip",
            **{"num-server-rounds": 4, "resume-from": str(broken), "learning-rate": 0.5},
        )


FLAN8 = ROOT.parent / "shared" / "data" / "flan8"


@pytest.mark.skipif(not FLAN8.is_dir(), reason=f"{FLAN8} (the shared Flan-8 federation) is not present")
def test_flan_json_federation_end_to_end(tmp_path):
    config = {
        **load_app_config(ROOT / "pyproject.toml"),
        "model-name": TINY_MODEL,
        "data": "flan-json",
        "data-path": str(FLAN8),
        "max-train-examples": 4,
        "max-test-examples": 2,
        "max-seq-len": 1024,
        "local-steps": 1,
        "batch-size": 2,
        "num-server-rounds": 1,
        "eval-max-new-tokens": 4,
        "output-dir": str(tmp_path),
        "run-name": "flan",
    }
    run_in_simulation(config, num_supernodes=8)
    results = json.loads((tmp_path / "flan" / "results.json").read_text())
    assert {k: results["clients"]["0"][k] for k in ("task", "num_train", "num_test")} == {
        "task": "coreference",
        "num_train": 4,
        "num_test": 2,
    }
    assert all(0.0 <= c["majority_exact_match"] <= 1.0 for c in results["clients"].values())
    assert results["clients"]["7"]["task"] == "word_disambiguation"
    record = results["rounds"][0]
    assert set(record["eval"]) == {str(p) for p in range(8)} and record["failures"] == []
    # Option-likelihood scoring where the instructions list options (all but text_formatting, structure_to_text).
    assert record["eval"]["0"]["option_items"] == 2 and 0.0 <= record["eval"]["0"]["option_accuracy"] <= 1.0
    assert "option_items" not in record["eval"]["6"]
    assert len(record["eval_items"]["0"]["exact_match"]) == 2 and len(record["eval_items"]["0"]["option_correct"]) == 2
    assert np.mean(record["eval_items"]["3"]["rouge1"]) == pytest.approx(record["eval"]["3"]["rouge1"])


def test_eval_global_of_fedavg_equals_its_personalized_score(tmp_path):
    # Under FedAvg every client holds the global adapter, so both scores must agree exactly.
    _, run_dir = simulate(tmp_path, strategy="fedavg", **{"num-server-rounds": 1, "eval-global": True})
    record = json.loads((run_dir / "results.json").read_text())["rounds"][0]
    for scores in record["eval"].values():
        assert scores["global-exact_match"] == scores["exact_match"] and scores["global-rougeL"] == scores["rougeL"]
    assert record["global_mean"] == record["personalized_mean"]


def test_a_client_that_cannot_load_its_data_is_a_recorded_failure_not_a_silent_absence(tmp_path):
    # Issue input: a flan-json federation whose test.jsonl has no line for client 2's category. The
    # client was left out, the run exited 0 and results.json listed no failure.
    data = tmp_path / "flan"
    data.mkdir()
    for k, category in enumerate(["alpha", "beta", "gamma"]):
        records = [
            {"instruction": f"Say {category} {i}", "output": category, "task": "t", "category": category}
            for i in range(4)
        ]
        (data / f"client_{k}.json").write_text(json.dumps(records))
    lines = [{"instruction": f"Say {c}", "output": c, "task": "t", "category": c} for c in ("alpha", "beta")]
    (data / "test.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    config = {
        **load_app_config(ROOT / "pyproject.toml"),
        "model-name": TINY_MODEL,
        "data": "flan-json",
        "data-path": str(data),
        "num-server-rounds": 1,
        "local-steps": 1,
        "eval-max-new-tokens": 2,
        "min-nodes": 3,
        "output-dir": str(tmp_path),
        "run-name": "broken",
    }
    run_in_simulation(config, num_supernodes=3)
    results = json.loads((tmp_path / "broken" / "results.json").read_text())
    (failure,) = results["rounds"][0]["failures"]
    assert (failure["phase"], failure["partition_id"]) == ("start", 2)
    assert "no lines with category 'gamma' (the category of client_2.json)" in failure["reason"]
    assert set(results["rounds"][0]["train"]) == {"0", "1"}
