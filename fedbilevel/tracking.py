"""Run tracking: each round of results.json as it is recorded, for a live dashboard.

``tracker = "none"`` (the default) writes nothing. ``tracker = "tensorboard"`` (the
``[tensorboard]`` extra) writes TensorBoard event files to ``<run>/tensorboard/``, one step per
server round: see :class:`TensorBoardTracker`; view them with ``tensorboard --logdir outputs``.

The event files are a view of results.json: a resumed run writes them afresh from the rounds it
keeps, so rounds a crash recorded after the last checkpoint vanish there too.

The server uses a tracker as: :func:`make_tracker` at start-up (before any work, so a missing
extra stops the run at once), :meth:`Tracker.start` once the run folder exists,
:meth:`Tracker.log_round` after each :meth:`~fedbilevel.results.RunRecorder.record_round`,
:meth:`Tracker.close` at the end.
"""

from __future__ import annotations

import io
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedbilevel.comparison import (
    MATRICES,
    OPTION_METRIC,
    cross_task_inches,
    draw_cross_task,
    draw_matrix,
    heatmap_inches,
)
from fedbilevel.options import not_allowed
from fedbilevel.protocol import GLOBAL_PREFIX

# The [tensorboard] extra: without it, tracker = "tensorboard" is refused at start-up. matplotlib's
# Figure (slow to import) comes only with it: nothing else on the server draws.
try:
    from matplotlib.figure import Figure
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
except ImportError as error:
    _MISSING: str | None = str(error)
else:
    _MISSING = None

FOLDER = "tensorboard"  # inside the run folder
# The parts of results.json's ``time_split``, each tracked as ``time/<part>``.
_TIMES = ("client_train", "client_evaluate", "aggregation", "other")


class Tracker:
    """``tracker = "none"``: tracks nothing. The interface of every tracker."""

    def start(self, run_dir: Path, results: Mapping[str, Any]) -> None:
        """Begin tracking into ``run_dir``; ``results`` (results.json's content) may hold earlier rounds."""

    def log_round(self, results: Mapping[str, Any]) -> None:
        """Track the last round of ``results`` (called after it was recorded)."""

    def close(self) -> None:
        """Write out what is pending and release the files."""


class TensorBoardTracker(Tracker):
    """TensorBoard event files in ``<run>/tensorboard/``, one step per server round.

    Scalars: ``personalized_mean/<metric>`` (and ``global_mean/<metric>`` with eval-global);
    ``client/<id>/<score>`` (the run's metrics, option accuracy and global scores where recorded)
    and ``client/<id>/train_loss``; ``train_loss/mean`` over the clients that trained;
    ``time/round``, ``time/client_train``, ``time/client_evaluate``, ``time/aggregation``,
    ``time/other`` and ``time/checkpoint`` in seconds; ``bytes/down`` and ``bytes/up``; with
    eval-cross, ``cross_task/own_task_mean/<metric>`` and ``cross_task/other_task_mean/<metric>``.
    Images: ``matrix/similarity`` and ``matrix/weights``, the heatmaps of
    :func:`fedbilevel.comparison.plot_similarity`, for strategies that record them; with
    eval-cross, ``matrix/cross_task``, the clients × tasks heatmap of the run's primary metric
    (:func:`fedbilevel.comparison.plot_cross_task`).

    Raises
    ------
    ConfigError
        When the tensorboard package is missing (one line: key, value, how to install it).
    """

    def __init__(self) -> None:
        if _MISSING is not None:
            raise not_allowed(
                "tracker",
                "tensorboard",
                f"it needs the tensorboard package ({_MISSING}): "
                "install the extra with .venv/bin/pip install -e '.[tensorboard]', or set tracker='none'",
            )
        self._writer: Any = None

    def start(self, run_dir: Path, results: Mapping[str, Any]) -> None:
        """Open a fresh event file in ``<run_dir>/tensorboard/`` and write the rounds already in ``results``."""
        folder = run_dir / FOLDER
        # A resumed run: the old files may hold rounds the resume dropped; results.json has the rest.
        for old in folder.glob("events.out.tfevents.*"):
            old.unlink()
        self._writer = EventFileWriter(str(folder))
        for record in results["rounds"]:
            self._write(results, record)
        self._writer.flush()

    def log_round(self, results: Mapping[str, Any]) -> None:
        """Write the last round of ``results`` and flush (a dashboard shows it at once)."""
        self._write(results, results["rounds"][-1])
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _write(self, results: Mapping[str, Any], record: Mapping[str, Any]) -> None:
        values = [Summary.Value(tag=tag, simple_value=value) for tag, value in round_scalars(results, record).items()]
        figures = {
            f"matrix/{key}": _matrix_figure(record, key, results["clients"]) for key in MATRICES if key in record
        }
        if "cross_task" in record:
            figures["matrix/cross_task"] = _cross_task_figure(results, record)
        values += [Summary.Value(tag=tag, image=_png_image(figure)) for tag, figure in figures.items()]
        self._writer.add_event(Event(wall_time=time.time(), step=record["round"], summary=Summary(value=values)))


