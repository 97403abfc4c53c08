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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from fedbilevel.config import RunConfig
from fedbilevel.options import declared, defaults
from fedbilevel.privacy import DP_EPSILON_SPENT, DP_NOISE_MULTIPLIER, DP_STOPPED
from fedbilevel.protocol import TEXT_METRICS
from fedbilevel.results import METRIC_LABELS
from fedbilevel.strategies import FEDBIP_PRESETS, strategy_averages, strategy_options

OPTION_METRIC = "option_accuracy"  # a client's eval score where its task lists options
OPTION_ITEMS = "option_correct"  # its per-item scores
REFERENCE = "local"  # personalization is measured against training alone
# Paired differences are reported against each of these that ran: training alone, and one shared adapter.
REFERENCES = (REFERENCE, "fedavg")

# Training keys any strategy may set: shown in the settings column, and tunable by scripts/tune.py.
SHARED_KNOBS = ("optimizer", "momentum", "learning-rate")
_DEFAULTS = defaults(RunConfig)


def strategy_keys(strategy: str) -> tuple[str, ...]:
    """The run-config keys that tune ``strategy``: its own option component's (as registered,
    :func:`~fedbilevel.strategies.strategy_options`), ``aggregation-weights`` for the strategies that average,
    then :data:`SHARED_KNOBS`. Raises ``KeyError`` for an unregistered strategy."""
    components = {field.name: field.metadata.get("component") for field in dataclasses.fields(RunConfig)}
    own = strategy_options(strategy)
    keys = tuple(key for key, _ in declared(components[own])) if own else ()
    return (*keys, *(("aggregation-weights",) if strategy_averages(strategy) else ()), *SHARED_KNOBS)


def strategy_settings(strategy: str, run_config: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """``(key, value)`` of each key of :func:`strategy_keys` that ``run_config`` sets away from its default,
    in that order (absent keys count as defaults; a preset's own values, e.g. fedbip-plus's weighting,
    count as its defaults); empty when none."""
    preset = {**_DEFAULTS, **FEDBIP_PRESETS.get(strategy, ("", {}))[1]}
    return tuple(
        (key, run_config[key])
        for key in strategy_keys(strategy)
        if key in run_config and run_config[key] != preset[key]
    )


def settings_text(settings: Iterable[tuple[str, Any]]) -> str:
    """``key=value, ...`` of :func:`strategy_settings`' pairs, as the tables show them ("" for none)."""
    return ", ".join(f"{key}={value}" for key, value in settings)


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
    settings: tuple[tuple[str, Any], ...] = ()  # the strategy's knobs away from their defaults (strategy_settings)
    split: str = "test"  # what the clients scored (eval-split)
    dp: str = "none"  # its DP mode (dp)
    dp_epsilon: float = math.inf  # the ε budget it was run to (dp-epsilon; ∞ without DP, NaN with σ set and no budget)

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
        **_privacy_of(config["run_config"]),
    )
    if not run.evaluated:
        raise ValueError(f"run folder {str(folder)!r}: no evaluated round in results.json")
    return run


