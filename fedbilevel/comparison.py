"""Compare finished runs: tables (CSV, Markdown) and plots (PNG) across strategies and seeds.

Reads what every run leaves behind (``config.json``, ``results.json``; see
:mod:`fedbilevel.results`), so it works on runs from ``scripts/compare.py``, from
``flwr run`` or from a deployment alike. Personalized score = the unweighted mean over
clients of each client's own adapter on its own test split (validation split for runs with
``eval-split = "validation"``, e.g. scripts/tune.py's).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedbilevel.config import RunConfig
from fedbilevel.options import declared, defaults
from fedbilevel.protocol import TEXT_METRICS
from fedbilevel.results import METRIC_LABELS

OPTION_METRIC = "option_accuracy"  # a client's eval score where its task lists options
OPTION_ITEMS = "option_correct"  # its per-item scores
REFERENCE = "local"  # personalization is measured against training alone

# A strategy's own knobs: the keys of the RunConfig component it reads (field name), plus the
# learning rate, which every strategy's clients train with (tuned per strategy where needed).
_OWN_COMPONENT = {
    "fedprox": "fedprox",
    "fedamp": "fedamp",
    "fedala": "fedala",
    "fedbip": "fedbip",
    "fedbip-l": "fedbip",
    "fedbip-plus": "fedbip",
    "fedbip-plus-l": "fedbip",
}
SHARED_KNOBS = ("learning-rate",)
_DEFAULTS = defaults(RunConfig)


def strategy_keys(strategy: str) -> tuple[str, ...]:
    """The run-config keys that tune ``strategy``: its own option component's, then :data:`SHARED_KNOBS`."""
    components = {field.name: field.metadata.get("component") for field in dataclasses.fields(RunConfig)}
    own = _OWN_COMPONENT.get(strategy)
    return (*(key for key, _ in declared(components[own])), *SHARED_KNOBS) if own else SHARED_KNOBS


def strategy_settings(strategy: str, run_config: dict[str, Any]) -> str:
    """``key=value, ...`` of the keys of :func:`strategy_keys` that ``run_config`` sets away from their
    defaults (absent keys count as defaults); "" when none."""
    return ", ".join(
        f"{key}={run_config[key]}"
        for key in strategy_keys(strategy)
        if key in run_config and run_config[key] != _DEFAULTS[key]
    )


@dataclass(frozen=True)
class Run:
    """One finished run, as read from its folder."""

    folder: Path
    label: str
    strategy: str
    seed: int
    primary_metric: str
    clients: dict[str, dict[str, Any]]
    rounds: list[dict[str, Any]]
    seconds: float
    metrics: tuple[str, ...] = TEXT_METRICS
    settings: str = ""  # the strategy's knobs away from their defaults (strategy_settings)
    split: str = "test"  # what the clients scored (eval-split)

    @property
    def evaluated(self) -> list[dict[str, Any]]:
        """Rounds with a personalized evaluation."""
        return [r for r in self.rounds if "personalized_mean" in r]

    @property
    def last(self) -> dict[str, Any]:
        """The last evaluated round."""
        return self.evaluated[-1]

    @property
    def best(self) -> dict[str, Any]:
        """The evaluated round with the highest personalized primary metric (earliest on ties)."""
        return max(self.evaluated, key=lambda r: r["personalized_mean"][self.primary_metric])


def load_run(folder: str | Path, label: str | None = None) -> Run:
    """Read a run folder; ``label`` names it in tables and plots (default: its strategy).

    A run without any evaluated round is an error.
    """
    folder = Path(folder)
    for name in ("config.json", "results.json"):
        if not (folder / name).is_file():
            raise ValueError(
                f"run folder {str(folder)!r}: {name} is missing; expected a folder written by a fedbilevel run"
            )
    config = json.loads((folder / "config.json").read_text())
    results = json.loads((folder / "results.json").read_text())
    run = Run(
        folder=folder,
        label=label or results["strategy"],
        strategy=results["strategy"],
        seed=int(config["seed"]),
        primary_metric=results["summary"].get("primary_metric", "rougeL"),
        clients=results["clients"],
        rounds=results["rounds"],
        seconds=float(results["summary"].get("seconds", 0.0)),
        metrics=tuple(results["summary"].get("metrics", TEXT_METRICS)),
        settings=strategy_settings(results["strategy"], config["run_config"]),
        split=config["run_config"].get("eval-split", "test"),
    )
    if not run.evaluated:
        raise ValueError(f"run folder {str(folder)!r}: no evaluated round in results.json")
    return run


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else math.nan


