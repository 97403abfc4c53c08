"""Faulty-client robustness tables: the other clients' scores per condition, by hand."""

import subprocess
import sys
from pathlib import Path

import pytest
from test_comparison import write_run

from fedbilevel.comparison import Run, clients_mean, robustness_rows

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"0": {"task": "a"}, "1": {"task": "a"}, "2": {"task": "b"}, "3": {"task": "b"}}


def run(strategy: str, seed: int, exact: list[float]) -> Run:
    evaluated = {str(c): {"exact_match": v} for c, v in enumerate(exact)}
    rounds = [{"round": 3, "eval": evaluated, "personalized_mean": {"exact_match": sum(exact) / len(exact)}}]
    return Run(Path(f"/runs/{strategy}{seed}"), strategy, strategy, seed, "exact_match", TASKS, rounds, 1.0)


def test_clients_mean_names_a_client_that_was_not_evaluated():
    assert clients_mean(run("fedbip", 0, [0.2, 0.4, 0.6, 0.0]), [0, 1, 2], "exact_match") == pytest.approx(0.4)
    with pytest.raises(ValueError, match=r"clients \[4\] were not evaluated in round 3"):
        clients_mean(run("fedbip", 0, [0.2, 0.4, 0.6, 0.0]), [0, 4], "exact_match")


def test_others_and_others_of_other_tasks_per_condition_and_seed_mean():
    conditions = {
        "honest": [run("fedbip", 0, [0.5, 0.5, 0.8, 0.8]), run("fedbip", 1, [0.3, 0.5, 0.6, 0.7])],
        "faulty": [run("fedbip", 0, [0.5, 0.4, 0.5, 0.0]), run("fedbip", 1, [0.3, 0.5, 0.3, 0.0])],
    }
    rows = robustness_rows(conditions, faulty=[3], metric="exact_match")
    by_key = {(r["seed"], r["clients"]): r for r in rows}
    assert by_key[(0, "others")]["honest"] == pytest.approx(0.6) and by_key[(0, "others")]["faulty"] == pytest.approx(
        1.4 / 3
    )
    # Client 2 shares task b with faulty client 3: left out of "others, other tasks".
    assert by_key[(0, "others, other tasks")]["honest"] == pytest.approx(0.5)
    assert by_key[(0, "others, other tasks")]["faulty"] == pytest.approx(0.45)
    assert by_key[(1, "others, other tasks")]["faulty"] == pytest.approx(0.4)
    assert by_key[("mean", "others, other tasks")]["faulty"] == pytest.approx((0.45 + 0.4) / 2)
    assert by_key[("mean", "others")]["honest"] == pytest.approx((0.6 + 1.4 / 3) / 2)


def test_a_missing_run_is_shown_as_missing_not_zero():
    conditions = {"honest": [run("fedavg", 0, [0.1, 0.1, 0.1, 0.1])], "absent": []}
    rows = robustness_rows(conditions, faulty=[3], metric="exact_match")
    assert all(r["absent"] is None for r in rows)


def test_report_script_writes_the_table(tmp_path):
    for condition, first in (("honest", 0.4), ("faulty", 0.2)):
        write_run(tmp_path / condition / "runs" / "fedbip-seed0", "fedbip", 0, [(first, 0.5)])
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "robustness_report.py"),
            "--faulty-clients",
            "1",
            "--out",
            str(tmp_path / "out"),
            "--condition",
            f"honest={tmp_path / 'honest'}",
            "--condition",
            f"faulty={tmp_path / 'faulty'}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    table = (tmp_path / "out" / "robustness.md").read_text()
    assert "| fedbip | 0 | others | 0.400 | 0.200 | -0.200 |" in table
