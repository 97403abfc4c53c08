"""RunRecorder: config.json, results.json after every round, summary and table."""

import json
import mmap
from pathlib import Path

import pytest

from fedbilevel.config import RunConfig, load_app_config
from fedbilevel.resources import process_memory_mb
from fedbilevel.results import RunRecorder, make_run_dir

DEFAULTS = load_app_config(Path(__file__).resolve().parents[1] / "pyproject.toml")


def round_record(number, exact_by_client, with_eval=True):
    scores = {str(p): {"rouge1": em, "rougeL": em / 2, "exact_match": em} for p, em in exact_by_client.items()}
    return {
        "round": number,
        "train": {str(p): {"loss": 1.0} for p in exact_by_client},
        "eval": scores if with_eval else {},
        "failures": [],
        "bytes_down": 10,
        "bytes_up": 5,
        "seconds": 1.0,
        "time_split": {
            "client_train": 0.5,
            "client_evaluate": 0.2,
            "aggregation": 0.1,
            "other": 0.2,
            "other_fraction": 0.2,
        },
    }


@pytest.fixture
def recorder(tmp_path):
    config = RunConfig.from_run_config(DEFAULTS, {"output-dir": str(tmp_path), "run-name": "r"})
    recorder = RunRecorder(config, make_run_dir(config))
    recorder.set_clients(
        {1: {"task": "count", "num-train": 4, "num-test": 2}, 0: {"task": "reverse", "num-train": 4, "num-test": 2}}
    )
    return recorder


def test_results_rewritten_each_round_with_best_round_by_primary_metric(recorder):
    recorder.record_round(round_record(1, {0: 0.2, 1: 0.4}))
    on_disk = json.loads((recorder.run_dir / "results.json").read_text())
    assert on_disk["summary"]["best_round"] == 1
    assert list(on_disk["clients"]) == ["0", "1"]
    recorder.record_round(round_record(2, {0: 0.8, 1: 0.6}))
    recorder.record_round(round_record(3, {0: 0.1, 1: 0.1}, with_eval=False))
    recorder.record_round(round_record(4, {0: 0.5, 1: 0.5}))
    on_disk = json.loads((recorder.run_dir / "results.json").read_text())
    assert [r["round"] for r in on_disk["rounds"]] == [1, 2, 3, 4]
    assert "personalized_mean" not in on_disk["rounds"][2]
    summary = on_disk["summary"]
    assert summary["primary_metric"] == "exact_match"
    assert summary["best_round"] == 2
    assert summary["best_personalized_mean"]["exact_match"] == pytest.approx(0.7)
    assert summary["personalized_mean"] == {"rouge1": 0.5, "rougeL": 0.25, "exact_match": 0.5}
    assert not list(recorder.run_dir.glob("*.tmp"))
    assert summary["time_split"]["client_train"] == pytest.approx(2.0)
    assert summary["time_split"]["other_fraction"] == pytest.approx(0.2)


def test_config_json_and_unique_run_dirs(recorder, tmp_path):
    saved = json.loads((recorder.run_dir / "config.json").read_text())
    assert saved["run_config"]["run-name"] == "r" and saved["seed"] == 0
    again = make_run_dir(recorder.config)
    assert again.name == "r-2" and again != recorder.run_dir


def test_table_marks_clients_without_scores(recorder):
    recorder.record_round(round_record(1, {0: 0.25}))
    table = recorder.table()
    assert "| 0 | reverse | 4 | 2 | 0.250 | 0.125 | 0.250 |" in table
    assert "| 1 | count | 4 | 2 | failed | failed | failed |" in table


def test_relative_output_dir_follows_output_root(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDBILEVEL_OUTPUT_ROOT", str(tmp_path))
    config = RunConfig.from_run_config(DEFAULTS, {"output-dir": "outputs", "run-name": "x"})
    assert make_run_dir(config) == tmp_path / "outputs" / "x"


def test_process_memory_sees_an_allocation_and_rounds_record_it(recorder):
    before = process_memory_mb()
    # A fresh anonymous mapping, every page written: malloc could hand back pages already resident.
    block = mmap.mmap(-1, 64 * 1024 * 1024)
    block.write(b"\1" * len(block))
    during = process_memory_mb()
    assert during["rss-mb"] >= before["rss-mb"] + 60
    assert during["peak-rss-mb"] >= before["rss-mb"] + 50
    block.close()
    recorder.record_round(round_record(1, {0: 0.2, 1: 0.4}))
    on_disk = json.loads((recorder.run_dir / "results.json").read_text())
    assert (
        on_disk["rounds"][0]["server_memory_mb"]["peak-rss-mb"] >= before["rss-mb"] + 50
    )  # the freed block stays in the peak