def _format(mean: float, std: float) -> str:
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def group_by_label(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs per label (strategy or variant), labels in first-seen order, seeds ascending."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.label, []).append(run)
    return {name: sorted(group, key=lambda r: r.seed) for name, group in groups.items()}


def bootstrap_interval(
    runs: Sequence[Run],
    metric: str,
    *,
    clients: Sequence[str] | None = None,
    samples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the last-round personalized ``metric``, over seeds and test items.

    Each resample draws the runs (seeds) with replacement and, inside every drawn run, each
    client's test items with replacement; its value is the mean over seeds of the mean over
    clients of the client's mean item score (the personalized score). ``clients`` restricts
    the mean to those clients (default: all). None when a run did not record per-item scores
    (``eval_items``, runs before they were recorded) for one of the clients.
    """
    per_run = [_item_scores(run, metric, clients) for run in runs]
    if any(scores is None for scores in per_run):
        return None
    return _bootstrap(per_run, samples=samples, seed=seed, level=level)


def paired_difference_interval(
    runs: Sequence[Run],
    reference: Sequence[Run],
    metric: str,
    *,
    samples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float] | None:
    """The last-round personalized ``metric`` of ``runs`` minus that of ``reference``, paired.

    Runs are paired by seed (same seed, so the same test items), over the seeds both have:
    each resample draws seeds and test items once and scores both strategies on them, so item
    difficulty cancels. Returns (observed difference, low, high), or None when they share no
    seed or lack per-item scores.
    """
    by_seed = {run.seed: run for run in reference}
    shared = [run for run in runs if run.seed in by_seed]
    if not shared:
        return None
    per_run = []
    for run in shared:
        mine, theirs = _item_scores(run, metric), _item_scores(by_seed[run.seed], metric)
        if mine is None or theirs is None or [len(a) for a in mine] != [len(b) for b in theirs]:
            return None
        per_run.append([a - b for a, b in zip(mine, theirs)])
    observed = float(np.mean([np.mean([client.mean() for client in run]) for run in per_run]))
    return (observed, *_bootstrap(per_run, samples=samples, seed=seed, level=level))


def _item_scores(run: Run, metric: str, clients: Sequence[str] | None = None) -> list[np.ndarray] | None:
    """Per client (in order), the last round's per-item ``metric`` scores; None if any is missing."""
    items = run.last.get("eval_items") or {}
    wanted = sorted(items, key=int) if clients is None else list(clients)
    if not wanted or any(client not in items or metric not in items[client] for client in wanted):
        return None
    return [np.asarray(items[client][metric], dtype=np.float64) for client in wanted]


def _bootstrap(per_run: list[list[np.ndarray]], *, samples: int, seed: int, level: float) -> tuple[float, float]:
    """Percentile interval of the mean over runs of the mean over clients of item means,
    resampling runs, then each client's items, with replacement."""
    rng = np.random.default_rng(seed)
    values = np.empty(samples)
    for k in range(samples):
        drawn = [per_run[i] for i in rng.integers(len(per_run), size=len(per_run))]
        values[k] = np.mean(
            [np.mean([client[rng.integers(len(client), size=len(client))].mean() for client in run]) for run in drawn]
        )
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def cross_task_of(run: Run) -> dict[str, Any] | None:
    """The last evaluated round's cross-task matrix (eval-cross), or None if it has none or no client's row."""
    cross = run.last.get("cross_task")
    if cross is None or all(row is None for row in cross["items"]):
        return None
    return cross


def summary_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Per strategy: mean and std over seeds of the personalized scores, last and best round,
    and a 95% bootstrap interval (seeds and test items) of the last round's primary metric.

    When any run has cross-task scores (eval-cross), also the seeds that have them (``cross_seeds``)
    and the mean and std over those seeds of the primary metric's own-task and other-task means
    (``cross_own_*``, ``cross_other_*``; NaN for a strategy without any).
    """
    rows = []
    cross = any(cross_task_of(run) for run in runs)
    for strategy, group in group_by_label(runs).items():
        row: dict[str, Any] = {"strategy": strategy, "settings": group[0].settings, "seeds": _seeds(group)}
        for when in ("last", "best"):
            for metric in group[0].metrics:
                mean, std = _mean_std([getattr(r, when)["personalized_mean"][metric] for r in group])
                row[f"{when}_{metric}_mean"], row[f"{when}_{metric}_std"] = mean, std
        interval = bootstrap_interval(group, group[0].primary_metric)
        row["last_primary_ci_low"], row["last_primary_ci_high"] = interval if interval else (math.nan, math.nan)
        row["best_round_mean"] = float(np.mean([r.best["round"] for r in group]))
        row["minutes_mean"] = float(np.mean([r.seconds for r in group])) / 60
        if cross:
            row.update(_cross_task_columns(group))
        rows.append(row)
    return rows


def _cross_task_columns(group: Sequence[Run]) -> dict[str, Any]:
    """The summary row's cross-task columns for one strategy's runs (see :func:`summary_rows`)."""
    with_cross = [run for run in group if cross_task_of(run)]
    primary = group[0].primary_metric
    columns: dict[str, Any] = {"cross_seeds": _seeds(with_cross)}
    for which in ("own", "other"):
        values = [cross_task_of(run)[f"{which}_task_mean"][primary] for run in with_cross]
        values = [value for value in values if value is not None]  # other: None with a single task
        mean, std = _mean_std(values) if values else (math.nan, math.nan)
        columns[f"cross_{which}_{primary}_mean"], columns[f"cross_{which}_{primary}_std"] = mean, std
    return columns


def per_client_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Per strategy and client: last-round scores, mean and std over seeds (failed evaluations skipped)."""
    rows = []
    for strategy, group in group_by_label(runs).items():
        for client, info in group[0].clients.items():
            scores = [r.last["eval"][client] for r in group if client in r.last["eval"]]
            row: dict[str, Any] = {
                "strategy": strategy,
                "client": int(client),
                "task": info.get("task"),
                "majority_exact_match": info.get("majority_exact_match"),
                "seeds": len(scores),
            }
            for metric in group[0].metrics:
                mean, std = _mean_std([s[metric] for s in scores]) if scores else (math.nan, math.nan)
                row[f"{metric}_mean"], row[f"{metric}_std"] = mean, std
            options = [s[OPTION_METRIC] for s in scores if OPTION_METRIC in s]  # none where the task lists no options
            row[f"{OPTION_METRIC}_mean"], row[f"{OPTION_METRIC}_std"] = (
                _mean_std(options) if options else (math.nan, math.nan)
            )
            rows.append(row)
    return rows


def option_clients(run: Run) -> list[str]:
    """Clients whose tasks list options (scored by option likelihood in the last round)."""
    return [client for client, scores in run.last["eval"].items() if OPTION_METRIC in scores]


def option_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Per strategy: option accuracy averaged over the clients whose tasks list options, last
    round, mean and std over seeds and a 95% bootstrap interval (seeds and test items); empty
    when no run scored options."""
    rows = []
    for strategy, group in group_by_label(runs).items():
        clients = option_clients(group[0])
        if not clients or any(option_clients(run) != clients for run in group):
            continue
        mean, std = _mean_std([np.mean([run.last["eval"][c][OPTION_METRIC] for c in clients]) for run in group])
        interval = bootstrap_interval(group, OPTION_ITEMS, clients=clients)
        low, high = interval if interval else (math.nan, math.nan)
        rows.append(
            {
                "strategy": strategy,
                "seeds": _seeds(group),
                "clients": len(clients),
                "mean": mean,
                "std": std,
                "ci_low": low,
                "ci_high": high,
            }
        )
    return rows


def clients_mean(run: Run, clients: Sequence[int], metric: str) -> float:
    """Mean last-round ``metric`` over ``clients`` (partition ids); each must have been evaluated."""
    evaluated = run.last["eval"]
    missing = [c for c in clients if str(c) not in evaluated]
    if missing:
        raise ValueError(f"run {str(run.folder)!r}: clients {missing} were not evaluated in round {run.last['round']}")
    return sum(evaluated[str(c)][metric] for c in clients) / len(clients)


def robustness_rows(conditions: dict[str, Sequence[Run]], faulty: Sequence[int], metric: str) -> list[dict[str, Any]]:
    """The other clients' final score per strategy and seed under each condition (e.g. honest, faulty, absent).

    "others": every client but ``faulty``; "others, other tasks": also without the faulty
    clients' task partners, whose loss of a same-task partner is not the faulty update's doing.
    Rows hold one value per condition (None where that run is missing) and, per strategy, the
    seed-mean row ``seed = "mean"``.
    """
    runs = {(label, r.strategy, r.seed): r for label, group in conditions.items() for r in group}
    keys = sorted({(strategy, seed) for _, strategy, seed in runs})
    rows: list[dict[str, Any]] = []
    for strategy in dict.fromkeys(strategy for strategy, _ in keys):
        strategy_rows = []
        for _, seed in [k for k in keys if k[0] == strategy]:
            some = next(r for (_, s, sd), r in runs.items() if s == strategy and sd == seed)
            faulty_tasks = {some.clients[str(c)].get("task") for c in faulty}
            others = [int(c) for c in some.clients if int(c) not in faulty]
            unrelated = [c for c in others if some.clients[str(c)].get("task") not in faulty_tasks]
            for group_name, members in (("others", others), ("others, other tasks", unrelated)):
                row: dict[str, Any] = {"strategy": strategy, "seed": seed, "clients": group_name}
                for label in conditions:
                    run = runs.get((label, strategy, seed))
                    row[label] = clients_mean(run, members, metric) if run is not None else None
                strategy_rows.append(row)
        for group_name in ("others", "others, other tasks"):
            mean_row: dict[str, Any] = {"strategy": strategy, "seed": "mean", "clients": group_name}
            for label in conditions:
                values = [r[label] for r in strategy_rows if r["clients"] == group_name]
                mean_row[label] = sum(values) / len(values) if values and None not in values else None
            strategy_rows.append(mean_row)
        rows += strategy_rows
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown(runs: Sequence[Run]) -> str:
    """The comparison as Markdown: the summary table, then the per-client table (primary metric)."""
    primary, metrics, split = runs[0].primary_metric, runs[0].metrics, runs[0].split
    header = " | ".join(f"{METRIC_LABELS[m]} {when}" for when in ("last", "best") for m in metrics)
    summary = summary_rows(runs)
    # The tuned knobs beside each strategy, when any run set them (scripts/tune.py's conf files).
    settings = any(row["settings"] for row in summary)
    lines = [
        f"Personalized score (mean over clients of each client's own adapter on its own {split} split),"
        " mean ± std over seeds; *best* is each run's best round by "
        f"{METRIC_LABELS[primary]}.",
        "",
        f"*95% CI*: percentile bootstrap of the last round's {METRIC_LABELS[primary]} over seeds and {split} items"
        " (– where a run recorded no per-item scores)"
        + ("; *settings*: the strategy's keys set away from their defaults." if settings else "."),
        "",
        f"| strategy |{' settings |' if settings else ''} seeds | {header} | {METRIC_LABELS[primary]} last, 95% CI "
        "| best round | minutes |",
        "|---|---|" + "---|" * (2 * len(metrics) + settings) + "---|---|---|",
    ]
    for row in summary:
        cells = [_format(row[f"{when}_{m}_mean"], row[f"{when}_{m}_std"]) for when in ("last", "best") for m in metrics]
        low, high = row["last_primary_ci_low"], row["last_primary_ci_high"]
        ci = "–" if math.isnan(low) else f"[{low:.3f}, {high:.3f}]"
        knobs = f" {row['settings'] or '–'} |" if settings else ""
        lines.append(
            f"| {row['strategy']} |{knobs} {row['seeds']} | "
            + " | ".join(cells)
            + f" | {ci} | {row['best_round_mean']:.1f} | {row['minutes_mean']:.1f} |"
        )
    if "cross_seeds" in summary[0]:
        lines += [
            "",
            f"Cross-task evaluation (eval-cross), {METRIC_LABELS[primary]} of each client's final adapter on each "
            f"task's {split} items: *own task*, the mean over clients of their own task's entry (their own items); "
            "*other tasks*, the mean over clients of the mean over the other tasks' entries (mean ± std over the "
            "seeds with cross-task scores):",
            "",
            "| strategy | seeds | own task | other tasks |",
            "|---|---|---|---|",
        ]
        for row in summary:
            cells = [
                "–"
                if math.isnan(row[f"cross_{w}_{primary}_mean"])
                else _format(row[f"cross_{w}_{primary}_mean"], row[f"cross_{w}_{primary}_std"])
                for w in ("own", "other")
            ]
            lines.append(f"| {row['strategy']} | {row['cross_seeds'] or '–'} | " + " | ".join(cells) + " |")
    groups = group_by_label(runs)
    if REFERENCE in groups:
        header = (
            f"Difference to {REFERENCE} training, {METRIC_LABELS[primary]} last, paired over the seeds both ran "
            "(same seeds and test items resampled for both; an interval that excludes 0 is an ordering):"
        )
        lines += ["", header, "", "| strategy | seeds | difference | 95% CI |", "|---|---|---|---|"]
        reference_seeds = {run.seed for run in groups[REFERENCE]}
        for label, group in groups.items():
            paired = None if label == REFERENCE else paired_difference_interval(group, groups[REFERENCE], primary)
            if paired is not None:
                shared = [run for run in group if run.seed in reference_seeds]
                lines.append(
                    f"| {label} | {_seeds(shared)} | {paired[0]:+.3f} | [{paired[1]:+.3f}, {paired[2]:+.3f}] |"
                )
    clients = runs[0].clients
    lines += [
        "",
        f"Per client, last round, {METRIC_LABELS[primary]} (mean ± std over seeds); *majority*: the exact match of"
        " always giving the client's most common training answer:",
        "",
        "| client | task | majority | " + " | ".join(groups) + " |",
        "|---|---|---|" + "---|" * len(groups),
    ]
    table = {(r["strategy"], str(r["client"])): r for r in per_client_rows(runs)}
    for client, info in clients.items():
        cells = [_format(table[(s, client)][f"{primary}_mean"], table[(s, client)][f"{primary}_std"]) for s in groups]
        lines.append(f"| {client} | {info.get('task')} | {_majority(info)} | " + " | ".join(cells) + " |")
    options = option_rows(runs)
    if options:
        lines += [
            "",
            (
                "Option accuracy (the listed option the model finds most likely, scored like exact match) on the"
                f" {options[0]['clients']} clients whose tasks list options, last round, mean ± std over seeds;"
                " *95% CI* as above, over those clients' items:"
            ),
            "",
            "| strategy | seeds | option accuracy | 95% CI |",
            "|---|---|---|---|",
        ]
        for row in options:
            ci = "–" if math.isnan(row["ci_low"]) else f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
            lines.append(f"| {row['strategy']} | {row['seeds']} | {_format(row['mean'], row['std'])} | {ci} |")
        lines += [
            "",
            "Per client, option accuracy:",
            "",
            "| client | task | majority | " + " | ".join(groups) + " |",
            "|---|---|---|" + "---|" * len(groups),
        ]
        for client in option_clients(runs[0]):
            rows = [table[(s, client)] for s in groups]
            cells = [
                "–"
                if math.isnan(r[f"{OPTION_METRIC}_mean"])
                else _format(r[f"{OPTION_METRIC}_mean"], r[f"{OPTION_METRIC}_std"])
                for r in rows
            ]
            lines.append(
                f"| {client} | {clients[client].get('task')} | {_majority(clients[client])} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines) + "\n"


def _seeds(group: Sequence[Run]) -> str:
    return " ".join(str(run.seed) for run in group)


def _majority(info: dict[str, Any]) -> str:
    majority = info.get("majority_exact_match")
    return "–" if majority is None else f"{majority:.3f}"


def write_tables(runs: Sequence[Run], out: Path) -> list[Path]:
    """comparison.csv (summary), per_client.csv and comparison.md in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "comparison.csv", out / "per_client.csv", out / "comparison.md"]
    _write_csv(paths[0], summary_rows(runs))
    _write_csv(paths[1], per_client_rows(runs))
    paths[2].write_text(markdown(runs), encoding="utf-8")
    return paths


def client_labels(clients: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Every client's label, ``<partition id> <task>``, in the order of ``clients`` (results.json's)."""
    return [f"{client} {info.get('task')}" for client, info in clients.items()]


def strategy_colours(count: int) -> list[tuple[float, float, float, float]]:
    """One distinct colour per strategy: matplotlib's default cycle (tab10) repeats after 10."""
    import matplotlib

    palette = matplotlib.colormaps["tab10" if count <= 10 else "tab20"]
    return [palette(index % palette.N) for index in range(count)]


def plot_scores_per_round(runs: Sequence[Run], path: Path) -> Path:
    """Personalized primary metric per round, one line per strategy (band: ± std over seeds)."""
    import matplotlib.pyplot as plt

    primary = runs[0].primary_metric
    figure, axes = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    groups = group_by_label(runs)
    for (strategy, group), colour in zip(groups.items(), strategy_colours(len(groups))):
        rounds = sorted({r["round"] for run in group for r in run.evaluated})
        values = np.array([[_score_at(run, rnd, primary) for rnd in rounds] for run in group])
        mean = np.nanmean(values, axis=0)
        axes.plot(
            rounds, mean, marker="o", color=colour, label=f"{strategy} ({len(group)} seed{'s' * (len(group) > 1)})"
        )
        if len(group) > 1:
            std = np.nanstd(values, axis=0, ddof=1)
            axes.fill_between(rounds, mean - std, mean + std, color=colour, alpha=0.15)
    axes.set_xlabel("server round")
    axes.set_ylabel(f"personalized {METRIC_LABELS[primary]} (mean over clients)")
    axes.set_title("Personalized score per round")
    axes.set_ylim(0, 1)  # every metric is a fraction in [0, 1]
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return path


def _score_at(run: Run, server_round: int, metric: str) -> float:
    record = next((r for r in run.evaluated if r["round"] == server_round), None)
    return record["personalized_mean"][metric] if record else math.nan


def plot_per_client(runs: Sequence[Run], path: Path) -> Path:
    """Last-round primary metric per client, grouped bars per strategy (error bars: std over seeds)."""
    import matplotlib.pyplot as plt

    primary = runs[0].primary_metric
    groups = group_by_label(runs)
    table = {(r["strategy"], r["client"]): r for r in per_client_rows(runs)}
    clients = [int(c) for c in runs[0].clients]
    width = 0.8 / len(groups)
    figure, axes = plt.subplots(figsize=(max(7, 1.1 * len(clients) + 2), 4.5), constrained_layout=True)
    for k, (strategy, colour) in enumerate(zip(groups, strategy_colours(len(groups)))):
        means = [table[(strategy, c)][f"{primary}_mean"] for c in clients]
        stds = [table[(strategy, c)][f"{primary}_std"] for c in clients]
        positions = np.arange(len(clients)) + (k - (len(groups) - 1) / 2) * width
        axes.bar(
            positions,
            means,
            width,
            yerr=None if all(map(math.isnan, stds)) else np.nan_to_num(stds),
            label=strategy,
            color=colour,
            capsize=2,
        )
    axes.set_xticks(np.arange(len(clients)), client_labels(runs[0].clients), rotation=30, ha="right")
    axes.set_xlabel("client (task)")
    axes.set_ylabel(f"{METRIC_LABELS[primary]}, last round")
    axes.set_title("Final score of each client's own adapter")
    axes.set_ylim(0, 1)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize="small", ncols=min(len(groups), 4))
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return path


