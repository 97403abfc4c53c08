"""End to end: the Flan-8 federation, and FedALA's client state across rounds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from simulated import FLAN8, NUM_CLIENTS, ROOT, simulate

from fedbilevel.config import load_app_config
from fedbilevel.models.zoo import TINY_MODEL
from fedbilevel.simulation import simulate as run_in_simulation


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
