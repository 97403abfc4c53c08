"""Tune each strategy's own knobs on the clients' validation splits, never on their test items.

Every strategy runs each point of its grid (the product of the values of its keys) with
``val-fraction`` of every client's training examples held out and ``eval-split =
"validation"``, through scripts/compare.py (same run config otherwise, one fresh process a
run, finished runs reused: an interrupted tuning continues) into ``<out>/runs/<point>-seed<k>/``.
Per strategy the point with the best mean over seeds of the last round's personalized primary
metric (or ``--metric``) on validation is chosen (ties: the point at the strategy's defaults, else
the first in grid order). Writes:

    <out>/tune.json     every point's scores per seed and their mean, the command, the settings, the choice
    <out>/tune.md       the same as tables
    <out>/comparison.md compare.py's tables of the grid (on validation, each point's settings beside it)
    --write-conf FILE   the chosen values as a compare.py --variants file, one [strategy] table each

Default grids (``--grid`` replaces a key's values, or adds a key the strategy declares):

    fedprox   proximal-mu 0.001, 0.01, 0.1, 1
    fedamp    fedamp-sigma 5, 50, 200 × fedamp-lambda 0.01, 0.1 × fedamp-self-weight 0.3, 0.5, 0.8
    fedala    fedala-eta 1, 10, 100, 1000, 10000
    ffa-lora  learning-rate 1, 2, 5 and 10 times the runs' (its paper tunes it apart, well above LoRA's)

Any other strategy (e.g. fedavg, the reference) runs once at its defaults unless ``--grid``
gives it a key. A strategy's keys are its own option component's (fedbilevel.comparison.
strategy_keys) and ``optimizer``, ``momentum``, ``learning-rate``. Example (docs/BENCHMARKS.md, "Tuning the baselines"):

    .venv/bin/python scripts/tune.py --strategies fedavg,fedprox,fedamp,fedala --seeds 0 \\
        --out outputs/tune-synthetic --write-conf outputs/tuned-synthetic.toml

then on the test split, each table of the conf file holding the tuning's run config (the validation
items stay held out, so clients train on the examples they were tuned with):

    .venv/bin/python scripts/compare.py --variants outputs/tuned-synthetic.toml --seeds 0,1 --out outputs/compare-tuned

With ``--refit`` the conf file leaves ``val-fraction`` at 0 instead: the test-split runs train on
every training example with the chosen values (the usual refit after model selection). A strategy
whose choice is its default then runs exactly the benchmark's own config under its own name, and
one tuned away from it is ``<strategy>-tuned``, so ``compare.py --strategies <the benchmark's
others> --variants <conf> --out <the benchmark's folder>`` reuses the finished runs and runs only
the tuned and new ones.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from fedbilevel.comparison import load_run, settings_text, strategy_keys
from fedbilevel.config import ConfigError, RunConfig, parse_assignment, resolve
from fedbilevel.options import defaults
from fedbilevel.results import METRIC_LABELS
from fedbilevel.strategies import strategy_names

COMPARE = Path(__file__).resolve().parent / "compare.py"
DEFAULT_GRIDS: dict[str, dict[str, list[Any]]] = {
    "fedprox": {"proximal-mu": [0.001, 0.01, 0.1, 1.0]},
    # FedAMP's paper names σ, λ and the self weight ξᵢᵢ as its knobs.
    "fedamp": {"fedamp-sigma": [5.0, 50.0, 200.0], "fedamp-lambda": [0.01, 0.1], "fedamp-self-weight": [0.3, 0.5, 0.8]},
    # On LoRA adapters FedALA's weights move off 1 about in proportion to η (docs/BENCHMARKS.md): the synthetic
    # federation personalized at η 100, Flan-8 only at 10⁴.
    "fedala": {"fedala-eta": [1.0, 10.0, 100.0, 1000.0, 10000.0]},
}
# Grids of multiples of the run's learning rate. FFA-LoRA trains B alone from a frozen A, so its learning
# rate does the work of LoRA's α/r; its paper tunes it apart and finds it best well above LoRA's.
LEARNING_RATE_MULTIPLES: dict[str, tuple[float, ...]] = {"ffa-lora": (1.0, 2.0, 5.0, 10.0)}
# The keys tune.py sets for every run itself.
OWN_KEYS = ("strategy", "seed", "output-dir", "run-name", "eval-split", "val-fraction")
_LABEL = re.compile(r"[A-Za-z0-9_.+-]+")


@dataclass(frozen=True)
class Point:
    """One grid point: a strategy and its values of the grid's keys (in grid order)."""

    strategy: str
    values: tuple[tuple[str, Any], ...]

    @property
    def label(self) -> str:
        """The variant label (run folder prefix): ``fedprox_proximal-mu_0.1``; the strategy when no keys."""
        return "_".join([self.strategy, *(f"{key}_{value}" for key, value in self.values)])

    @property
    def setting(self) -> str:
        """``key=value, ...`` ("–" for none)."""
        return setting(dict(self.values))