def round_scalars(results: Mapping[str, Any], record: Mapping[str, Any]) -> dict[str, float]:
    """Tag -> value of one round's scalars (see :class:`TensorBoardTracker`), from its results.json entry."""
    metrics = results["summary"]["metrics"]
    scores = [*metrics, OPTION_METRIC, *(GLOBAL_PREFIX + m for m in metrics)]
    out: dict[str, float] = {}
    for mean in ("personalized_mean", "global_mean"):
        out.update({f"{mean}/{m}": v for m, v in record.get(mean, {}).items()})
    for client, entry in record["eval"].items():
        out.update({f"client/{client}/{s}": entry[s] for s in scores if s in entry})
    for client, entry in record["train"].items():
        out[f"client/{client}/train_loss"] = entry["loss"]
    if record["train"]:
        out["train_loss/mean"] = float(np.mean([entry["loss"] for entry in record["train"].values()]))
    out["time/round"] = record["seconds"]
    out.update({f"time/{part}": record["time_split"][part] for part in _TIMES})
    if "seconds_checkpoint" in record:
        out["time/checkpoint"] = record["seconds_checkpoint"]
    out["bytes/down"], out["bytes/up"] = record["bytes_down"], record["bytes_up"]
    for mean in ("own_task_mean", "other_task_mean"):
        means = record.get("cross_task", {}).get(mean, {})
        out.update({f"cross_task/{mean}/{m}": v for m, v in means.items() if v is not None})
    return {tag: float(value) for tag, value in out.items()}


def _matrix_figure(record: Mapping[str, Any], key: str, clients: Mapping[str, Mapping[str, Any]]) -> Any:
    """The round's matrix ``key`` drawn as in the comparison plots, on a bare Figure."""
    size = heatmap_inches(len(record[key]))
    # A bare Figure, not pyplot: the ServerApp may run outside the main thread, where GUI backends fail.
    figure = Figure(figsize=(size + 1, size), layout="constrained")
    draw_matrix(figure, figure.add_subplot(), record, key, clients)
    absent = any(None in line for line in record[key])
    figure.suptitle(
        "rows: receiving client, columns: contributing client" + ("; grey: not in the round" if absent else ""),
        fontsize=8,
    )
    return figure


def _cross_task_figure(results: Mapping[str, Any], record: Mapping[str, Any]) -> Any:
    """The round's cross-task matrix (eval-cross) of the run's primary metric, on a bare Figure."""
    figure = Figure(figsize=cross_task_inches(record["cross_task"]), layout="constrained")
    summary, title = results["summary"], f"{results['strategy']}, round {record['round']}"
    split = summary.get("split", "test")  # results.json written before the summary named its split
    draw_cross_task(figure, figure.add_subplot(), record["cross_task"], summary["primary_metric"], title, split=split)
    return figure


def _png_image(figure: Any) -> Any:
    """``figure`` as a PNG image summary."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    png = buffer.getvalue()
    # The PNG header's IHDR chunk holds width and height (big-endian, bytes 16 to 24).
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    return Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)


_TRACKERS = {"none": Tracker, "tensorboard": TensorBoardTracker}


def make_tracker(name: str) -> Tracker:
    """The tracker ``name`` (run-config key ``tracker``, already checked), ready to :meth:`~Tracker.start`."""
    return _TRACKERS[name]()
