"""Comparison tables and plots from run folders, with hand-computed means and stds."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedbilevel.comparison import (
    load_run,
    markdown,
    per_client_rows,
    plot_similarity,
    summary_rows,
    write_plots,
    write_tables,
)
from fedbilevel.config import ConfigError, parse_assignment

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = {"0": {"task": "reverse", "majority_exact_match": 0.0}, "1": {"task": "count", "majority_exact_match": 0.25}}


def scores(exact: float) -> dict[str, float]:
    return {"rouge1": exact + 0.1, "rougeL": exact + 0.05, "exact_match": exact}


def write_run(
    folder: Path, strategy: str, seed: int, per_round: list[tuple[float, float]], similarity: bool = False
) -> Path:
    """A run folder whose round r evaluates client 0 and 1 at per_round[r-1]."""
    rounds = []
    for number, (first, second) in enumerate(per_round, start=1):
        record = {"round": number, "eval": {"0": scores(first), "1": scores(second)}, "failures": []}
        record["personalized_mean"] = {m: (record["eval"]["0"][m] + record["eval"]["1"][m]) / 2 for m in scores(0)}
        if similarity:
            record.update(participants=[0, 1], similarity=[[1, 0.2], [0.2, 1]], weights=[[0.8, 0.2], [0.2, 0.8]])
        rounds.append(record)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"seed": seed, "run_config": {}}))
    summary = {"primary_metric": "exact_match", "seconds": 120.0}
    (folder / "results.json").write_text(
        json.dumps({"strategy": strategy, "clients": CLIENTS, "rounds": rounds, "summary": summary})
    )
    return folder


@pytest.fixture
def runs(tmp_path):
    return [
        load_run(write_run(tmp_path / "a0", "fedbip", 0, [(0.2, 0.4), (0.6, 0.4)], similarity=True)),
        load_run(write_run(tmp_path / "a1", "fedbip", 1, [(0.6, 0.6), (0.4, 0.4)], similarity=True)),
        load_run(write_run(tmp_path / "b0", "fedavg", 0, [(0.1, 0.1), (0.2, 0.0)])),
    ]


def test_summary_means_and_stds_by_hand(runs):
    fedbip, fedavg = summary_rows(runs)
    assert fedbip["strategy"] == "fedbip" and fedbip["seeds"] == "0 1"
    # Last round: seed 0 mean 0.5, seed 1 mean 0.4 -> 0.45 ± sample std of (0.5, 0.4).
    assert fedbip["last_exact_match_mean"] == pytest.approx(0.45)
    assert fedbip["last_exact_match_std"] == pytest.approx(math.sqrt(0.005))
    assert fedbip["last_rouge1_mean"] == pytest.approx(0.55)
    # Best round by exact match: seed 0 round 2 (0.5), seed 1 round 1 (0.6).
    assert fedbip["best_exact_match_mean"] == pytest.approx(0.55)
    assert fedbip["best_round_mean"] == 1.5
    assert fedbip["minutes_mean"] == 2.0
    # One seed: no standard deviation rather than a made-up zero.
    assert fedavg["last_exact_match_mean"] == pytest.approx(0.1) and math.isnan(fedavg["last_exact_match_std"])


def test_per_client_rows_by_hand(runs):
    rows = {(r["strategy"], r["client"]): r for r in per_client_rows(runs)}
    assert rows[("fedbip", 0)]["exact_match_mean"] == pytest.approx(0.5)  # 0.6 and 0.4
    assert rows[("fedbip", 0)]["exact_match_std"] == pytest.approx(math.sqrt(0.02))
    assert rows[("fedbip", 1)]["task"] == "count" and rows[("fedbip", 1)]["seeds"] == 2
    assert rows[("fedavg", 1)]["exact_match_mean"] == 0.0


def test_similarity_plot_of_a_sampled_round_leaves_absent_clients_blank(tmp_path):
    folder = write_run(tmp_path / "s0", "fedbip", 0, [(0.2, 0.4)], similarity=True)
    results = json.loads((folder / "results.json").read_text())
    # Client 1 was not sampled: its row and column are None over all clients (not a 1×1 matrix).
    results["rounds"][0].update(
        participants=[0], similarity=[[1, None], [None, None]], weights=[[1, None], [None, None]]
    )
    (folder / "results.json").write_text(json.dumps(results))
    path = plot_similarity(load_run(folder), tmp_path / "similarity.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tables_and_plots_are_written(runs, tmp_path):
    out = tmp_path / "report"
    paths = write_tables(runs, out) + write_plots(runs, out)
    assert {p.name for p in paths} == {
        "comparison.csv",
        "per_client.csv",
        "comparison.md",
        "scores_per_round.png",
        "per_client.png",
        "similarity_fedbip.png",
    }
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with (out / "comparison.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["strategy"] for r in rows] == ["fedbip", "fedavg"]
    assert float(rows[0]["last_exact_match_mean"]) == pytest.approx(0.45)
    text = (out / "comparison.md").read_text()
    assert text == markdown(runs)
    assert "| fedbip | 0 1 | 0.550 ± 0.071 | 0.500 ± 0.071 | 0.450 ± 0.071 |" in text
    assert "| 0 | reverse | 0.000 | 0.500 ± 0.141 | 0.200 |" in text and "| 1 | count | 0.250 |" in text


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"config\.json is missing"):
        load_run(tmp_path)


def test_run_config_assignments_parse_like_flwr_run():
    assert parse_assignment("learning-rate=3e-4") == ("learning-rate", 3e-4)
    assert parse_assignment("strategy='fedamp'") == ("strategy", "fedamp")
    assert parse_assignment("strategy=fedamp") == ("strategy", "fedamp")
    assert parse_assignment("num-server-rounds = 5") == ("num-server-rounds", 5)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_assignment("fedamp")


def test_compare_refuses_bad_arguments_before_running(tmp_path):
    def compare(*args):
        return subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "compare.py"), "--out", str(tmp_path), *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )

    result = compare("--strategies", "fedbip,fedsgd")
    assert result.returncode != 0 and "--strategies: 'fedsgd' is not allowed; choose from fedbip" in result.stderr
    result = compare("--set", "learning-rate=-1")
    assert result.returncode != 0 and "run-config key 'learning-rate': value -1 is not allowed" in result.stderr
    result = compare("--set", "seed=3")
    assert result.returncode != 0 and "seed: not allowed in --set or variants" in result.stderr
    (tmp_path / "variants.toml").write_text(
        '[sharp]\nstrategy = "fedbip"\nweighting = "softmax"\nweighting-temperature = 0\n'
    )
    result = compare("--variants", str(tmp_path / "variants.toml"))
    assert result.returncode != 0 and "run-config key 'weighting-temperature': value 0 is not allowed" in result.stderr
    result = compare("--variants", str(tmp_path / "variants.toml"), "--labels", "sharp,blunt")
    assert result.returncode != 0 and "--labels: 'blunt' is not allowed; choose from sharp" in result.stderr
    assert not (tmp_path / "runs").exists()
    # A folder of 32-client runs: an 8-client comparison would reuse them as if they were its own.
    (tmp_path / "runs").mkdir()
    (tmp_path / "compare.json").write_text('{"num_clients": 32}')
    result = compare("--strategies", "fedavg", "--report-only")
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1] == (
        f"--num-clients 8: {tmp_path} holds runs of 32 clients ({tmp_path / 'compare.json'}); "
        "use --num-clients 32, or another --out"
    )


def test_compare_runs_strategies_and_reuses_finished_runs(tmp_path):
    tiny = [
        "--set",
        "model-name='tiny-random-llama'",
        "--set",
        "num-server-rounds=1",
        "--set",
        "synthetic-tasks='reverse,count'",
        "--set",
        "synthetic-train-examples=4",
        "--set",
        "synthetic-test-examples=2",
        "--set",
        "local-steps=1",
        "--set",
        "eval-max-new-tokens=2",
    ]
    variants = tmp_path / "variants.toml"
    # --labels picks the softmax table: the ema one is never run.
    variants.write_text(
        '[fedbip-ema]\nstrategy = "fedbip"\nsimilarity-ema = 0.5\n'
        '[fedbip-softmax]\nstrategy = "fedbip"\nweighting = "softmax"\n'
    )
    command = [
        sys.executable,
        str(ROOT / "scripts" / "compare.py"),
        "--strategies",
        "fedbip",
        "--variants",
        str(variants),
        "--labels",
        "fedbip-softmax",
        "--seeds",
        "3",
        "--num-clients",
        "2",
        "--out",
        str(tmp_path / "out"),
        *tiny,
    ]
    first = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "[1/2] fedbip-seed3: round 1/1" in first.stdout and "[2/2] fedbip-softmax-seed3 finished" in first.stdout
    out = tmp_path / "out"
    assert sorted(path.name for path in (out / "runs").iterdir() if path.is_dir()) == [
        "fedbip-seed3",
        "fedbip-softmax-seed3",
    ]
    for name, weighting in (("fedbip-seed3", "paper"), ("fedbip-softmax-seed3", "softmax")):
        config = json.loads((out / "runs" / name / "config.json").read_text())
        assert (
            config["seed"] == 3
            and config["run_config"]["local-steps"] == 1
            and config["run_config"]["weighting"] == weighting
        )
    with (out / "comparison.csv").open() as handle:
        assert [row["strategy"] for row in csv.DictReader(handle)] == ["fedbip", "fedbip-softmax"]
    assert (out / "similarity_fedbip.png").exists() and (out / "similarity_fedbip-softmax.png").exists()
    # A second invocation reuses both finished runs and rebuilds the report, also a run saved
    # before a key existed (its default keeps the old behaviour) ...
    saved_path = out / "runs" / "fedbip-seed3" / "config.json"
    saved = json.loads(saved_path.read_text())
    assert saved["run_config"].pop("similarity-ema") == 0.0
    saved_path.write_text(json.dumps(saved))
    (out / "comparison.csv").unlink()
    second = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert (
        second.returncode == 0
        and "0 of 2 runs to do" in second.stdout
        and "fedbip-seed3: finished earlier, reused" in second.stdout
        and (out / "comparison.csv").exists()
    ), second.stderr[-2000:]
    # ... but a run whose saved value differs is refused, naming the key.
    saved["run_config"]["local-steps"] = 2
    saved_path.write_text(json.dumps(saved))
    third = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert third.returncode != 0 and "'local-steps': 2 there, 1 now" in third.stderr


def test_bootstrap_interval_by_construction(tmp_path):
    from fedbilevel.comparison import bootstrap_interval

    def with_items(name, seed, items):
        run = load_run(write_run(tmp_path / name, "fedbip", seed, [(0.5, 0.5)]))
        run.last["eval_items"] = {"0": {"exact_match": items[0]}, "1": {"exact_match": items[1]}}
        return run

    # Constant item scores: every resample gives the same mean, so the interval is a point.
    constant = [with_items("c0", 0, ([1.0, 1.0], [0.0, 0.0])), with_items("c1", 1, ([1.0, 1.0], [0.0, 0.0]))]
    assert bootstrap_interval(constant, "exact_match") == (0.5, 0.5)
    # Varying items (observed mean 0.375): the interval holds it and has width.
    varied = [
        with_items("v0", 0, ([1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0])),
        with_items("v1", 1, ([1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0])),
    ]
    low, high = bootstrap_interval(varied, "exact_match")
    assert 0.0 <= low < 0.375 < high <= 1.0
    assert bootstrap_interval(varied, "exact_match") == (low, high)  # seeded
    # Runs without per-item scores give no interval rather than a made-up one.
    assert bootstrap_interval([load_run(write_run(tmp_path / "n0", "fedbip", 0, [(0.5, 0.5)]))], "exact_match") is None


def test_option_accuracy_on_the_clients_that_list_options(tmp_path):
    from fedbilevel.comparison import bootstrap_interval, option_rows

    def with_options(name, strategy, seed, option_accuracy, items):
        run = load_run(write_run(tmp_path / name, strategy, seed, [(0.5, 0.5)]))
        run.last["eval"]["1"]["option_accuracy"] = option_accuracy  # only client 1's task lists options
        run.last["eval_items"] = {
            "0": {"exact_match": [1.0, 0.0]},
            "1": {"exact_match": [1.0, 0.0], "option_correct": items},
        }
        return run

    runs = [
        with_options("a0", "fedbip", 0, 0.75, [1.0, 1.0, 1.0, 0.0]),
        with_options("a1", "fedbip", 1, 0.25, [0.0, 1.0, 0.0, 0.0]),
        with_options("b0", "local", 0, 1.0, [1.0, 1.0, 1.0, 1.0]),
    ]
    fedbip, local = option_rows(runs)
    assert (
        fedbip["clients"] == 1
        and fedbip["mean"] == pytest.approx(0.5)
        and fedbip["std"] == pytest.approx(math.sqrt(0.125))
    )
    assert fedbip["ci_low"] < 0.5 < fedbip["ci_high"]
    assert (local["mean"], local["ci_low"], local["ci_high"]) == (1.0, 1.0, 1.0)  # every item right: a point
    # Restricted to client 1; client 0 has no option items, so asking for it gives no interval.
    assert bootstrap_interval(runs[2:], "option_correct", clients=["1"]) == (1.0, 1.0)
    assert bootstrap_interval(runs[2:], "option_correct") is None
    rows = {(r["strategy"], r["client"]): r for r in per_client_rows(runs)}
    assert rows[("fedbip", 1)]["option_accuracy_mean"] == pytest.approx(0.5) and math.isnan(
        rows[("fedbip", 0)]["option_accuracy_mean"]
    )
    text = markdown(runs)
    assert "| fedbip | 0 1 | 0.500 ± 0.354 | [" in text and "| local | 0 | 1.000 | [1.000, 1.000] |" in text
    assert "| 1 | count | 0.250 | 0.500 ± 0.354 | 1.000 |" in text


def test_paired_difference_cancels_item_difficulty(tmp_path):
    from fedbilevel.comparison import bootstrap_interval, paired_difference_interval

    def with_items(name, strategy, seed, first, second):
        run = load_run(write_run(tmp_path / name, strategy, seed, [(0.5, 0.5)]))
        run.last["eval_items"] = {"0": {"exact_match": first}, "1": {"exact_match": second}}
        return run

    # B scores every item 0.25 above A (ROUGE-like item scores): every resample of the same
    # items gives +0.25, so the paired interval is a point while A's own interval is wide.
    first, second = [0.0, 0.5, 0.7, 0.1], [0.2, 0.6, 0.0, 0.75]
    a = [with_items("a0", "local", 0, first, second)]
    b = [with_items("b0", "fedbip", 0, [x + 0.25 for x in first], [x + 0.25 for x in second])]
    observed, low, high = paired_difference_interval(b, a, "exact_match")
    assert observed == pytest.approx(0.25) and (low, high) == pytest.approx((0.25, 0.25))
    a_low, a_high = bootstrap_interval(a, "exact_match")
    assert a_high - a_low > 0.2
    # Different seeds (so different test items) cannot be paired.
    assert paired_difference_interval([with_items("b1", "fedbip", 1, [1.0] * 4, [1.0] * 4)], a, "exact_match") is None
    # A reference with more seeds is paired on the seeds both ran (seed 0 here).
    a_more = [*a, with_items("a1", "local", 1, [0.0] * 4, [0.0] * 4)]
    assert paired_difference_interval(b, a_more, "exact_match") == pytest.approx((0.25, 0.25, 0.25))
    text = markdown(a_more + b)
    assert "| fedbip | 0 | +0.250 | [" in text
    # Against FedAvg too, where it ran: FedAvg scores every item 0.5 below B.
    fedavg = [with_items("f0", "fedavg", 0, [x - 0.25 for x in first], [x - 0.25 for x in second])]
    text = markdown(a_more + b + fedavg)
    against_fedavg = text[text.index("Difference to fedavg") :]
    assert "| fedbip | 0 | +0.500 | [+0.500, +0.500] |" in against_fedavg
    assert "| local | 0 | +0.250 | [+0.250, +0.250] |" in against_fedavg
    assert "| fedavg | 0 | -0.250 | [-0.250, -0.250] |" in text[: text.index("Difference to fedavg")]


def test_per_task_rows_average_a_tasks_clients_then_the_seeds(tmp_path):
    from fedbilevel.comparison import per_task_rows

    def run(name, seed, per_client):
        folder = write_run(tmp_path / name, "fedbip", seed, [(0.0, 0.0)])
        results = json.loads((folder / "results.json").read_text())
        results["clients"] = {str(c): {"task": "ab"[c // 2]} for c in range(4)}
        results["rounds"][0]["eval"] = {str(c): scores(value) for c, value in enumerate(per_client)}
        (folder / "results.json").write_text(json.dumps(results))
        return load_run(folder)

    runs = [run("t0", 0, [0.2, 0.4, 1.0, 0.0]), run("t1", 1, [0.4, 0.6, 0.5, 0.5])]
    rows = {row["task"]: row for row in per_task_rows(runs)}
    # Task a: seed 0 (0.2 + 0.4) / 2 = 0.3, seed 1 0.5 -> 0.4 ± std(0.3, 0.5); task b: 0.5 both seeds.
    assert rows["a"]["exact_match_mean"] == pytest.approx(0.4) and rows["a"]["clients"] == 2
    assert rows["a"]["exact_match_std"] == pytest.approx(math.sqrt(0.02))
    assert rows["b"]["exact_match_mean"] == pytest.approx(0.5) and rows["b"]["exact_match_std"] == pytest.approx(0.0)
    assert "| a | 2 | 0.400 ± 0.141 |" in markdown(runs)


def test_strategy_colours_stay_distinct_past_the_default_cycle():
    from fedbilevel.comparison import strategy_colours

    # matplotlib's default cycle has 10 colours; an 11-variant ablation must not reuse one.
    for count in (3, 10, 11, 20):
        colours = strategy_colours(count)
        assert len(colours) == count and len(set(colours)) == count


def write_grouped_run(folder: Path, strategy: str, seed: int, tasks: list[str], matrices: list[dict]) -> Path:
    """A run folder over clients 0..N-1 with ``tasks``; round r records ``matrices[r-1]`` (similarity
    and/or weights, None for absent clients) and evaluates every client at 0.5."""
    rounds = []
    for number, fields in enumerate(matrices, start=1):
        evaluated = {str(c): scores(0.5) for c in range(len(tasks))}
        rounds.append({"round": number, "eval": evaluated, "personalized_mean": scores(0.5), **fields})
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"seed": seed, "run_config": {}}))
    clients = {str(c): {"task": task, "majority_exact_match": 0.0} for c, task in enumerate(tasks)}
    summary = {"primary_metric": "exact_match", "seconds": 60.0}
    (folder / "results.json").write_text(
        json.dumps({"strategy": strategy, "clients": clients, "rounds": rounds, "summary": summary})
    )
    return folder


# Clients 0, 1 hold task "a", 2, 3 task "b". Round 1: client 3 absent (None row and column).
GROUPED_TASKS = ["a", "a", "b", "b"]
ROUND_1 = {
    "participants": [0, 1, 2],
    "similarity": [[1, 0.8, 0.2, None], [0.8, 1, 0.4, None], [0.2, 0.4, 1, None], [None] * 4],
    "weights": [[0.5, 0.3, 0.2, None], [0.4, 0.4, 0.2, None], [0.25, 0.25, 0.5, None], [None] * 4],
}
ROUND_2 = {
    "participants": [0, 1, 2, 3],
    "similarity": [[1, 0.6, 0.1, 0.7], [0.6, 1, 0.3, -0.2], [0.1, 0.3, 1, 0.5], [0.7, -0.2, 0.5, 1]],
    "weights": [[0.4, 0.3, 0.1, 0.2], [0.3, 0.5, 0.1, 0.1], [0.1, 0.1, 0.6, 0.2], [0.1, 0.1, 0.2, 0.6]],
}


def test_group_separation_by_hand(tmp_path):
    from fedbilevel.comparison import group_separation

    run = load_run(write_grouped_run(tmp_path / "g0", "fedbip", 0, GROUPED_TASKS, [ROUND_1, ROUND_2, {}]))
    first, second = group_separation(run)  # round 3 records no matrix: no row
    # Round 1, pairs of 0, 1, 2: same task (0,1) 0.8; cross (0,2) 0.2, (1,2) 0.4; every same above every cross.
    assert first["round"] == 1 and first["clients"] == 3
    assert first["same_task_cos"] == pytest.approx(0.8) and first["cross_task_cos"] == pytest.approx(0.3)
    assert first["cos_gap"] == pytest.approx(0.5) and first["auroc"] == 1.0
    # Weights: 0 puts 0.3 on 1, 1 puts 0.4 on 0; 2's partner 3 is absent, so 2 has no partner row.
    assert first["same_task_weight"] == pytest.approx(0.35)
    assert first["uniform_same_task_weight"] == pytest.approx(1 / 3)  # 1 partner of 3 present columns
    assert first["self_weight"] == pytest.approx((0.5 + 0.4 + 0.5) / 3)
    # Step length √(pᵢᵀ S pᵢ): row 0 √0.708, row 1 √0.712, row 2 √0.625 (absent client 3 counts 0).
    assert first["step_length"] == pytest.approx((math.sqrt(0.708) + math.sqrt(0.712) + math.sqrt(0.625)) / 3)
    recorded = {**ROUND_1, "step_lengths": [0.5, 0.7, None]}  # as the server records it: exact, used as is
    exact = load_run(write_grouped_run(tmp_path / "e0", "fedbip", 0, GROUPED_TASKS, [recorded]))
    assert group_separation(exact)[0]["step_length"] == pytest.approx(0.6)
    fedamp = load_run(write_grouped_run(tmp_path / "f0", "fedamp", 0, GROUPED_TASKS, [ROUND_1]))
    assert group_separation(fedamp)[0]["step_length"] is None  # its cosines are of adapters, not task vectors
    # Round 2: same (0,1) 0.6, (2,3) 0.5; cross 0.1, 0.7, 0.3, -0.2. Each same pair beats 3 of the 4 cross: 6/8.
    assert second["clients"] == 4
    assert second["same_task_cos"] == pytest.approx(0.55) and second["cross_task_cos"] == pytest.approx(0.225)
    assert second["cos_gap"] == pytest.approx(0.325) and second["auroc"] == pytest.approx(0.75)
    assert second["same_task_weight"] == pytest.approx(0.25) and second["uniform_same_task_weight"] == 0.25
    assert second["self_weight"] == pytest.approx(0.525)


def test_group_separation_without_tasks_matrices_or_groups(tmp_path, runs):
    from fedbilevel.comparison import group_separation, separation_rows

    # Weights only (the cluster oracle): the cosine measures are None, the weight measures are there.
    weights_only = {key: value for key, value in ROUND_1.items() if key != "similarity"}
    oracle = load_run(write_grouped_run(tmp_path / "o0", "cluster-oracle", 0, GROUPED_TASKS, [weights_only]))
    (row,) = group_separation(oracle)
    assert row["same_task_cos"] is None and row["auroc"] is None and row["same_task_weight"] == pytest.approx(0.35)
    # No task label, or no matrix: nothing to measure.
    unlabelled = load_run(write_grouped_run(tmp_path / "u0", "fedbip", 0, [None] * 4, [ROUND_2]))
    assert group_separation(unlabelled) == []
    assert group_separation(load_run(write_grouped_run(tmp_path / "n0", "fedavg", 0, GROUPED_TASKS, [{}]))) == []
    # One client per task: no same-task pair, so no separation table or files.
    assert group_separation(runs[0])[0]["same_task_cos"] is None and group_separation(runs[0])[0]["auroc"] is None
    assert separation_rows(runs) == []


def test_separation_table_and_csv_by_hand(tmp_path):
    from fedbilevel.comparison import separation_rows

    other_seed = {**ROUND_1, "similarity": [[1, 0.6, 0.2, None], [0.6, 1, 0.4, None], [0.2, 0.4, 1, None], [None] * 4]}
    weights_only = {key: value for key, value in ROUND_2.items() if key != "similarity"}
    runs = [
        load_run(write_grouped_run(tmp_path / "a0", "fedbip", 0, GROUPED_TASKS, [ROUND_1, ROUND_2])),
        load_run(write_grouped_run(tmp_path / "a1", "fedbip", 1, GROUPED_TASKS, [other_seed, ROUND_2])),
        load_run(write_grouped_run(tmp_path / "b0", "cluster-oracle", 0, GROUPED_TASKS, [weights_only])),
        load_run(write_grouped_run(tmp_path / "c0", "fedavg", 0, GROUPED_TASKS, [{}])),  # no matrix: left out
    ]
    rows = separation_rows(runs)
    assert [(r["strategy"], r["when"], r["rounds"], r["seeds"]) for r in rows] == [
        ("fedbip", "first", "1", "0 1"),
        ("fedbip", "last", "2", "0 1"),
        ("cluster-oracle", "first", "1", "0"),
        ("cluster-oracle", "last", "1", "0"),
    ]
    # Round 1's same-task cosine is 0.8 for seed 0, 0.6 for seed 1: mean 0.7, sample std sqrt(0.02).
    assert rows[0]["same_task_cos_mean"] == pytest.approx(0.7)
    assert rows[0]["same_task_cos_std"] == pytest.approx(math.sqrt(0.02))
    assert math.isnan(rows[2]["auroc_mean"]) and rows[2]["same_task_weight_mean"] == pytest.approx(0.25)
    text = markdown(runs)
    assert (
        "| strategy | round | seeds | same-task cos | cross-task cos | AUROC | on partners | uniform | self | step |"
        in text
    )
    assert "| fedbip | 1 | 0 1 | 0.700 ± 0.141 | 0.300 ± 0.000 | 1.000 ± 0.000 | 0.350 ± 0.000 |" in text
    assert (
        "| fedbip | 2 | 0 1 | 0.550 ± 0.000 | 0.225 ± 0.000 | 0.750 ± 0.000 | 0.250 ± 0.000 | 0.250 ± 0.000 |" in text
    )
    assert "| cluster-oracle | 1 | 0 | – | – | – | 0.250 | 0.250 | 0.525 | – |" in text  # no cosines: no step
    out = tmp_path / "report"
    paths = write_tables(runs, out) + write_plots(runs, out)
    assert {out / "separation.csv", out / "separation.png"} <= set(paths)
    with (out / "separation.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == [
        "strategy",
        "seed",
        "round",
        "clients",
        "same_task_cos",
        "cross_task_cos",
        "cos_gap",
        "auroc",
        "same_task_weight",
        "uniform_same_task_weight",
        "self_weight",
        "step_length",
    ]
    assert [(r["strategy"], r["seed"], r["round"]) for r in table] == [
        ("fedbip", "0", "1"),
        ("fedbip", "0", "2"),
        ("fedbip", "1", "1"),
        ("fedbip", "1", "2"),
        ("cluster-oracle", "0", "1"),
    ]
    assert float(table[1]["auroc"]) == pytest.approx(0.75) and table[4]["auroc"] == ""


def synthetic_groups(tasks: list[str], rounds: int, *, seed: int = 0, noise: float = 1.0) -> list[dict]:
    """Rounds of a federation whose task vectors are their task's centre plus noise: half the
    clients sampled a round, cosines over them, weights = the positive cosines normalized per row."""
    rng = np.random.default_rng(seed)
    names = sorted(set(tasks))
    centres = rng.normal(size=(len(names), 64))
    matrices = []
    for _ in range(rounds):
        vectors = centres[[names.index(t) for t in tasks]] + noise * rng.normal(size=(len(tasks), 64))
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        cosine = unit @ unit.T
        weights = np.clip(cosine, 0, None) / np.clip(cosine, 0, None).sum(axis=1, keepdims=True)
        present = sorted(rng.choice(len(tasks), size=len(tasks) // 2, replace=False).tolist())
        matrices.append(
            {
                "participants": present,
                **{
                    key: [
                        [round(float(m[i, j]), 6) if i in present and j in present else None for j in range(len(tasks))]
                        for i in range(len(tasks))
                    ]
                    for key, m in (("similarity", cosine), ("weights", weights))
                },
            }
        )
    return matrices


FLAN8 = ["definite_pronoun_resolution", "snli", "cola", "glue_qqp", "trec", "web_nlg_en", "fix_punct", "wic"]


def test_a_32_client_similarity_plot_stays_readable(tmp_path):
    """8 tasks × 4 clients (partitions 4t..4t+3 hold task t): no cell values, ids as ticks, task blocks."""
    from fedbilevel.comparison import group_separation

    tasks = [task for task in FLAN8 for _ in range(4)]
    run = load_run(write_grouped_run(tmp_path / "f0", "fedbip", 0, tasks, synthetic_groups(tasks, 3)))
    path = plot_similarity(run, tmp_path / "similarity_32.png")
    width, height = (int.from_bytes(path.read_bytes()[k : k + 4], "big") for k in (16, 20))
    assert width <= 2600 and height <= 2600  # the panels stop growing past the cell-value size
    # Task centres far above the noise: the groups separate from round 1.
    assert all(row["auroc"] > 0.9 and row["cos_gap"] > 0.3 for row in group_separation(run))


def test_clients_not_in_task_order_are_drawn_grouped_and_the_title_says_so():
    import matplotlib.pyplot as plt

    from fedbilevel.comparison import draw_matrix, task_order

    assert task_order(["a", "a", "b", "b"]) == [0, 1, 2, 3]
    assert task_order(["a", "b", "a", "c", "b"]) == [0, 2, 1, 4, 3]
    tasks = [FLAN8[p % 8] for p in range(32)]  # partition p holds task p mod 8: interleaved
    clients = {str(c): {"task": task} for c, task in enumerate(tasks)}
    record = synthetic_groups(tasks, 1)[0] | {"round": 1}
    figure, ax = plt.subplots()
    draw_matrix(figure, ax, record, "similarity", clients)
    assert ax.get_title() == "cosine similarity, round 1 (clients ordered by task)"
    assert [t.get_text() for t in ax.get_yticklabels()][:5] == ["0", "8", "16", "24", "1"]
    assert [t.get_text() for t in ax.get_yticklabels(minor=True)] == FLAN8
    assert not ax.texts  # no cell values at 32 clients
    plt.close(figure)


def test_privacy_table_csv_and_plot_by_hand(tmp_path):
    from fedbilevel.comparison import privacy_rows

    def private(folder: Path, run_config: dict) -> Path:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "run_config": run_config}))
        return folder

    dp_sgd = {"dp": "dp-sgd", "dp-epsilon": 1.0, "dp-delta": 1e-5}
    # Client 1 spent the most (0.9) and stopped at its budget; σ is the mean over clients and rounds.
    train = {"0": {"dp-noise-multiplier": 2.0, "dp-epsilon-spent": 0.4}, "1": {"dp-noise-multiplier": 4.0}}
    last = {"0": {"dp-noise-multiplier": 3.0, "dp-epsilon-spent": 0.6}, "1": {"dp-epsilon-spent": 0.9, "dp-stopped": 1}}
    grouped = [
        ("fedbip", "fedbip", {}, [ROUND_1, ROUND_2]),
        ("fedbip-eps1", "fedbip", dp_sgd, [{**ROUND_2, "train": train}, {**ROUND_2, "train": last}]),
        ("fedbip-sigma", "fedbip", {"dp": "update", "dp-epsilon": 0.0, "dp-noise-multiplier": 1.5}, [ROUND_2]),
        ("fedbip-update-eps8", "fedbip", {"dp": "update", "dp-epsilon": 8.0}, [ROUND_2]),
        ("local-eps1", "local", dp_sgd, [{}]),
        ("fedavg", "fedavg", {}, [{}]),  # no DP run of fedavg: not in the privacy table
        ("fedbip-zscore", "fedbip", {"weighting": "zscore-softmax"}, [ROUND_1]),  # other settings, none with DP
    ]
    runs = [
        load_run(private(write_grouped_run(tmp_path / label, strategy, 0, GROUPED_TASKS, rounds), config), label)
        for label, strategy, config, rounds in grouped
    ]
    # A second seed of local-eps1 in which both clients stopped: 1 stopped client a seed on average.
    both_stopped = {"0": {"dp-stopped": 1.0, "dp-epsilon-spent": 1.0}, "1": {"dp-stopped": 1.0}}
    second = write_grouped_run(tmp_path / "local-eps1-1", "local", 1, GROUPED_TASKS, [{"train": both_stopped}])
    runs.append(load_run(private(second, dp_sgd), "local-eps1"))
    rows = privacy_rows(runs)
    assert [(r["strategy"], r["dp"], r["epsilon"]) for r in rows[:2]] == [
        ("fedbip", "none", math.inf),
        ("fedbip-eps1", "dp-sgd", 1.0),
    ]
    # Then by mode, and within one the largest budget first; σ set without a budget last.
    assert [r["strategy"] for r in rows[2:4]] == ["fedbip-update-eps8", "fedbip-sigma"]
    assert math.isnan(rows[3]["epsilon"])
    assert [(r["strategy"], r["seeds"], r["stopped"]) for r in rows[4:]] == [("local-eps1", "0 1", 1.0)]
    fedbip, eps1 = rows[:2]
    assert math.isnan(fedbip["noise_multiplier"]) and fedbip["stopped"] == 0
    assert eps1["noise_multiplier"] == pytest.approx(3.0) and eps1["epsilon_spent"] == 0.9 and eps1["stopped"] == 1
    # The separation of test_group_separation_by_hand's rounds: 0.5 then 0.325, AUROC 1.0, 0.35 on partners.
    assert fedbip["cos_gap_first_mean"] == pytest.approx(0.5) and fedbip["cos_gap_last_mean"] == pytest.approx(0.325)
    assert fedbip["auroc_first_mean"] == 1.0 and fedbip["same_task_weight_first_mean"] == pytest.approx(0.35)
    assert eps1["cos_gap_first_mean"] == pytest.approx(0.325) and eps1["auroc_first_mean"] == pytest.approx(0.75)
    assert math.isnan(rows[4]["cos_gap_first_mean"])  # local records no matrices
    text = markdown(runs)
    assert "| fedbip | none | ∞ | – | – | 0 | 0 | 0.500 | 0.500 | 0.325 | 1.000 | 0.350 | 0.333 |" in text
    assert "| fedbip-eps1 | dp-sgd | 1 | 3 | 0.90 | 1 | 0 | 0.500 | 0.325 | 0.325 | 0.750 | 0.250 | 0.250 |" in text
    assert "| fedbip-sigma | update | σ set |" in text
    out = tmp_path / "report"
    paths = write_tables(runs, out) + write_plots(runs, out)
    assert {out / "privacy.csv", out / "privacy.png"} <= set(paths)
    assert (out / "privacy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (out / "privacy.csv").open() as handle:
        assert [r["strategy"] for r in csv.DictReader(handle)] == [r["strategy"] for r in rows]
    # Without any DP run there is no privacy table or file.
    without = [run for run in runs if run.dp == "none"]
    assert privacy_rows(without) == [] and "Privacy against utility" not in markdown(without)
