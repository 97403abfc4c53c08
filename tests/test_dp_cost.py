"""scripts/dp_cost.py: its table from made-up timings, and one short real run of the three modes."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "dp_cost.py"


@pytest.fixture(scope="module")
def dp_cost():
    spec = importlib.util.spec_from_file_location("dp_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_repeat_rotates_the_order_of_the_modes(dp_cost):
    modes = ("none", "dp-sgd", "update")
    assert [dp_cost.rotated(modes, repeat) for repeat in range(4)] == [
        ["none", "dp-sgd", "update"],
        ["dp-sgd", "update", "none"],
        ["update", "none", "dp-sgd"],
        ["none", "dp-sgd", "update"],
    ]


def test_ratios_are_the_median_of_per_repeat_ratios_not_a_ratio_of_medians(dp_cost):
    # The machine slows down in repeat 2: each mode's ratio to none in its own repeat stays 2 and 1.
    repeats = [
        {
            "dp-sgd": {"seconds": 2.0, "examples": 70},
            "none": {"seconds": 1.0, "examples": 80},
            "update": {"seconds": 1.0},
        },
        {
            "none": {"seconds": 4.0, "examples": 80},
            "dp-sgd": {"seconds": 8.0, "examples": 90},
            "update": {"seconds": 4.4},
        },
        {
            "none": {"seconds": 1.5, "examples": 80},
            "dp-sgd": {"seconds": 3.0, "examples": 80},
            "update": {"seconds": 1.2},
        },
    ]
    for repeat in repeats:
        for run in repeat.values():
            run["added_mb"] = 10.0 * run["seconds"]
    rows = dp_cost.summarize(repeats, steps=10)
    assert [row["mode"] for row in rows] == ["none", "dp-sgd", "update"]  # the baseline first
    none, dp_sgd, update = rows
    assert none["ratio"] == 1.0 and none["seconds_per_step"] == pytest.approx(0.15)
    assert dp_sgd["ratio"] == pytest.approx(2.0) and (dp_sgd["ratio_min"], dp_sgd["ratio_max"]) == pytest.approx((2, 2))
    assert dp_sgd["seconds_per_step"] == pytest.approx(0.3) and dp_sgd["examples_per_step"] == pytest.approx(8.0)
    # per example trained on: 2/70 over 1/80, 8/90 over 4/80, 3/80 over 1.5/80 -> median 2
    assert dp_sgd["ratio_per_example"] == pytest.approx(2.0) and update["ratio_per_example"] is None
    assert update["ratio"] == pytest.approx(1.0) and update["ratio_min"] == pytest.approx(0.8)
    assert update["ratio_max"] == pytest.approx(1.1) and update["examples_per_step"] is None
    assert update["added_mb"] == pytest.approx(12.0)

    table = dp_cost.markdown_table(rows).splitlines()
    assert table[0].startswith("| dp | s/step (median) | × none (median) |") and len(table) == 5
    assert table[3] == "| dp-sgd | 0.3000 | 2.00 | 2.00–2.00 | 2.00 | 8.0 | 30 |"
    assert table[4] == "| update | 0.1200 | 1.00 | 0.80–1.10 | – | – | 12 |"


def test_without_a_baseline_there_is_no_ratio(dp_cost):
    (row,) = dp_cost.summarize([{"update": {"seconds": 1.0}}], steps=2)
    assert row["ratio"] is None and row["seconds_per_step"] == 0.5
    assert "| update | 0.5000 | – | – | – | – | – |" in dp_cost.markdown_table([row])
    with pytest.raises(ValueError, match="at least one timed repeat"):
        dp_cost.summarize([], steps=2)


def test_set_pairs_take_toml_values(dp_cost):
    assert dp_cost.parse_set(["batch-size=4", "device=cpu", "dp-epsilon=2.5", "data='digits'"]) == {
        "batch-size": 4,
        "device": "cpu",
        "dp-epsilon": 2.5,
        "data": "digits",
    }
    with pytest.raises(SystemExit, match="expected key=value"):
        dp_cost.parse_set(["batch-size"])


def test_a_short_run_times_the_three_modes(tmp_path):
    out = tmp_path / "dp_cost.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "2", "--repeats", "1", "--warmup-steps", "1", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [row["mode"] for row in report["table"]] == ["none", "dp-sgd", "update"]
    for row in report["table"]:
        assert row["seconds_per_step"] > 0 and row["ratio"] > 0, row
    assert report["table"][0]["ratio"] == 1.0 and report["table"][0]["examples_per_step"] == 8.0
    assert report["settings"]["model"] == "tiny-random-llama" and report["settings"]["steps"] == 2
    assert report["settings"]["batch_size"] == 8 and "Poisson" in report["settings"]["sampling"]
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["torch"]
    assert "--steps 2" in report["command"]
    assert "| dp-sgd |" in done.stdout and "[1/1] update" in done.stdout