def setting(values: dict[str, Any]) -> str:
    """``key=value, ...`` of a grid point's values ("–" for none)."""
    return settings_text(values.items()) or "–"


def parse_grid(texts: list[str], strategies: list[str]) -> dict[str, dict[str, list[Any]]]:
    """Each strategy's grid: the defaults, with each ``[STRATEGY:]KEY=V1,V2`` of ``texts`` applied.

    A qualified key applies to that strategy; a bare one to every listed strategy that declares
    it. Values are TOML literals (a bare word is a string).

    Raises
    ------
    SystemExit
        One line naming the ``--grid`` entry and, for a key no listed strategy declares, each
        strategy's keys.
    """
    grids = {strategy: {key: list(v) for key, v in DEFAULT_GRIDS.get(strategy, {}).items()} for strategy in strategies}
    for text in texts:
        target, _, assignment = text.partition(":") if ":" in text.partition("=")[0] else ("", "", text)
        key, sep, raw = assignment.partition("=")
        key = key.strip()
        values = [parse_assignment(f"{key}={part}")[1] for part in raw.split(",") if part.strip()]
        if not sep or not key or not values:
            raise SystemExit(
                f"--grid {text!r} is not allowed; expected [STRATEGY:]KEY=V1,V2,..., e.g. proximal-mu=0.01,0.1"
            )
        if target and target not in strategies:
            raise SystemExit(
                f"--grid {text!r}: strategy {target!r} is not tuned; --strategies lists {', '.join(strategies)}"
            )
        users = [s for s in ([target] if target else strategies) if key in strategy_keys(s)]
        if not users:
            keys = "; ".join(f"{s}: {', '.join(strategy_keys(s))}" for s in ([target] if target else strategies))
            raise SystemExit(f"--grid key {key!r} is not used by {target or ', '.join(strategies)}; their keys: {keys}")
        for strategy in users:
            grids[strategy][key] = values
    return grids


def with_learning_rate_multiples(
    grids: dict[str, dict[str, list[Any]]], learning_rate: float
) -> dict[str, dict[str, list[Any]]]:
    """``grids`` with a ``learning-rate`` grid of multiples of ``learning_rate`` (the runs' resolved one)
    for each strategy of :data:`LEARNING_RATE_MULTIPLES` whose grid does not set it already (``--grid``)."""
    out = {strategy: dict(grid) for strategy, grid in grids.items()}
    for strategy, grid in out.items():
        if strategy in LEARNING_RATE_MULTIPLES and "learning-rate" not in grid:
            grid["learning-rate"] = [float(f"{learning_rate * m:.6g}") for m in LEARNING_RATE_MULTIPLES[strategy]]
    return out


def grid_points(strategy: str, grid: dict[str, list[Any]]) -> list[Point]:
    """The grid's points in order (the last key varies fastest); one point without keys."""
    keys = list(grid)
    points = [Point(strategy, tuple(zip(keys, combo))) for combo in itertools.product(*(grid[k] for k in keys))]
    bad = [p.label for p in points if not _LABEL.fullmatch(p.label)]
    if bad:
        raise SystemExit(
            f"--grid: point {bad[0]!r} cannot name a run folder; expected values of letters, digits, . _ + -"
        )
    return points


