"""End to end: clients that fail are recorded failures, and the run goes on without them."""

from __future__ import annotations

import json

from simulated import ROOT, flan_without_test_lines_for_client_2, simulate

from fedbilevel.config import load_app_config
from fedbilevel.models.zoo import TINY_MODEL
from fedbilevel.simulation import simulate as run_in_simulation


def test_an_absent_client_of_the_robustness_harness_fails_every_round(tmp_path):
    # The harness needs a ClientApp the app's entry point does not build: flwr run gets a generated app.
    _, run_dir = simulate(tmp_path, harness={"absent_clients": [3]}, **{"num-server-rounds": 1})
    (record,) = json.loads((run_dir / "results.json").read_text())["rounds"]
    assert [(f["phase"], f["partition_id"]) for f in record["failures"]] == [("train", 3)]
    assert "client 3 is absent (test harness --absent-clients): no update in round 1" in record["failures"][0]["reason"]
    assert set(record["train"]) == {"0", "1", "2"}


def test_a_client_that_cannot_load_its_data_is_a_recorded_failure_not_a_silent_absence(tmp_path):
    # Issue input: a flan-json federation whose test.jsonl has no line for client 2's category. The
    # client was left out, the run exited 0 and results.json listed no failure.
    data = flan_without_test_lines_for_client_2(tmp_path / "flan")
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
        # The others load client 2's partition too, to score it: that must not cost them their scores.
        "eval-cross": True,
    }
    run_in_simulation(config, num_supernodes=3)
    results = json.loads((tmp_path / "broken" / "results.json").read_text())
    (record,) = results["rounds"]
    (failure,) = record["failures"]
    assert (failure["phase"], failure["partition_id"]) == ("start", 2)
    assert "no lines with category 'gamma' (the category of client_2.json)" in failure["reason"]
    assert set(record["train"]) == set(record["eval"]) == {"0", "1"}
    cross = record["cross_task"]
    assert cross["tasks"] == ["alpha", "beta"] and cross["items"] == [[1, 1], [1, 1]]