def _privacy_of(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """A run's :class:`Run` ``dp`` and ``dp_epsilon`` from its run config (runs before DP have none)."""
    mode = run_config.get("dp", "none")
    if mode == "none":
        return {"dp": mode, "dp_epsilon": math.inf}
    budget = float(run_config.get("dp-epsilon", 0.0))
    return {"dp": mode, "dp_epsilon": budget if budget > 0 else math.nan}


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (std NaN for a single value; both NaN for none)."""
    if not len(values):
        return math.nan, math.nan
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else math.nan


def _format(mean: float, std: float) -> str:
    mean = round(mean, 3) + 0.0  # no "-0.000" for a value that rounds to zero from below
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
        row: dict[str, Any] = {
            "strategy": strategy,
            "settings": settings_text(group[0].settings),
            "seeds": _seeds(group),
        }
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
        mean, std = _mean_std(values)
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


def per_task_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Per strategy and task (first-seen order): the last round's scores averaged over the task's clients
    that were evaluated, then mean and std over seeds; ``clients`` counts the task's clients."""
    rows = []
    for strategy, group in group_by_label(runs).items():
        tasks: dict[Any, list[str]] = {}
        for client, info in group[0].clients.items():
            tasks.setdefault(info.get("task"), []).append(client)
        for task, clients in tasks.items():
            row: dict[str, Any] = {"strategy": strategy, "task": task, "clients": len(clients)}
            for metric in group[0].metrics:
                means = [
                    float(np.mean([r.last["eval"][c][metric] for c in clients if c in r.last["eval"]]))
                    for r in group
                    if any(c in r.last["eval"] for c in clients)
                ]
                row[f"{metric}_mean"], row[f"{metric}_std"] = _mean_std(means) if means else (math.nan, math.nan)
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


# group_separation's per-round measures, in its rows' order after ``round`` and ``clients``.
SEPARATION_MEASURES = (
    "same_task_cos",
    "cross_task_cos",
    "cos_gap",
    "auroc",
    "same_task_weight",
    "uniform_same_task_weight",
    "self_weight",
    "step_length",
)


def group_separation(run: Run) -> list[dict[str, Any]]:
    """Per recorded round, how well the server's similarity and weights find the clients' task groups.

    From ``similarity`` (the recorded cosines; FedBip-L's are means over layer groups), over the
    off-diagonal entries whose row and column clients are both present (ordered pairs, so each pair
    of a symmetric matrix counts twice, which leaves every mean and the AUROC unchanged; a column of
    a remembered absent client, ``absent-client-rule = "remember"``, counts once):

    - ``same_task_cos``, ``cross_task_cos``: the mean cosine over same-task and over cross-task
      pairs; ``cos_gap``: the first minus the second;
    - ``auroc``: the area under the ROC curve of the cosine as a score for "same task"
      (:func:`sklearn.metrics.roc_auc_score`): the chance that a random same-task pair has the
      higher cosine than a random cross-task pair; 0.5 is chance, 1 a perfect split.

    From ``weights`` (rows: receiving client), over the present rows:

    - ``same_task_weight``: the mean over rows with a same-task partner present of the weight the
      row puts on those partners together (itself excluded); ``uniform_same_task_weight``: the same
      for uniform weights over the row's present columns, the reference a weighting that ignores
      the tasks reaches (it moves with who was sampled);
    - ``self_weight``: the mean over rows of the weight a client puts on itself.

    From both, for FedBip's strategies (whose cosines are of task vectors):

    - ``step_length``: the mean over rows of the length of the step a client receives over that
      of its own update τᵢ: how much the weighted mean shortens what a client learned, as a
      smaller learning rate would. Exact where the round records ``step_lengths`` (FedBip's
      runs since they are recorded; after a ``server-step``); else √(pᵢᵀ S pᵢ), as if every
      task vector were as long.

    Parameters
    ----------
    run : Run
        A run whose ``clients`` carry a ``task`` and whose rounds may record ``similarity`` and/or
        ``weights``: N×N lists of float (None for absent clients) over :func:`matrix_clients`.

    Returns
    -------
    list of dict
        One dict per round that records either matrix, in round order: ``round`` (int),
        ``clients`` (int, the rows present), then :data:`SEPARATION_MEASURES` (float, None where
        undefined: the round lacks that matrix, or no same-task / no cross-task pair is present).
        Empty when some client has no task label or no round records a matrix.
    """
    if not run.clients or any(info.get("task") is None for info in run.clients.values()):
        return []
    rows = []
    for record in run.rounds:
        if "similarity" not in record and "weights" not in record:
            continue
        values: dict[str, float | None] = {}
        matrices = {}
        for key, measures in (("similarity", _cosine_separation), ("weights", _weight_separation)):
            if key in record:
                matrix, same = matrices[key] = _matrix_and_same_task(run, record, key)
                present = int((~np.isnan(matrix)).any(axis=1).sum())
                values.update(measures(matrix, same))
        # FedBip's cosines are of task vectors (FedAMP's of whole adapters: no step length from them).
        fedbip = run.strategy.startswith("fedbip")
        if fedbip and record.get("step_lengths") is not None:  # recorded by the server: exact
            values["step_length"] = _mean_or_none(np.array([v for v in record["step_lengths"] if v is not None]))
        elif fedbip and len(matrices) == 2 and matrices["similarity"][0].shape == matrices["weights"][0].shape:
            values["step_length"] = _step_length(matrices["similarity"][0], matrices["weights"][0])
        rows.append({"round": record["round"], "clients": present, **{m: values.get(m) for m in SEPARATION_MEASURES}})
    return rows


def _matrix_and_same_task(run: Run, record: Mapping[str, Any], key: str) -> tuple[np.ndarray, np.ndarray]:
    """A round's matrix ``key`` (float64, N×N, NaN where absent) and whether each entry's row and
    column clients share a task (bool, N×N; the diagonal is True)."""
    tasks = np.array([run.clients[c]["task"] for c in matrix_clients(record, key, list(run.clients))])
    matrix = np.array([[np.nan if v is None else v for v in line] for line in record[key]], dtype=np.float64)
    return matrix, tasks[:, None] == tasks[None, :]


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def _step_length(similarity: np.ndarray, weights: np.ndarray) -> float | None:
    """``step_length`` of one round (see :func:`group_separation`): over the rows with weights,
    absent entries counting 0."""
    rows = ~np.isnan(weights).all(axis=1)
    s, w = np.nan_to_num(similarity), np.nan_to_num(weights[rows])
    lengths = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", w, s, w), 0.0))
    return _mean_or_none(lengths)


def _cosine_separation(similarity: np.ndarray, same: np.ndarray) -> dict[str, float | None]:
    """``same_task_cos``, ``cross_task_cos``, ``cos_gap``, ``auroc`` of one round (see :func:`group_separation`)."""
    pairs = ~np.isnan(similarity) & ~np.eye(len(similarity), dtype=bool)
    scores, labels = similarity[pairs], same[pairs]
    same_cos, cross_cos = _mean_or_none(scores[labels]), _mean_or_none(scores[~labels])
    both = same_cos is not None and cross_cos is not None  # the AUROC needs a pair of each kind
    return {
        "same_task_cos": same_cos,
        "cross_task_cos": cross_cos,
        "cos_gap": same_cos - cross_cos if both else None,
        "auroc": float(roc_auc_score(labels, scores)) if both else None,
    }


def _weight_separation(weights: np.ndarray, same: np.ndarray) -> dict[str, float | None]:
    """``same_task_weight``, ``uniform_same_task_weight``, ``self_weight`` of a round (:func:`group_separation`)."""
    present = ~np.isnan(weights)
    partners = present & same & ~np.eye(len(weights), dtype=bool)
    rows = partners.any(axis=1)  # rows with a same-task partner present this round
    on_partners = np.where(partners, weights, 0.0).sum(axis=1)[rows]
    uniform = (partners.sum(axis=1) / np.maximum(present.sum(axis=1), 1))[rows]
    diagonal = np.diag(weights)
    return {
        "same_task_weight": _mean_or_none(on_partners),
        "uniform_same_task_weight": _mean_or_none(uniform),
        "self_weight": _mean_or_none(diagonal[~np.isnan(diagonal)]),
    }


def separation_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Per label, the first and the last recorded round of :func:`group_separation`: each measure's
    mean and std over the seeds that have it.

    Parameters
    ----------
    runs : sequence of Run
        Any runs; labels none of whose runs has a same-task pair in any matrix are left out.

    Returns
    -------
    list of dict
        Two rows per label (``when`` = "first", "last"): ``strategy`` (the label), ``when``,
        ``rounds`` (str, the rounds those were, e.g. "1" or "18 20"), ``seeds`` (str), then per
        measure of :data:`SEPARATION_MEASURES` ``<measure>_mean`` and ``<measure>_std`` (float;
        NaN where no seed has it, std NaN for a single seed). Empty when no label qualifies.
    """
    rows = []
    for label, group in group_by_label(runs).items():
        separations = [(run, rounds) for run in group if _has_groups(rounds := group_separation(run))]
        if not separations:
            continue
        for when, index in (("first", 0), ("last", -1)):
            picked = [rounds[index] for _, rounds in separations]
            row: dict[str, Any] = {
                "strategy": label,
                "when": when,
                "rounds": " ".join(str(r) for r in sorted({p["round"] for p in picked})),
                "seeds": _seeds([run for run, _ in separations]),
            }
            for name in SEPARATION_MEASURES:
                values = [p[name] for p in picked if p[name] is not None]
                row[f"{name}_mean"], row[f"{name}_std"] = _mean_std(values)
            rows.append(row)
    return rows


def _has_groups(rounds: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a run's :func:`group_separation` rows have any same-task measure (so a task has two clients)."""
    return any(r["same_task_cos"] is not None or r["same_task_weight"] is not None for r in rounds)


def separation_per_round(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """separation.csv's rows: ``strategy`` (label), ``seed``, then :func:`group_separation`'s row, for
    every run with task groups (see :func:`separation_rows`) and every recorded round."""
    return [
        {"strategy": run.label, "seed": run.seed, **row}
        for run in runs
        if _has_groups(rounds := group_separation(run))
        for row in rounds
    ]


def _train_values(run: Run, key: str) -> list[float]:
    """Every value of train metric ``key`` that ``run``'s clients reported, over rounds and clients."""
    return [entry[key] for record in run.rounds for entry in record.get("train", {}).values() if key in entry]


# privacy_rows' separation measures: (column prefix, measure of group_separation, which recorded round)
_PRIVACY_SEPARATION = (
    ("cos_gap_first", "cos_gap", 0),
    ("cos_gap_last", "cos_gap", -1),
    ("auroc_first", "auroc", 0),
    ("same_task_weight_first", "same_task_weight", 0),
    ("uniform_same_task_weight_first", "uniform_same_task_weight", 0),
)


def privacy_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Privacy against utility: per label of a strategy that ran with DP, its budget, what its clients
    spent, its score and whether its similarity still finds the task groups (issue 19).

    Parameters
    ----------
    runs : sequence of Run
        Any runs; a label qualifies when some run of its strategy with the same settings
        (``Run.strategy``, ``Run.settings``: its own knobs, not the DP keys) has ``dp != "none"``, so a
        strategy's run without DP stands beside its DP runs as ε = ∞.

    Returns
    -------
    list of dict
        One row per qualifying label, by base, then without DP first, then mode and budget (largest
        first): ``strategy`` (the label), ``base`` (its strategy, with its settings in parentheses
        where it has any), ``dp`` (mode), ``epsilon`` (the budget: ∞ without DP, NaN for a
        set σ without one), ``seeds`` (str), ``noise_multiplier`` (mean σ the clients reported,
        NaN without DP), ``epsilon_spent`` (the most any client spent, at ``dp-delta``; NaN
        without DP), ``stopped`` (clients that stopped training at their budget, mean over seeds),
        ``base_strategy`` and ``settings`` (what ``base`` is made of), ``score_mean`` /
        ``score_std`` (last round's personalized primary metric over seeds), and
        from :func:`group_separation` over the seeds with task groups: ``cos_gap_first``,
        ``cos_gap_last``, ``auroc_first``, ``same_task_weight_first`` and
        ``uniform_same_task_weight_first`` (``_mean`` / ``_std``; NaN where undefined, e.g. local
        records no matrices). Empty when no run has DP.
    """
    private = {_privacy_base(run) for run in runs if run.dp != "none"}
    rows = []
    for label, group in group_by_label(runs).items():
        if _privacy_base(group[0]) not in private:
            continue
        primary = group[0].primary_metric
        sigmas = [v for run in group for v in _train_values(run, DP_NOISE_MULTIPLIER)]
        spent = [v for run in group for v in _train_values(run, DP_EPSILON_SPENT)]
        row: dict[str, Any] = {
            "strategy": label,
            "base": _privacy_base(group[0]),
            "dp": group[0].dp,
            "epsilon": group[0].dp_epsilon,
            "seeds": _seeds(group),
            "noise_multiplier": float(np.mean(sigmas)) if sigmas else math.nan,
            "epsilon_spent": max(spent) if spent else math.nan,
            "stopped": float(np.mean([_stopped_clients(run) for run in group])),
            "base_strategy": group[0].strategy,
            "settings": settings_text(group[0].settings),
        }
        row["score_mean"], row["score_std"] = _mean_std([run.last["personalized_mean"][primary] for run in group])
        separations = [rounds for run in group if _has_groups(rounds := group_separation(run))]
        for column, measure, index in _PRIVACY_SEPARATION:
            values = [rounds[index][measure] for rounds in separations if rounds[index][measure] is not None]
            row[f"{column}_mean"], row[f"{column}_std"] = _mean_std(values)
        rows.append(row)
    order = list(dict.fromkeys(row["base"] for row in rows))
    return sorted(
        rows, key=lambda r: (order.index(r["base"]), r["dp"] != "none", r["dp"], -_budget_order(r["epsilon"]))
    )


def _stopped_clients(run: Run) -> int:
    """How many of ``run``'s clients stopped training at their DP budget in some round."""
    return len({p for record in run.rounds for p, entry in record.get("train", {}).items() if entry.get(DP_STOPPED)})


def _privacy_base(run: Run) -> str:
    """What :func:`privacy_rows` sets side by side by budget: the strategy with its own settings."""
    return f"{run.strategy} ({settings_text(run.settings)})" if run.settings else run.strategy


def _budget_order(epsilon: float) -> float:
    """Sort key of a budget: ∞ above every ε, a set σ without a budget (NaN) below them."""
    return -math.inf if math.isnan(epsilon) else epsilon


def _budget_text(epsilon: float) -> str:
    return "∞" if math.isinf(epsilon) else "σ set" if math.isnan(epsilon) else f"{epsilon:g}"


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _distinct_settings(settings: Sequence[tuple[tuple[str, Any], ...]]) -> tuple[list[str], list[str]]:
    """Each row's :func:`strategy_settings` pairs as text without the pairs every row holds, and those
    pairs (none when there is a single row: its settings are its own)."""
    shared = [pair for pair in settings[0] if all(pair in other for other in settings)] if len(settings) > 1 else []
    own = [settings_text(pair for pair in pairs if pair not in shared) for pairs in settings]
    return own, [settings_text([pair]) for pair in shared]


def markdown(runs: Sequence[Run]) -> str:
    """The comparison as Markdown: the summary table, the cross-task, paired-difference and
    group-separation tables where they apply, then the per-client tables."""
    primary, metrics, split = runs[0].primary_metric, runs[0].metrics, runs[0].split
    header = " | ".join(f"{METRIC_LABELS[m]} {when}" for when in ("last", "best") for m in metrics)
    summary = summary_rows(runs)
    # The tuned knobs beside each strategy, when any run set them (scripts/tune.py's conf files); a value
    # every row shares (a conf file's learning rate) is the federation's, said once below the table.
    own, shared = _distinct_settings([group[0].settings for group in group_by_label(runs).values()])
    settings = any(own)
    lines = [
        f"Personalized score (mean over clients of each client's own adapter on its own {split} split),"
        " mean ± std over seeds; *best* is each run's best round by "
        f"{METRIC_LABELS[primary]}.",
        "",
        f"*95% CI*: percentile bootstrap of the last round's {METRIC_LABELS[primary]} over seeds and {split} items"
        " (– where a run recorded no per-item scores)"
        + ("; *settings*: the strategy's keys set away from their defaults" if settings else "")
        + (f"; every run: {', '.join(shared)}" if shared else "")
        + ".",
        "",
        f"| strategy |{' settings |' if settings else ''} seeds | {header} | {METRIC_LABELS[primary]} last, 95% CI "
        "| best round | minutes |",
        "|---|---|" + "---|" * (2 * len(metrics) + settings) + "---|---|---|",
    ]
    for row, knobs_set in zip(summary, own, strict=True):
        cells = [_format(row[f"{when}_{m}_mean"], row[f"{when}_{m}_std"]) for when in ("last", "best") for m in metrics]
        low, high = row["last_primary_ci_low"], row["last_primary_ci_high"]
        ci = "–" if math.isnan(low) else f"[{low:.3f}, {high:.3f}]"
        knobs = f" {knobs_set or '–'} |" if settings else ""
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
    for reference in REFERENCES:
        if reference not in groups:
            continue
        header = (
            f"Difference to {reference}, {METRIC_LABELS[primary]} last, paired over the seeds both ran "
            "(same seeds and test items resampled for both; an interval that excludes 0 is an ordering):"
        )
        lines += ["", header, "", "| strategy | seeds | difference | 95% CI |", "|---|---|---|---|"]
        reference_seeds = {run.seed for run in groups[reference]}
        for label, group in groups.items():
            paired = None if label == reference else paired_difference_interval(group, groups[reference], primary)
            if paired is not None:
                shared = [run for run in group if run.seed in reference_seeds]
                lines.append(
                    f"| {label} | {_seeds(shared)} | {paired[0]:+.3f} | [{paired[1]:+.3f}, {paired[2]:+.3f}] |"
                )
    tasks = per_task_rows(runs)
    if len({row["task"] for row in tasks}) < len(runs[0].clients):  # tasks shared by clients: a table per task
        lines += [
            "",
            f"Per task, last round, {METRIC_LABELS[primary]}: the mean over the task's clients, mean ± std over seeds:",
            "",
            "| task | clients | " + " | ".join(groups) + " |",
            "|---|---|" + "---|" * len(groups),
        ]
        by_task = {(row["strategy"], row["task"]): row for row in tasks}
        for task in dict.fromkeys(row["task"] for row in tasks):
            cells = [
                _format(by_task[(s, task)][f"{primary}_mean"], by_task[(s, task)][f"{primary}_std"]) for s in groups
            ]
            lines.append(f"| {task} | {by_task[(next(iter(groups)), task)]['clients']} | " + " | ".join(cells) + " |")
    lines += _separation_markdown(separation_rows(runs))
    lines += _privacy_markdown(privacy_rows(runs), METRIC_LABELS[primary])
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


def _separation_markdown(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The lines of the group-separation table of :func:`separation_rows`'s rows (none without rows)."""
    if not rows:
        return []
    lines = [
        "",
        "Do the similarity and the weights find the task groups? Over the pairs of clients present in a round:"
        " *same-task*, *cross-task*: the mean recorded cosine over pairs that share a task and pairs that do not"
        " (FedBip-L: mean over layer groups); *AUROC*: the chance that a same-task pair has the higher cosine than"
        " a cross-task pair (0.5: chance, 1: a perfect split); *on partners*: the weight a client puts on its"
        " present same-task partners together (mean over the clients with one); *uniform*: the same for equal"
        " weights; *self*: the weight a client puts on itself; *step*: the length of the step a client receives"
        " over its own update's (FedBip; as recorded, or for older runs √(pᵢᵀ S pᵢ), as if all task vectors"
        " were as long). First and last recorded round, mean ± std over seeds:",
        "",
        "| strategy | round | seeds | same-task cos | cross-task cos | AUROC | on partners | uniform | self | step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [
            "–" if math.isnan(row[f"{m}_mean"]) else _format(row[f"{m}_mean"], row[f"{m}_std"])
            for m in SEPARATION_MEASURES
            if m != "cos_gap"  # the two means beside each other show it
        ]
        lines.append(f"| {row['strategy']} | {row['rounds']} | {row['seeds']} | " + " | ".join(cells) + " |")
    return lines


def _privacy_markdown(rows: Sequence[Mapping[str, Any]], metric: str) -> list[str]:
    """The lines of the privacy table of :func:`privacy_rows`'s rows (none without rows)."""
    if not rows:
        return []
    lines = [
        "",
        "Privacy against utility: *ε*, the budget each client's training was held to (∞: no DP); *σ*, the mean"
        " noise multiplier the clients reported; *spent*, the most ε any client spent (at the run's δ); *stopped*,"
        " clients that stopped training at their budget (mean over seeds); then the last round's personalized"
        " score and whether the similarity still finds the task groups under the noise: same-task minus"
        " cross-task cosine in the"
        " first and the last recorded round, the cosine's AUROC and the weight on same-task partners (uniform:"
        " equal weights' reference) in the first; mean ± std over seeds:",
        "",
        f"| strategy | dp | ε | σ | spent | stopped | seeds | {metric} last | cos gap first | cos gap last | AUROC"
        " first | on partners first | uniform |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [
            "–" if math.isnan(row[f"{column}_mean"]) else _format(row[f"{column}_mean"], row[f"{column}_std"])
            for column, *_ in _PRIVACY_SEPARATION
        ]
        sigma = "–" if math.isnan(row["noise_multiplier"]) else f"{row['noise_multiplier']:.3g}"
        spent = "–" if math.isnan(row["epsilon_spent"]) else f"{row['epsilon_spent']:.2f}"
        lines.append(
            f"| {row['strategy']} | {row['dp']} | {_budget_text(row['epsilon'])} | {sigma} | {spent} | "
            f"{row['stopped']:g} | {row['seeds']} | {_format(row['score_mean'], row['score_std'])} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def _seeds(group: Sequence[Run]) -> str:
    return " ".join(str(run.seed) for run in group)


def _majority(info: dict[str, Any]) -> str:
    majority = info.get("majority_exact_match")
    return "–" if majority is None else f"{majority:.3f}"


def write_tables(runs: Sequence[Run], out: Path) -> list[Path]:
    """comparison.csv (summary), per_client.csv, comparison.md and, for runs with task groups and
    similarity or weight matrices, separation.csv (:func:`separation_per_round`), and for runs with DP,
    privacy.csv (:func:`privacy_rows`) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "comparison.csv", out / "per_client.csv", out / "comparison.md"]
    _write_csv(paths[0], summary_rows(runs))
    _write_csv(paths[1], per_client_rows(runs))
    paths[2].write_text(markdown(runs), encoding="utf-8")
    separation = separation_per_round(runs)
    if separation:
        paths.append(out / "separation.csv")
        _write_csv(paths[-1], separation)
    privacy = privacy_rows(runs)
    if privacy:
        paths.append(out / "privacy.csv")
        _write_csv(paths[-1], privacy)
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


# The matrices a round may record: key -> (panel title, colour map, colour limits, colour-scale
# exponent, colour of the lines between tasks). Weights get a square-root scale: with many clients
# they are small (1/16 each among 16) and would all look alike on a linear one. The lines are
# chosen to show on every colour of their map.
MATRICES = {
    "similarity": ("cosine similarity", "RdBu_r", (-1, 1), 1.0, "black"),
    "weights": ("aggregation weight", "viridis", (0, 1), 0.5, "white"),
}
CELL_VALUES_MAX = 12  # clients up to which a heatmap writes each cell's value; above, the colours alone fit


def heatmap_inches(count: int) -> float:
    """Side in inches of one heatmap panel over ``count`` clients: room for the cell values up to
    :data:`CELL_VALUES_MAX` clients, then a fixed size (colours and small ticks need no more)."""
    return min(0.5 * count + 2.5, 9.0)


def matrix_clients(record: Mapping[str, Any], key: str, clients: Sequence[str]) -> list[str]:
    """The partition ids (results.json's ``clients`` keys) of the rows and columns of a round's matrix ``key``.

    Parameters
    ----------
    record : mapping
        A round of results.json with the N×N list ``record[key]``.
    key : str
        ``"similarity"`` or ``"weights"``.
    clients : sequence of str
        Every known partition id.

    Returns
    -------
    list of str
        Length N: every client in ascending partition id, or for runs recorded before client
        sampling (matrices over the participants only) the round's ``participants``.
    """
    if len(record[key]) == len(clients):
        return sorted(clients, key=int)
    return [str(p) for p in record["participants"]]


def task_order(tasks: Sequence[Any]) -> list[int]:
    """Positions that put same-task clients side by side: tasks in first-seen order, clients in
    their given order inside a task (the identity when each task's clients are already contiguous)."""
    first: dict[Any, int] = {}
    for task in tasks:
        first.setdefault(task, len(first))
    return sorted(range(len(tasks)), key=lambda k: first[tasks[k]])


def draw_matrix(
    figure: Any, ax: Any, record: Mapping[str, Any], key: str, clients: Mapping[str, Mapping[str, Any]]
) -> None:
    """One heatmap panel of a round's matrix ``key`` (see :data:`MATRICES`) on ``ax``, with its colour bar.

    Grey where a client did not take part; weights on a square-root colour scale. Same-task
    clients sit side by side with a thin line between tasks; when a task's clients are not
    contiguous in partition-id order they are reordered, and the panel title says so. Up to
    :data:`CELL_VALUES_MAX` clients the cells show their values and the ticks read
    ``<partition id> <task>``; above, the ticks are partition ids and each task is named once
    beside its block (when some task has several clients).

    Parameters
    ----------
    figure, ax
        A matplotlib Figure (pyplot's or a bare one) and the Axes to draw on.
    record : mapping
        A round of results.json holding the N×N list ``record[key]`` (None where absent).
    key : str
        A key of :data:`MATRICES`.
    clients : mapping
        results.json's ``clients``: partition id -> info with its ``task``.
    """
    import matplotlib

    title, cmap, limits, gamma, line_colour = MATRICES[key]
    ids = matrix_clients(record, key, list(clients))
    order = task_order([clients[c].get("task") for c in ids])
    ids = [ids[k] for k in order]
    tasks = [clients[c].get("task") for c in ids]
    matrix = np.array([[np.nan if v is None else v for v in line] for line in record[key]], dtype=float)
    matrix = matrix[np.ix_(order, order)]
    count = len(ids)
    ax.set_facecolor("0.85")  # grey where a client did not take part (NaN cells are not drawn)
    norm = matplotlib.colors.PowerNorm(gamma, *limits)
    image = ax.imshow(matrix, cmap=cmap, norm=norm)
    if count <= CELL_VALUES_MAX:
        for (i, j), value in np.ndenumerate(matrix):
            if not np.isnan(value):
                red, green, blue, _ = image.cmap(norm(value))
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5  # the cell's luminance: white text on dark
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
    # Where the task changes along the (task-ordered) clients: block k is starts[k]..starts[k+1]-1.
    starts = [k for k in range(count) if k == 0 or tasks[k] != tasks[k - 1]]
    grouped = len(starts) < count  # some task has several clients: its block is worth marking
    if grouped:
        for edge in starts[1:]:
            ax.axhline(edge - 0.5, color=line_colour, linewidth=0.8)
            ax.axvline(edge - 0.5, color=line_colour, linewidth=0.8)
    if count <= CELL_VALUES_MAX or not grouped:
        names = [f"{c} {t}" for c, t in zip(ids, tasks)]
        size = 8 if count <= CELL_VALUES_MAX else 6
        ax.set_xticks(range(count), names, rotation=45, ha="right", fontsize=size)
        ax.set_yticks(range(count), names, fontsize=size)
    else:
        ax.set_xticks(range(count), ids, fontsize=6)
        ax.set_yticks(range(count), ids, fontsize=6)
        # Each task's name once, at its block's centre: minor ticks placed past the partition ids.
        centres = [(start + end - 1) / 2 for start, end in zip(starts, [*starts[1:], count])]
        names = [str(tasks[start]) for start in starts]
        ax.set_xticks(centres, names, minor=True, rotation=30, ha="right", fontsize=7)
        ax.set_yticks(centres, names, minor=True, fontsize=7)
        ax.tick_params(axis="x", which="minor", length=0, pad=12)
        ax.tick_params(axis="y", which="minor", length=0, pad=16)
    reordered = order != list(range(count))
    ax.set_title(f"{title}, round {record['round']}" + (" (clients ordered by task)" if reordered else ""), fontsize=10)
    figure.colorbar(image, ax=ax, shrink=0.8)


def plot_similarity(run: Run, path: Path) -> Path:
    """Similarity (top) and aggregation weights (bottom), first and last round, labelled by task
    (see :func:`draw_matrix`)."""
    import matplotlib.pyplot as plt

    recorded = [r for r in run.rounds if "similarity" in r]
    shown = [recorded[0], recorded[-1]] if len(recorded) > 1 else recorded[:1]
    size = heatmap_inches(len(run.clients))
    figure, axes = plt.subplots(
        2, len(shown), figsize=(size * len(shown), 1.8 * size), squeeze=False, constrained_layout=True
    )
    for column, record in enumerate(shown):
        for row, key in enumerate(MATRICES):
            draw_matrix(figure, axes[row, column], record, key, run.clients)
    figure.suptitle(
        f"{run.label}, seed {run.seed}: rows = receiving client, columns = contributing client"
        + ("; grey: not in the round" if any(None in line for r in shown for line in r["similarity"]) else "")
    )
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return path


def cross_task_inches(cross: Mapping[str, Any]) -> tuple[float, float]:
    """(width, height) in inches of a cross-task heatmap: room for its task columns and client rows."""
    return max(0.9 * len(cross["tasks"]) + 3.5, 7.0), 0.45 * len(cross["clients"]) + 2.8


def draw_cross_task(
    figure: Any, ax: Any, cross: Mapping[str, Any], metric: str, title: str, *, split: str = "test"
) -> None:
    """A cross-task matrix (eval-cross) on ``ax``: clients (rows, ordered by task) × tasks (columns).

    Values are written in the cells, each client's own-task cell is outlined, a client without
    cross-task scores is a grey row; the colour scale is the metric's [0, 1].

    Parameters
    ----------
    figure, ax
        A matplotlib Figure (pyplot's or a bare one) and the Axes to draw on.
    cross : mapping
        A round record's ``cross_task`` entry (:func:`fedbilevel.strategies.cross_task.cross_task_record`).
    metric : str
        The score shown (a key of its ``scores``).
    title : str
        The title's first line (e.g. the run's label and seed).
    split : str, default "test"
        What the clients scored (``eval-split``), named in the title.
    """
    from matplotlib.patches import Rectangle

    tasks, rows = cross["tasks"], cross["scores"][metric]
    matrix = np.array([[np.nan] * len(tasks) if row is None else row for row in rows], dtype=float)
    names = [f"{client} {task}" for client, task in zip(cross["clients"], cross["client_tasks"])]
    ax.set_facecolor("0.85")  # grey where a client has no cross-task scores (NaN cells are not drawn)
    image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for (i, j), value in np.ndenumerate(matrix):
        if not np.isnan(value):
            ax.text(
                j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value < 0.5 else "black"
            )
    for i, task in enumerate(cross["client_tasks"]):
        ax.add_patch(Rectangle((tasks.index(task) - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
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


def plot_cross_task(cross: Mapping[str, Any], metric: str, title: str, path: Path, *, split: str = "test") -> Path:
    """The PNG at ``path`` of a cross-task matrix (:func:`draw_cross_task`, same arguments); returns ``path``."""
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=cross_task_inches(cross), constrained_layout=True)
    draw_cross_task(figure, ax, cross, metric, title, split=split)
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return path


# separation.png's panels: (measure, panel title, y label, reference line and its name).
_SEPARATION_PANELS = (
    ("cos_gap", "Same-task minus cross-task cosine", "mean cosine difference", (0.0, "no separation")),
    ("auroc", "AUROC of the cosine for “same task”", "AUROC", (0.5, "no separation")),
    ("same_task_weight", "Weight on same-task partners (dashed: equal weights)", "weight, summed over partners", None),
    ("step_length", "Length of a client's step", "over its own update's (same lengths)", (1.0, "own update")),
)


def plot_separation(runs: Sequence[Run], path: Path) -> Path:
    """Per round, how well each label's similarity and weights find the task groups (:func:`group_separation`).

    Four panels: same-task minus cross-task cosine, the cosine's AUROC for "same task", the
    weight on same-task partners with its equal-weights reference dashed in the same colour, and
    the length of the step a client receives over its own update's (``step_length``). Lines
    are the mean over seeds, bands ± one std; labels without task groups are left out, and a label
    without a similarity matrix (e.g. the cluster oracle) shows in the weight panel only.
    """
    import matplotlib.pyplot as plt

    series = {
        label: per_run
        for label, group in group_by_label(runs).items()
        if (per_run := [rounds for run in group if _has_groups(rounds := group_separation(run))])
    }
    figure, axes = plt.subplots(1, len(_SEPARATION_PANELS), figsize=(19, 4.8), layout="constrained")
    for (label, per_run), colour in zip(series.items(), strategy_colours(len(series))):
        rounds = sorted({row["round"] for rows in per_run for row in rows})
        name = f"{label} ({len(per_run)} seed{'s' * (len(per_run) > 1)})"
        for ax, (measure, *_) in zip(axes, _SEPARATION_PANELS):
            mean, std = _seed_band(per_run, rounds, measure)
            if np.isnan(mean).all():
                continue
            ax.plot(rounds, mean, marker="o", markersize=4, color=colour, label=name)
            ax.fill_between(rounds, mean - std, mean + std, color=colour, alpha=0.15)
        uniform, _ = _seed_band(per_run, rounds, "uniform_same_task_weight")
        axes[2].plot(rounds, uniform, linestyle="--", linewidth=1, color=colour)
    for ax, (_, title, ylabel, reference) in zip(axes, _SEPARATION_PANELS):
        if reference is not None:
            ax.axhline(reference[0], color="0.4", linestyle=":", linewidth=1, label=reference[1])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("server round")
        ax.set_ylabel(ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[1].set_ylim(-0.02, 1.02)  # the AUROC's whole range, so 0.5 sits mid-panel
    axes[2].set_ylim(bottom=0)  # weights among many clients are small: a full [0, 1] would flatten them
    axes[3].set_ylim(0, 1.05)  # a step as long as the client's own update at most (before a server step)
    # One legend for all panels: the weight panel has every label (any matrix gives weights or cosines).
    handles = {h.get_label(): h for ax in axes for h in ax.get_legend_handles_labels()[0]}
    figure.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=min(len(handles), 5))
    some = next(run for run in runs if _has_groups(group_separation(run)))
    tasks = {info["task"] for info in some.clients.values()}
    figure.suptitle(
        f"Do the similarity and the weights find the task groups? {len(some.clients)} clients in {len(tasks)} tasks;"
        " each round over the clients that took part; mean over seeds, band ± std"
    )
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return path


def plot_privacy(rows: Sequence[Mapping[str, Any]], metric: str, path: Path) -> Path | None:
    """Privacy against utility (:func:`privacy_rows`' rows): per strategy and DP mode, as the budget ε
    shrinks, the personalized score, the same-task minus cross-task cosine (first recorded round solid,
    last dashed) and the weight on same-task partners in the first round (equal weights' reference
    dotted). ε is on a categorical axis, ∞ (no DP) rightmost and joining every DP mode's line of its
    strategy; points are means over seeds, bars ± one std. Rows without a budget (σ set) are left out;
    None (no file) when no row has one.
    """
    import matplotlib.pyplot as plt

    budgets = sorted({r["epsilon"] for r in rows if not math.isnan(r["epsilon"])})
    where = {epsilon: index for index, epsilon in enumerate(budgets)}
    # Settings every row shares (e.g. a conf file's learning rate) name no line apart: leave them out.
    shared = len({row["settings"] for row in rows}) == 1
    lines: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        if row["dp"] != "none" and not math.isnan(row["epsilon"]):
            base = row["base_strategy"] if shared else row["base"]
            lines.setdefault(f"{base}, {row['dp']}", []).append(row)
    for points in lines.values():  # the strategy's run without DP is every mode's ε = ∞ point
        points += [r for r in rows if r["dp"] == "none" and r["base"] == points[0]["base"]]
    panels = (
        (("score",), f"personalized {metric} (last round)", f"Personalized {metric}"),
        (("cos_gap_first", "cos_gap_last"), "mean cosine difference", "Same-task minus cross-task cosine"),
        (("same_task_weight_first",), "weight, summed over partners", "Weight on same-task partners, first round"),
    )
    if not lines:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(16, 4.8), layout="constrained")
    for (name, points), colour in zip(lines.items(), strategy_colours(len(lines))):
        points = sorted(points, key=lambda r: where[r["epsilon"]])
        x = [where[r["epsilon"]] for r in points]
        for ax, (columns, *_) in zip(axes, panels):
            for column, style in zip(columns, ("-", "--")):
                mean = np.array([r[f"{column}_mean"] for r in points])
                if np.isnan(mean).all():
                    continue
                std = np.nan_to_num([r[f"{column}_std"] for r in points])
                suffix = {"cos_gap_first": ", first round", "cos_gap_last": ", last round"}.get(column, "")
                ax.errorbar(
                    x, mean, yerr=std, color=colour, linestyle=style, marker="o", capsize=3, label=name + suffix
                )
        uniform = np.array([r["uniform_same_task_weight_first_mean"] for r in points])
        if not np.isnan(uniform).all():
            axes[2].plot(x, uniform, color=colour, linestyle=":", linewidth=1)
    axes[1].axhline(0.0, color="0.4", linestyle=":", linewidth=1)
    for ax, (_, ylabel, title) in zip(axes, panels):
        ax.set_xticks(range(len(budgets)), [_budget_text(epsilon) for epsilon in budgets])
        ax.set_xlabel("privacy budget ε per client (δ as run; ∞: no DP)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    figure.suptitle("What differential privacy costs: score and task-group separation as the budget shrinks")
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return path


def _seed_band(
    per_run: Sequence[Sequence[Mapping[str, Any]]], rounds: Sequence[int], measure: str
) -> tuple[np.ndarray, np.ndarray]:
    """Per round of ``rounds``, the mean and the std (0 for one value) over runs of ``measure``, NaN where none has it.

    Returns
    -------
    tuple of np.ndarray
        Mean and std, float64, shape (len(rounds),).
    """
    values = [
        [row[measure] for rows in per_run for row in rows if row["round"] == rnd and row[measure] is not None]
        for rnd in rounds
    ]
    mean = np.array([np.mean(v) if v else np.nan for v in values])
    std = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values])
    return mean, std


def write_plots(runs: Sequence[Run], out: Path) -> list[Path]:
    """scores_per_round.png, per_client.png, similarity_<label>.png, separation.png for runs with
    task groups and matrices, privacy.png for runs with DP (:func:`plot_privacy`), and
    cross_task_<label>.png (first seed) for runs with eval-cross, in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_scores_per_round(runs, out / "scores_per_round.png"), plot_per_client(runs, out / "per_client.png")]
    if any(_has_groups(group_separation(run)) for run in runs):
        paths.append(plot_separation(runs, out / "separation.png"))
    privacy = privacy_rows(runs)
    if privacy and (plot := plot_privacy(privacy, METRIC_LABELS[runs[0].primary_metric], out / "privacy.png")):
        paths.append(plot)
    for strategy, group in group_by_label(runs).items():
        if any("similarity" in r for r in group[0].rounds):
            paths.append(plot_similarity(group[0], out / f"similarity_{strategy}.png"))
        cross = cross_task_of(group[0])
        if cross is not None:
            path = out / f"cross_task_{strategy}.png"
            title = f"{strategy}, seed {group[0].seed}"
            paths.append(plot_cross_task(cross, group[0].primary_metric, title, path, split=group[0].split))
    return paths