def point_scores(point: Point, runs_dir: Path, seeds: list[int]) -> dict[int, dict[str, float]] | None:
    """Per seed, the last round's personalized scores of ``point`` (all metrics); None unless every seed finished."""
    scores = {}
    for seed in seeds:
        folder = runs_dir / f"{point.label}-seed{seed}"
        try:
            run = load_run(folder, point.label)
        except ValueError:
            return None
        scores[seed] = dict(run.last["personalized_mean"])
    return scores


def at_reference(values: dict[str, Any], reference: dict[str, Any] | None) -> bool:
    """Whether a point's ``values`` are all ``reference``'s (the tuning's own run config: the strategy's defaults)."""
    return reference is not None and all(reference.get(key) == value for key, value in values.items())


def choose(
    rows: list[dict[str, Any]], metric: str, reference: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Per strategy, the row with the highest ``mean[metric]``.

    On a tie the row at ``reference`` (:func:`at_reference`) wins, so a default is left only on
    evidence; otherwise the first in grid order.
    """
    chosen: dict[str, dict[str, Any]] = {}
    for row in rows:
        best = chosen.get(row["strategy"])
        if (
            best is None
            or row["mean"][metric] > best["mean"][metric]
            or (
                row["mean"][metric] == best["mean"][metric]
                and at_reference(row["values"], reference)
                and not at_reference(best["values"], reference)
            )
        ):
            chosen[row["strategy"]] = row
    return chosen


def summarize(points: list[Point], runs_dir: Path, seeds: list[int]) -> tuple[list[dict[str, Any]], str]:
    """Rows of the finished points (strategy, label, values, per-seed scores, the mean of each of the runs'
    metrics) and the primary metric."""
    rows, metric = [], None
    for point in points:
        scores = point_scores(point, runs_dir, seeds)
        if scores is None:
            continue
        if metric is None:
            first = load_run(runs_dir / f"{point.label}-seed{seeds[0]}")
            metric, metrics = first.primary_metric, first.metrics
        rows.append(
            {
                "strategy": point.strategy,
                "label": point.label,
                "values": dict(point.values),
                "scores": {str(seed): s for seed, s in scores.items()},
                "mean": {m: float(np.mean([s[m] for s in scores.values()])) for m in metrics},
            }
        )
    if not rows:
        raise SystemExit(f"no finished grid point in {runs_dir}")
    return rows, metric


def markdown(rows: list[dict[str, Any]], chosen: dict[str, dict[str, Any]], *, metric: str, info: dict) -> str:
    """tune.md: the command, the settings, every point's validation scores, the choices."""
    metrics = list(rows[0]["mean"])
    reference = chosen.get("fedavg")
    lines = [
        "# Tuning on the validation split",
        "",
        f"`{info['command']}`",
        "",
        f"Each client holds out val-fraction {info['val_fraction']} of its training examples and scores them"
        f' (`eval-split = "validation"`); seeds {" ".join(map(str, info["seeds"]))}; run config away from'
        f" the defaults: {settings_text(info['changed'].items()) or 'none'}. Score: the last"
        f" round's personalized {METRIC_LABELS[metric]} (mean over clients, then over seeds); the chosen point"
        " (✓) has the highest; on ties the strategy's defaults, else the first in grid order"
        + ("; *vs fedavg*: its difference to FedAvg's." if reference else "."),
        "",
        "| strategy | setting | "
        + " | ".join(f"{METRIC_LABELS[m]} (validation)" for m in metrics)
        + (" | vs fedavg" if reference else "")
        + f" | {METRIC_LABELS[metric]} per seed | chosen |",
        "|---|---|" + "---|" * (len(metrics) + bool(reference)) + "---|---|",
    ]
    for row in rows:
        per_seed = " ".join(f"{s[metric]:.3f}" for s in row["scores"].values())
        difference = f" | {row['mean'][metric] - reference['mean'][metric]:+.3f}" if reference else ""
        mark = "✓" if chosen[row["strategy"]] is row else ""
        cells = " | ".join(f"{row['mean'][m]:.3f}" for m in metrics)
        lines.append(f"| {row['strategy']} | {setting(row['values'])} | {cells}{difference} | {per_seed} | {mark} |")
    return "\n".join(lines) + "\n"


def conf_text(
    chosen: dict[str, dict[str, Any]],
    *,
    command: str,
    changed: dict[str, Any],
    reference: dict[str, Any],
    val_fraction: float,
    refit: bool,
    num_clients: int,
    path: Path,
) -> str:
    """The chosen values as the compare.py ``--variants`` file ``path``.

    One table each: ``changed`` (the tuning's run config away from the defaults), ``val-fraction``
    unless ``refit`` (then 0: the test-split runs train on every training example), and the chosen
    values. A strategy whose choice is ``reference``'s (the tuning's own config: its defaults) keeps
    its name, so its runs are the benchmark's own; one tuned away from it is ``<strategy>-tuned``,
    so its runs never collide with the benchmark's runs of the strategy at its defaults.
    """
    clients = f" --num-clients {num_clients}" if num_clients != 8 else ""
    if refit:
        held_out = [
            "# Every table also holds the tuning's run config, with val-fraction back at 0: refit on every training",
            "# example with the chosen values (eval-split is back at test). Into the benchmark's own folder, naming",
            "# its other strategies so that its tables stay whole (its finished runs are reused):",
            f"#   .venv/bin/python scripts/compare.py{clients} --strategies <the benchmark's others> \\",
            f"#       --variants {path} --seeds 0,1 --out <the benchmark's folder>",
        ]
    else:
        held_out = [
            "# Every table also holds the tuning's run config (its val-fraction too, so that clients train on the",
            "# examples they were tuned with; eval-split is back at test). Compare them on the test split:",
            f"#   .venv/bin/python scripts/compare.py{clients} --variants {path} --seeds 0,1 \\",
            "#       --out outputs/compare-tuned",
        ]
    header = [
        "# Each baseline's own knobs, tuned on the clients' validation splits (never the test items) by:",
        f"#   {command}",
        *held_out,
        "",
    ]
    shared = {**changed, **({} if refit else {"val-fraction": val_fraction})}
    tables = {}
    for strategy, row in chosen.items():
        tables[strategy if at_reference(row["values"], reference) else f"{strategy}-tuned"] = {
            "strategy": strategy,
            **shared,
            **row["values"],
        }
    return "\n".join(header) + tomli_w.dumps(tables)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--strategies", required=True, help="comma-separated strategies to tune (e.g. fedavg,fedprox)")
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="[STRATEGY:]KEY=V1,V2",
        help="a key's grid values (repeatable); replaces that key's default grid",
    )
    parser.add_argument("--seeds", default="0", help="comma-separated run seeds (default: 0)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--val-fraction", type=float, default=0.25, help="share of each client's training examples held out (0.25)"
    )
    parser.add_argument(
        "--run-config", action="append", default=[], metavar="FILE.toml", help="run-config file(s) applied to every run"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="run-config override for every run (repeatable)"
    )
    parser.add_argument("--num-clients", type=int, default=8, help="simulated SuperNodes = clients (default: 8)")
    parser.add_argument("--cpus-per-client", type=float, default=1.0, help="Ray CPUs per client (default: 1)")
    parser.add_argument("--write-conf", type=Path, metavar="FILE.toml", help="write the chosen values here")
    parser.add_argument(
        "--metric",
        help="choose by this metric (default: the runs' primary one: exact_match on synthetic data, rougeL on "
        "Flan, accuracy on images); with --report-only, a choice by another metric without rerunning",
    )
    parser.add_argument(
        "--refit",
        action="store_true",
        help="the --write-conf file trains on every training example (val-fraction 0), not on the tuning's share",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="only tabulate the grid points that finished (runs nothing)"
    )
    args = parser.parse_args()

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in strategy_names()]
    if not strategies or unknown or len(set(strategies)) != len(strategies):
        raise SystemExit(
            f"--strategies: {args.strategies!r} is not allowed; "
            f"expected distinct names of {', '.join(strategy_names())}"
        )
    overrides = dict(parse_assignment(a) for a in args.set)
    try:
        learning_rate = resolve(overrides, args.run_config)["learning-rate"]
    except ConfigError as error:
        raise SystemExit(str(error)) from None
    explicit = parse_grid(args.grid, strategies)
    # --set learning-rate is the base of the multiples' grids, and the value of every other strategy.
    taken = [k for k in overrides if k in OWN_KEYS or any(k in grid for grid in explicit.values())]
    grids = with_learning_rate_multiples(explicit, learning_rate)
    points = [point for strategy in strategies for point in grid_points(strategy, grids[strategy])]
    if taken:
        raise SystemExit(
            f"--set {taken[0]}: not allowed; tune.py sets it for every run "
            "(use --strategies, --seeds, --out, --val-fraction, --grid)"
        )
    if args.metric is not None and args.metric not in METRIC_LABELS:
        raise SystemExit(f"--metric {args.metric!r}: not allowed; expected one of {', '.join(METRIC_LABELS)}")
    if args.refit and not args.write_conf:
        raise SystemExit("--refit: not allowed without --write-conf (it says what the written conf file trains on)")
    own = {"eval-split": "validation", "val-fraction": args.val_fraction}
    try:
        # A plain strategy: a preset's values (fedbip-plus's weighting) named by a --run-config's strategy
        # would otherwise count as changed keys, and go into every table of the conf file.
        base = resolve({**overrides, **own, "strategy": "fedavg"}, args.run_config)
        for point in points:  # every point's values checked before anything runs
            resolve({**overrides, **own, "strategy": point.strategy, **dict(point.values)}, args.run_config)
    except ConfigError as error:
        raise SystemExit(str(error)) from None

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid.toml").write_text(
        tomli_w.dumps({p.label: {"strategy": p.strategy, **dict(p.values)} for p in points}), encoding="utf-8"
    )
    command = [
        sys.executable,
        str(COMPARE),
        "--variants",
        str(out / "grid.toml"),
        "--seeds",
        args.seeds,
        "--out",
        str(out),
        "--num-clients",
        str(args.num_clients),
        "--cpus-per-client",
        str(args.cpus_per_client),
        *(f"--run-config={path}" for path in args.run_config),
        *(f"--set={a}" for a in [*args.set, *(f"{k}={json.dumps(v)}" for k, v in own.items())]),
        *(["--report-only"] if args.report_only else []),
    ]
    finished = subprocess.run(command, check=False)
    if finished.returncode != 0:
        raise SystemExit(finished.returncode)

    seeds = [int(s) for s in args.seeds.split(",")]  # compare.py has checked them
    rows, metric = summarize(points, out / "runs", seeds)
    if args.metric is not None:
        if args.metric not in rows[0]["mean"]:
            raise SystemExit(f"--metric {args.metric!r}: not allowed; the runs record {', '.join(rows[0]['mean'])}")
        metric = args.metric
    settings = RunConfig.from_run_config(base).to_run_config()
    chosen = choose(rows, metric, settings)
    default = defaults(RunConfig)
    info = {
        # The command that runs the grid (--report-only only rereads it: the runs' own folders hold their configs).
        "command": shlex.join(["scripts/tune.py", *(a for a in sys.argv[1:] if a != "--report-only")]),
        "val_fraction": args.val_fraction,
        "refit": args.refit,
        "seeds": seeds,
        "changed": {k: v for k, v in settings.items() if v != default[k] and k not in OWN_KEYS},
    }
    report = {
        **info,
        "metric": metric,
        "settings": settings,
        "grids": grids,
        "points": rows,
        "chosen": {strategy: row["values"] for strategy, row in chosen.items()},
    }
    (out / "tune.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    text = markdown(rows, chosen, metric=metric, info=info)
    (out / "tune.md").write_text(text, encoding="utf-8")
    print(text)
    written = [out / "tune.json", out / "tune.md"]
    if args.write_conf:
        text = conf_text(
            chosen,
            command=info["command"],
            changed=info["changed"],
            reference=settings,
            val_fraction=args.val_fraction,
            refit=args.refit,
            num_clients=args.num_clients,
            path=args.write_conf,
        )
        args.write_conf.write_text(text, encoding="utf-8")
        written.append(args.write_conf)
    print("wrote:\n  " + "\n  ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