# The matrices a round may record: key -> (panel title, colour map, colour limits).
MATRICES = {
    "similarity": ("cosine similarity", "RdBu_r", (-1, 1)),
    "weights": ("aggregation weight", "viridis", (0, 1)),
}


def matrix_names(record: Mapping[str, Any], key: str, labels: Sequence[str]) -> list[str]:
    """The row and column labels of a round's matrix ``key``, from every client's ``labels``."""
    # Matrices over every client (absent ones None) since client sampling; over the participants before.
    if len(record[key]) == len(labels):
        return list(labels)
    return [labels[int(p)] for p in record.get("participants", range(len(labels)))]


def draw_matrix(figure: Any, ax: Any, record: Mapping[str, Any], key: str, names: Sequence[str]) -> None:
    """One heatmap panel of a round's matrix ``key`` (see :data:`MATRICES`) on ``ax``, values written
    in the cells, grey where a client did not take part, with its colour bar."""
    title, cmap, limits = MATRICES[key]
    matrix = np.array([[np.nan if v is None else v for v in line] for line in record[key]], dtype=float)
    ax.set_facecolor("0.85")  # grey where a client did not take part (NaN cells are not drawn)
    image = ax.imshow(matrix, cmap=cmap, vmin=limits[0], vmax=limits[1])
    for (i, j), value in np.ndenumerate(matrix):
        if np.isnan(value):
            continue
        ax.text(
            j,
            i,
            f"{value:.2f}",
            ha="center",
            va="center",
            fontsize=7,
            color="white" if (abs(value) > 0.6 if key == "similarity" else value > 0.5) else "black",
        )
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_title(f"{title}, round {record['round']}", fontsize=10)
    figure.colorbar(image, ax=ax, shrink=0.8)


