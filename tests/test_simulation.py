"""End to end: Flower's simulation runtime (flwr run), the real ClientApp/ServerApp, the tiny model.

One simulation per strategy (module-scoped) feeds several assertions on what a run leaves
in outputs/<run-name>/: config.json, results.json (the documented contract) and one PEFT
adapter per client. FedBip's run also scores cross-task (eval-cross) and is the unbroken run a
resumed one must match, so the suite pays for one simulation, not three. The other end-to-end
files (test_simulation_*.py) share tests/simulated.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from peft import PeftModel
from simulated import NUM_CLIENTS, ROUNDS, simulate

from fedbilevel import protocol
from fedbilevel.comparison import load_run, markdown
from fedbilevel.config import RunConfig
from fedbilevel.models.adapter import get_adapter_arrays, initial_adapter_arrays
from fedbilevel.models.base import load_base_model
from fedbilevel.models.zoo import TINY_MODEL
from fedbilevel.server import _resume_point

# Cross-task scoring runs in the final round only and changes nothing a round trains or reports.
CROSS = {"eval-cross": True}


@pytest.fixture(scope="module")
def fedbip_run(tmp_path_factory):
    config, run_dir = simulate(tmp_path_factory.mktemp("fedbip"), strategy="fedbip", **CROSS)
    assert (run_dir / "results.json").exists(), "the simulation wrote no results"
    return config, run_dir


@pytest.fixture(scope="module", params=["fedbip", "fedbip-l", "fedamp"])
def run(request, tmp_path_factory):
    if request.param == "fedbip":
        return request.getfixturevalue("fedbip_run")
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


def test_eval_cross_records_the_matrix_and_draws_its_heatmap(fedbip_run):
    _, run_dir = fedbip_run
    results = json.loads((run_dir / "results.json").read_text())
    first, final = results["rounds"]
    assert "cross_task" not in first and final["failures"] == []
    cross = final["cross_task"]
    assert cross["tasks"] == ["reverse", "uppercase"] and cross["clients"] == list(range(NUM_CLIENTS))
    for metric in protocol.TEXT_METRICS:
        assert np.array(cross["scores"][metric]).shape == (NUM_CLIENTS, 2)
    for row, (client, task) in enumerate(zip(cross["clients"], cross["client_tasks"])):
        own = cross["tasks"].index(task)
        for metric in protocol.TEXT_METRICS:  # the own-task entry is the client's ordinary final score
            assert cross["scores"][metric][row][own] == final["eval"][str(client)][metric]
        # Own task: its own 6 items; the other task: both of its clients' 6 items.
        assert cross["items"][row] == ([6, 12] if own == 0 else [12, 6])
    assert (run_dir / "cross_task.png").stat().st_size > 0
    # The comparison of this run shows the means.
    assert "Cross-task evaluation (eval-cross)" in markdown([load_run(run_dir)])


def test_a_run_resumed_from_its_checkpoint_matches_an_unbroken_run(fedbip_run, tmp_path):
    # "Killed after round 1": a 1-round run leaves the same checkpoint a crash in round 2 would.
    _, unbroken = fedbip_run
    _, broken = simulate(tmp_path / "broken", strategy="fedbip", **CROSS, **{"num-server-rounds": 1})
    simulate(
        tmp_path / "broken", strategy="fedbip", **CROSS, **{"num-server-rounds": ROUNDS, "resume-from": str(broken)}
    )
    expected = json.loads((unbroken / "results.json").read_text())
    resumed = json.loads((broken / "results.json").read_text())
    assert [r["round"] for r in resumed["rounds"]] == list(range(1, ROUNDS + 1))
    for mine, theirs in zip(resumed["rounds"], expected["rounds"]):
        assert {p: t["loss"] for p, t in mine["train"].items()} == {p: t["loss"] for p, t in theirs["train"].items()}

        def scores(record):
            return {p: {m: s[m] for m in ("rouge1", "rougeL", "exact_match")} for p, s in record["eval"].items()}

        assert scores(mine) == scores(theirs) and mine["weights"] == theirs["weights"]
    assert resumed["rounds"][-1]["cross_task"]["scores"] == expected["rounds"][-1]["cross_task"]["scores"]
    config = json.loads((broken / "config.json").read_text())
    assert config["run_config"]["num-server-rounds"] == ROUNDS and [r["after_round"] for r in config["resumes"]] == [1]
    for p in range(NUM_CLIENTS):
        name = "adapter_model.safetensors"
        assert (broken / "clients" / str(p) / name).read_bytes() == (unbroken / "clients" / str(p) / name).read_bytes()
    # Changing what the run computes is refused, with the key named (the check a resumed ServerApp makes first).
    changed = {
        **config["run_config"],
        "learning-rate": 0.5,
        "num-server-rounds": ROUNDS + 1,
        "resume-from": str(broken),
    }
    with pytest.raises(
        Exception, match=r"run-config key 'learning-rate': value 0\.5 differs from the resumed run's 0\.01"
    ):
        _resume_point(RunConfig.from_run_config(changed))
    # A run saved before a key existed ran as that key's default: resuming at the default is allowed,
    # another value is refused and says why.
    record = json.loads((broken / "config.json").read_text())
    del record["run_config"]["similarity-ema"]
    (broken / "config.json").write_text(json.dumps(record))
    same = {**record["run_config"], "similarity-ema": 0.0, "num-server-rounds": ROUNDS + 1, "resume-from": str(broken)}
    assert _resume_point(RunConfig.from_run_config(same))[1]["round"] == ROUNDS  # resumed to ROUNDS above
    with pytest.raises(Exception, match=r"'similarity-ema': value 0.5 differs .* 0.0 \(its default: the run predates"):
        _resume_point(RunConfig.from_run_config({**same, "similarity-ema": 0.5}))
