"""scripts/tune.py (grids, refusals, the choice on fabricated run folders) and the comparison's settings column."""

import dataclasses
import functools
import importlib.util
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedbilevel.comparison import load_run, markdown, settings_text, strategy_keys, strategy_settings, summary_rows
from fedbilevel.config import RunConfig
from fedbilevel.strategies import FEDBIP_PRESETS, strategy_names, strategy_options

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tune():
    spec = importlib.util.spec_from_file_location("tune", ROOT / "scripts" / "tune.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["tune"] = module  # its dataclass looks its module up while being defined
    spec.loader.exec_module(module)
    yield module
    del sys.modules["tune"]


def write_run(folder: Path, strategy: str, seed: int, exact: float, run_config: dict | None = None) -> None:
    """A finished two-client run scored ``exact`` (and ROUGE-L 0.5) on validation in its last round."""
    mean = {"rouge1": 0.6, "rougeL": 0.5, "exact_match": exact}
    rounds = [{"round": 1, "eval": {"0": mean, "1": mean}, "failures": [], "personalized_mean": mean}]
    folder.mkdir(parents=True)
    config = {"strategy": strategy, "eval-split": "validation", "val-fraction": 0.25, **(run_config or {})}
    (folder / "config.json").write_text(json.dumps({"seed": seed, "run_config": config}))
    clients = {"0": {"task": "reverse"}, "1": {"task": "count"}}
    summary = {"primary_metric": "exact_match", "seconds": 60.0}
    (folder / "results.json").write_text(
        json.dumps({"strategy": strategy, "clients": clients, "rounds": rounds, "summary": summary})
    )


def test_default_grids_and_overrides(tune):
    grids = tune.parse_grid([], ["fedavg", "fedprox", "fedamp", "fedala"])
    assert grids["fedavg"] == {} and grids["fedprox"] == {"proximal-mu": [0.001, 0.01, 0.1, 1.0]}
    assert [p.setting for p in tune.grid_points("fedamp", grids["fedamp"])][:2] == [
        "fedamp-sigma=5.0, fedamp-lambda=0.01, fedamp-self-weight=0.3",
        "fedamp-sigma=5.0, fedamp-lambda=0.01, fedamp-self-weight=0.5",
    ]
    assert len(tune.grid_points("fedamp", grids["fedamp"])) == 18
    assert [p.label for p in tune.grid_points("fedavg", grids["fedavg"])] == ["fedavg"]
    assert grids["fedala"] == {"fedala-eta": [1.0, 10.0, 100.0, 1000.0, 10000.0]}
    # A bare key replaces its values wherever declared; a qualified one for that strategy only;
    # learning-rate belongs to every strategy.
    grids = tune.parse_grid(
        ["fedala-eta=1,100", "fedamp:fedamp-self-weight=0.3,0.7", "fedavg:learning-rate=1e-3,3e-3"],
        ["fedavg", "fedamp", "fedala"],
    )
    assert grids["fedala"] == {"fedala-eta": [1, 100]} and grids["fedavg"] == {"learning-rate": [1e-3, 3e-3]}
    assert grids["fedamp"]["fedamp-self-weight"] == [0.3, 0.7] and len(grids["fedamp"]) == 3
    assert tune.grid_points("fedala", grids["fedala"])[1].label == "fedala_fedala-eta_100"
    # FFA-LoRA's learning rate: multiples of the runs' own.
    grids = tune.with_learning_rate_multiples(tune.parse_grid([], ["fedavg", "ffa-lora"]), 0.02)
    assert grids == {"fedavg": {}, "ffa-lora": {"learning-rate": [0.02, 0.04, 0.1, 0.2]}}
    assert tune.grid_points("ffa-lora", grids["ffa-lora"])[2].label == "ffa-lora_learning-rate_0.1"


def test_a_key_the_strategy_does_not_use_is_refused_in_one_line(tune):
    with pytest.raises(SystemExit) as refused:
        tune.parse_grid(["fedamp-sigma=1,2"], ["fedprox"])
    assert str(refused.value) == (
        "--grid key 'fedamp-sigma' is not used by fedprox; "
        "their keys: fedprox: proximal-mu, aggregation-weights, optimizer, momentum, learning-rate"
    )
    with pytest.raises(
        SystemExit,
        match=r"--grid key 'proximal-mu' is not used by fedavg; .*fedavg: aggregation-weights, optimizer, momentum, "
        r"learning-rate$",
    ):
        tune.parse_grid(["fedavg:proximal-mu=1"], ["fedavg", "fedprox"])
    with pytest.raises(SystemExit, match="strategy 'fedala' is not tuned"):
        tune.parse_grid(["fedala:fedala-eta=1"], ["fedprox"])
    with pytest.raises(SystemExit, match=r"expected \[STRATEGY:\]KEY=V1,V2"):
        tune.parse_grid(["proximal-mu="], ["fedprox"])
    assert "fedamp-self-weight" in strategy_keys("fedamp") and "weighting" in strategy_keys("fedbip-l")
    # FedDPA's knobs come from its registration (they were once missing from a hand-kept map).
    assert tune.parse_grid(["feddpa-max-weight=0.3,0.7"], ["feddpa"]) == {"feddpa": {"feddpa-max-weight": [0.3, 0.7]}}


def test_each_strategys_options_component_is_registered_with_it():
    # By convention the RunConfig component named after a strategy holds its options; the registration
    # must name it, or its keys are neither tunable nor shown (FedDPA's once were not).
    components = {field.name for field in dataclasses.fields(RunConfig) if field.metadata.get("component")}
    for name in strategy_names():
        expected = name if name in components else strategy_options(FEDBIP_PRESETS.get(name, (name,))[0])
        assert strategy_options(name) == expected, name
    assert {"fedprox", "fedamp", "fedala", "feddpa", "fedbip"} <= components
    assert strategy_keys("feddpa") == (
        "feddpa-local-weight",
        "feddpa-instances",
        "feddpa-max-weight",
        "aggregation-weights",
        "optimizer",
        "momentum",
        "learning-rate",
    )
    assert strategy_keys("fedbip-plus") == strategy_keys("fedbip") and "aggregation-weights" not in strategy_keys(
        "fedbip"
    )


def test_the_cli_refuses_before_running(tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "tune.py"), "--out", str(tmp_path / "out"), *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )

    refused = run("--strategies", "fedprox", "--grid", "fedala-eta=1,10")
    assert refused.returncode != 0 and refused.stderr.strip().splitlines() == [
        "--grid key 'fedala-eta' is not used by fedprox; "
        "their keys: fedprox: proximal-mu, aggregation-weights, optimizer, momentum, learning-rate"
    ]
    refused = run("--strategies", "fedprox", "--grid", "proximal-mu=-1")
    assert refused.stderr.strip().splitlines() == [
        "run-config key 'proximal-mu': value -1 is not allowed; expected a number in [0.0, inf)"
    ]
    refused = run("--strategies", "fedprox", "--set", "proximal-mu=0.1")
    assert "--set proximal-mu: not allowed" in refused.stderr
    refused = run("--strategies", "fedprox", "--metric", "bleu")
    assert refused.returncode != 0 and refused.stderr.strip().splitlines() == [
        "--metric 'bleu': not allowed; expected one of rouge1, rougeL, exact_match, accuracy, macro_f1"
    ]
    assert not (tmp_path / "out").exists()