def plot_similarity(run: Run, path: Path) -> Path:
    """Similarity (top) and aggregation weights (bottom), first and last round, labelled by task."""
    import matplotlib.pyplot as plt

    recorded = [r for r in run.rounds if "similarity" in r]
    shown = [recorded[0], recorded[-1]] if len(recorded) > 1 else recorded[:1]
    labels = client_labels(run.clients)
    size = 0.5 * len(labels) + 2.5
    figure, axes = plt.subplots(
        2, len(shown), figsize=(size * len(shown), 2 * size), squeeze=False, constrained_layout=True
    )
    for column, record in enumerate(shown):
        names = matrix_names(record, "similarity", labels)
        for row, key in enumerate(MATRICES):
            draw_matrix(figure, axes[row, column], record, key, names)
    figure.suptitle(
        f"{run.label}, seed {run.seed}: rows = receiving client, columns = contributing client"
        + ("; grey: not in the round" if any(None in line for r in shown for line in r["similarity"]) else "")
    )
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return path


def plot_cross_task(cross: Mapping[str, Any], metric: str, title: str, path: Path, *, split: str = "test") -> Path:
    """Heatmap of a cross-task matrix (eval-cross): clients (rows, ordered by task) × tasks (columns).

    Values are written in the cells, each client's own-task cell is outlined, a client without
    cross-task scores is a grey row; the colour scale is the metric's [0, 1].

    Parameters
    ----------
    cross : mapping
        A round record's ``cross_task`` entry (:func:`fedbilevel.strategies.cross_task.cross_task_record`).
    metric : str
        The score shown (a key of its ``scores``).
    title : str
        The figure's first title line (e.g. the run's label and seed).
    path : Path
        Where the PNG goes.
    split : str, default "test"
        What the clients scored (``eval-split``), named in the title.

    Returns
    -------
    Path
        ``path``.
    """
    import matplotlib.pyplot as plt

    tasks, rows = cross["tasks"], cross["scores"][metric]
    matrix = np.array([[np.nan] * len(tasks) if row is None else row for row in rows], dtype=float)
    names = [f"{client} {task}" for client, task in zip(cross["clients"], cross["client_tasks"])]
    size = (max(0.9 * len(tasks) + 3.5, 7.0), 0.45 * len(names) + 2.8)
    figure, ax = plt.subplots(figsize=size, constrained_layout=True)
    ax.set_facecolor("0.85")  # grey where a client has no cross-task scores (NaN cells are not drawn)
    image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for (i, j), value in np.ndenumerate(matrix):
        if not np.isnan(value):
            ax.text(
                j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value < 0.5 else "black"
            )
    for i, task in enumerate(cross["client_tasks"]):
        ax.add_patch(
            plt.Rectangle((tasks.index(task) - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5)
        )
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("task of the items scored")
    ax.set_ylabel("client (its own task)")
    own, other = cross["own_task_mean"][metric], cross["other_task_mean"][metric]
    means = ", ".join(
        f"{what} {value:.3f}" for what, value in (("own task", own), ("other tasks", other)) if value is not None
    )
    ax.set_title(
        f"{title}\n{METRIC_LABELS[metric]} of each client's final adapter on each task's {split} items\n"
        f"outlined: its own task (its own items); means over clients: {means}"
        + ("; grey: no usable scores" if any(row is None for row in rows) else ""),
        fontsize=9,
    )
    figure.colorbar(image, ax=ax, shrink=0.8, label=METRIC_LABELS[metric])
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return path


def write_plots(runs: Sequence[Run], out: Path) -> list[Path]:
    """scores_per_round.png, per_client.png, similarity_<strategy>.png and, for runs with eval-cross,
    cross_task_<strategy>.png (first seed) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_scores_per_round(runs, out / "scores_per_round.png"), plot_per_client(runs, out / "per_client.png")]
    for strategy, group in group_by_label(runs).items():
        if any("similarity" in r for r in group[0].rounds):
            paths.append(plot_similarity(group[0], out / f"similarity_{strategy}.png"))
        cross = cross_task_of(group[0])
        if cross is not None:
            path = out / f"cross_task_{strategy}.png"
            title = f"{strategy}, seed {group[0].seed}"
            paths.append(plot_cross_task(cross, group[0].primary_metric, title, path, split=group[0].split))
    return paths
