"""Everything a run leaves in ``outputs/<run-name>/``.

- ``config.json``: the resolved run config, seed, package versions, command line.
- ``results.json``: per client info, one record per round, a summary; rewritten
  atomically after every round so a crashed run still leaves what it finished.
- ``clients/<partition id>/``: each final personalized adapter as a PEFT folder (FedDPA: its
  global and local adapters in ``global/`` and ``local/``).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from fedbilevel import protocol
from fedbilevel.config import RunConfig
from fedbilevel.options import resolve_user_path
from fedbilevel.resources import process_memory_mb

METRIC_LABELS = {
    "rouge1": "ROUGE-1",
    "rougeL": "ROUGE-L",
    "exact_match": "exact match",
    "accuracy": "accuracy",
    "macro_f1": "macro F1",
}
# The metric that picks the best round: exact match for the synthetic tasks (short,
# deterministic answers, where ROUGE's lowercasing hides the uppercase task), accuracy for
# images, ROUGE-L otherwise.
PRIMARY_METRIC = {"synthetic": "exact_match"}
_PACKAGES = ("fedbilevel", "flwr", "torch", "transformers", "peft", "numpy", "rouge-score", "flwr-datasets")


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        temporary = handle.name
    os.replace(temporary, path)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def make_run_dir(config: RunConfig) -> Path:
    """``<output-dir>/<run-name>``; the default name is strategy + UTC time, never reused.

    A relative ``output-dir`` is taken relative to ``$FEDBILEVEL_OUTPUT_ROOT`` when set
    (scripts/flwr_run.sh sets it to the project folder: under ``flwr run`` the ServerApp
    runs from a copy of the app elsewhere), else to the working directory.
    """
    name = config.run_name or f"{config.strategy}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    base = resolve_user_path(config.output_dir) / name
    candidate, suffix = base, 1
    while candidate.exists():
        suffix += 1
        candidate = base.with_name(f"{name}-{suffix}")
    candidate.mkdir(parents=True)
    return candidate


class RunRecorder:
    """Writes config.json at start, results.json after every round, adapters at the end.

    ``experiment`` (digests of the model and the initial adapter) is kept in config.json beside the
    package versions. With ``resumed_round`` the run continues an earlier one in the same folder: rounds
    after that round (recorded but not checkpointed before a crash) are dropped from
    results.json, and config.json keeps the original start and lists every resume.
    """

    def __init__(
        self,
        config: RunConfig,
        run_dir: Path,
        *,
        resumed_round: int | None = None,
        experiment: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        images = config.data.holds_images
        self.primary_metric = "accuracy" if images else PRIMARY_METRIC.get(config.data.source, "rougeL")
        self.metrics = protocol.IMAGE_METRICS if images else protocol.TEXT_METRICS
        self.results: dict[str, Any] = {"strategy": config.strategy, "clients": {}, "rounds": [], "summary": {}}
        self._started = time.time()
        now = datetime.now(UTC).isoformat(timespec="seconds")
        record = {
            "run_config": config.to_run_config(),
            "seed": config.seed,
            "run_dir": str(run_dir),
            "started_utc": now,
            "versions": package_versions(),
            # Digests of what the results depend on beyond the run config (a resume compares them).
            "experiment": dict(experiment or {}),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "command": sys.argv,
        }
        if resumed_round is not None:
            previous = json.loads((run_dir / "config.json").read_text())
            self.results = json.loads((run_dir / "results.json").read_text())
            self.results["rounds"] = [r for r in self.results["rounds"] if r["round"] <= resumed_round]
            self._started -= self.results["summary"].get("seconds", 0.0)
            record["started_utc"] = previous["started_utc"]
            record["resumes"] = [
                *previous.get("resumes", []),
                {"after_round": resumed_round, "utc": now, "command": sys.argv},
            ]
        write_json(run_dir / "config.json", record)

    def set_clients(self, clients: Mapping[int, Mapping[str, Any]]) -> None:
        """Partition id -> {task, num_train, num_test, majority_exact_match, num_truncated} from the query replies."""
        self.results["clients"] = {
            str(p): {
                "task": info.get(protocol.TASK),
                "num_train": info.get(protocol.NUM_TRAIN),
                "num_test": info.get(protocol.NUM_TEST),
                "majority_exact_match": info.get(protocol.MAJORITY_EXACT_MATCH),
                "num_truncated": info.get(protocol.NUM_TRUNCATED, 0),
            }
            for p, info in sorted(clients.items())
        }

    def record_round(self, record: Mapping[str, Any]) -> None:
        """Append a finished round and rewrite results.json."""
        entry = dict(record)
        entry["server_memory_mb"] = process_memory_mb()
        if entry["eval"]:
            entry["personalized_mean"] = {
                m: float(np.mean([scores[m] for scores in entry["eval"].values()])) for m in self.metrics
            }
            global_scores = [
                scores for scores in entry["eval"].values() if f"{protocol.GLOBAL_PREFIX}{self.metrics[0]}" in scores
            ]
            if global_scores:  # eval-global: the mean adapter on every client's split
                entry["global_mean"] = {
                    m: float(np.mean([scores[f"{protocol.GLOBAL_PREFIX}{m}"] for scores in global_scores]))
                    for m in self.metrics
                }
        self.results["rounds"].append(entry)
        self.results["summary"] = self._summary()
        write_json(self.run_dir / "results.json", self.results)

    def _summary(self) -> dict[str, Any]:
        evaluated = [r for r in self.results["rounds"] if "personalized_mean" in r]
        summary: dict[str, Any] = {
            "primary_metric": self.primary_metric,
            "metrics": list(self.metrics),
            "split": self.config.eval.split,
            "rounds_completed": len(self.results["rounds"]),
            "seconds": time.time() - self._started,
            "failures": sum(len(r["failures"]) for r in self.results["rounds"]),
        }
        splits = [r["time_split"] for r in self.results["rounds"] if "time_split" in r]
        if splits:
            totals = {
                k: sum(split[k] for split in splits)
                for k in ("client_train", "client_evaluate", "aggregation", "other")
            }
            round_seconds = sum(r["seconds"] for r in self.results["rounds"] if "time_split" in r)
            totals["other_fraction"] = totals["other"] / round_seconds if round_seconds > 0 else 0.0
            summary["time_split"] = totals
        if evaluated:
            best = max(evaluated, key=lambda r: r["personalized_mean"][self.primary_metric])
            summary.update(
                personalized_mean=evaluated[-1]["personalized_mean"],
                best_round=best["round"],
                best_personalized_mean=best["personalized_mean"],
            )
        return summary

    def table(self) -> str:
        """Final per-client scores as a Markdown table (printed at the end of a run)."""
        last = next((r for r in reversed(self.results["rounds"]) if r["eval"]), None)
        if last is None:
            return "no evaluation was recorded"
        lines = [
            "| client | task | train | test | " + " | ".join(METRIC_LABELS[m] for m in self.metrics) + " |",
            "|---|---|---|---|" + "---|" * len(self.metrics),
        ]
        for pid, info in self.results["clients"].items():
            scores = last["eval"].get(pid)
            cells = [f"{scores[m]:.3f}" for m in self.metrics] if scores else ["failed"] * len(self.metrics)
            lines.append(
                f"| {pid} | {info['task']} | {info['num_train']} | {info['num_test']} | " + " | ".join(cells) + " |"
            )
        mean = last["personalized_mean"]
        lines.append("| mean | | | | " + " | ".join(f"{mean[m]:.3f}" for m in self.metrics) + " |")
        if "cross_task" in last:
            lines += ["", cross_task_table(last["cross_task"], self.primary_metric, self.config.eval.split)]
        return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def cross_task_table(cross: Mapping[str, Any], metric: str, split: str) -> str:
    """A round's cross-task matrix (eval-cross) as a Markdown table, with each client's own-task and
    other-task scores and their means over clients.

    Parameters
    ----------
    cross : mapping
        The round record's ``cross_task`` entry (:func:`fedbilevel.strategies.cross_task.cross_task_record`).
    metric : str
        The score shown (the run's primary metric).
    split : str
        What the clients score (``eval-split``), named in the heading.

    Returns
    -------
    str
        A heading line, then one row per client (ordered by task; "–" where it has no scores) and a
        mean row; under FedDPA, a line with its mean weight α(x) on own and other-task items.
    """
    tasks = cross["tasks"]
    lines = [
        f"Cross-task {METRIC_LABELS[metric]}: each client's adapter on each task's {split} items (its own task: "
        "its own items, as above); *other tasks*: the mean over the other tasks' columns:",
        "",
        "| client | task | " + " | ".join(tasks) + " | own task | other tasks |",
        "|---|---|" + "---|" * (len(tasks) + 2),
    ]
    for client, task, row in zip(cross["clients"], cross["client_tasks"], cross["scores"][metric]):
        if row is None:
            cells = ["–"] * (len(tasks) + 2)
        else:
            own = tasks.index(task)
            others = [value for k, value in enumerate(row) if k != own]
            cells = [_cell(value) for value in row] + [_cell(row[own]), _cell(np.mean(others) if others else None)]
        lines.append(f"| {client} | {task} | " + " | ".join(cells) + " |")
    own_mean, other_mean = cross["own_task_mean"][metric], cross["other_task_mean"][metric]
    lines.append("| mean | |" + " |" * len(tasks) + f" {_cell(own_mean)} | {_cell(other_mean)} |")
    mixing = [row for row in cross.get("feddpa_mean_weight", []) if row is not None]
    if mixing:
        own_weight, other_weight = np.mean(mixing, axis=0)
        lines += [
            "",
            f"FedDPA's weight α(x) on the global adapter, mean over clients: {own_weight:.3f} on their own items, "
            f"{other_weight:.3f} on the other tasks' items.",
        ]
    return "\n".join(lines)