def test_the_choice_is_the_best_mean_on_fabricated_runs(tune, tmp_path):
    runs = tmp_path / "runs"
    points = tune.grid_points("fedprox", {"proximal-mu": [0.01, 0.1, 1.0]}) + tune.grid_points("fedavg", {})
    scores = {  # label -> exact match per seed
        "fedprox_proximal-mu_0.01": (0.2, 0.4),
        "fedprox_proximal-mu_0.1": (0.5, 0.3),  # mean 0.4: ties with 1.0; first in grid order
        "fedprox_proximal-mu_1.0": (0.4, 0.4),
        "fedavg": (0.25, 0.35),
    }
    for point in points:
        for seed, exact in enumerate(scores[point.label]):
            write_run(runs / f"{point.label}-seed{seed}", point.strategy, seed, exact, dict(point.values))
    rows, metric = tune.summarize(points, runs, [0, 1])
    assert metric == "exact_match" and [r["mean"]["exact_match"] for r in rows] == pytest.approx([0.3, 0.4, 0.4, 0.3])
    chosen = tune.choose(rows, metric)
    assert chosen["fedprox"]["values"] == {"proximal-mu": 0.1} and chosen["fedavg"]["values"] == {}
    # the tuning's own config (here μ 1) wins a tie, wherever it stands in the grid
    assert tune.choose(rows, metric, {"proximal-mu": 1.0})["fedprox"]["values"] == {"proximal-mu": 1.0}
    # ... but not a point that is merely close to the best
    assert tune.choose(rows, metric, {"proximal-mu": 0.01})["fedprox"]["values"] == {"proximal-mu": 0.1}
    info = {"command": "scripts/tune.py --strategies fedavg,fedprox", "val_fraction": 0.25, "seeds": [0, 1]}
    text = tune.markdown(rows, chosen, metric=metric, info={**info, "changed": {"local-steps": 5}})
    assert "| fedprox | proximal-mu=0.1 | 0.600 | 0.500 | 0.400 | +0.100 | 0.500 0.300 | ✓ |" in text
    assert "| fedavg | – | 0.600 | 0.500 | 0.300 | +0.000 | 0.250 0.350 | ✓ |" in text and "local-steps=5" in text
    conf = functools.partial(
        tune.conf_text,
        chosen,
        command=info["command"],
        changed={"local-steps": 5},
        reference={"proximal-mu": 0.01, "learning-rate": 1e-3},
        val_fraction=0.25,
        path=Path("conf/tuned-x.toml"),
    )
    text = conf(refit=False, num_clients=8)
    assert "compare.py --variants conf/tuned-x.toml --seeds 0,1" in text
    # FedProx's choice is not its default: its runs must not collide with the benchmark's fedprox runs.
    assert tomllib.loads(text) == {
        "fedprox-tuned": {"strategy": "fedprox", "local-steps": 5, "val-fraction": 0.25, "proximal-mu": 0.1},
        "fedavg": {"strategy": "fedavg", "local-steps": 5, "val-fraction": 0.25},
    }
    # Refit: every training example; a strategy at its defaults is then the benchmark's own run.
    text = conf(refit=True, num_clients=32)
    assert tomllib.loads(text) == {
        "fedprox-tuned": {"strategy": "fedprox", "local-steps": 5, "proximal-mu": 0.1},
        "fedavg": {"strategy": "fedavg", "local-steps": 5},
    }
    assert "refit on every training" in text and "compare.py --num-clients 32 --strategies" in text


def test_a_point_without_every_seed_is_left_out(tune, tmp_path):
    points = tune.grid_points("fedala", {"fedala-eta": [1.0, 100.0]})
    write_run(tmp_path / "fedala_fedala-eta_1.0-seed0", "fedala", 0, 0.1)
    write_run(tmp_path / "fedala_fedala-eta_100.0-seed0", "fedala", 0, 0.3, {"fedala-eta": 100.0})
    write_run(tmp_path / "fedala_fedala-eta_100.0-seed1", "fedala", 1, 0.3, {"fedala-eta": 100.0})
    rows, _ = tune.summarize(points, tmp_path, [0, 1])
    assert [r["label"] for r in rows] == ["fedala_fedala-eta_100.0"]
    with pytest.raises(SystemExit, match="no finished grid point"):
        tune.summarize(points, tmp_path, [2])


def test_comparison_tables_show_the_tuned_knobs(tmp_path):
    assert strategy_settings("fedprox", {"proximal-mu": 0.1, "fedamp-sigma": 5.0, "learning-rate": 0.001}) == (
        ("proximal-mu", 0.1),
    )
    assert strategy_settings("fedavg", {"learning-rate": 0.003, "proximal-mu": 1.0}) == (("learning-rate", 0.003),)
    # aggregation-weights is a knob of the strategies that average, not of FedBip's similarity weights.
    assert strategy_settings("feddpa", {"aggregation-weights": "uniform"}) == (("aggregation-weights", "uniform"),)
    assert strategy_settings("fedbip", {"aggregation-weights": "uniform"}) == ()
    assert strategy_settings("feddpa", {"feddpa-max-weight": 0.3}) == (("feddpa-max-weight", 0.3),)
    # A preset's own values are its defaults: only a change from them is a setting.
    preset = {"weighting": "zscore-softmax", "weighting-z-temperature": 1.0}
    assert strategy_settings("fedbip-plus", preset) == ()
    assert strategy_settings("fedbip-plus", {**preset, "server-step": "fedexp"}) == (("server-step", "fedexp"),)
    assert settings_text(strategy_settings("fedbip", preset)) == "weighting=zscore-softmax"
    write_run(tmp_path / "a", "fedprox", 0, 0.4, {"proximal-mu": 0.1})
    write_run(tmp_path / "b", "fedavg", 0, 0.3)
    runs = [load_run(tmp_path / "a"), load_run(tmp_path / "b")]
    assert [row["settings"] for row in summary_rows(runs)] == ["proximal-mu=0.1", ""]
    text = markdown(runs)
    assert "own validation split" in text and "| strategy | settings | seeds |" in text
    assert "| fedprox | proximal-mu=0.1 | 0 |" in text and "| fedavg | – | 0 |" in text
    # A value every run shares (a conf file's learning rate) is said once, not in every row.
    write_run(tmp_path / "c", "fedprox", 0, 0.4, {"proximal-mu": 0.1, "learning-rate": 0.01})
    write_run(tmp_path / "d", "fedavg", 0, 0.3, {"learning-rate": 0.01})
    text = markdown([load_run(tmp_path / "c"), load_run(tmp_path / "d")])
    assert "| fedprox | proximal-mu=0.1 | 0 |" in text and "| fedavg | – | 0 |" in text
    assert "; every run: learning-rate=0.01." in text
    text = markdown([load_run(tmp_path / "c"), load_run(tmp_path / "b")])  # not shared: in the column
    assert "| fedprox | proximal-mu=0.1, learning-rate=0.01 | 0 |" in text and "every run" not in text
