"""The round log: one round's record for results.json, filled in as the round runs.

The record holds the clients' train and eval entries, the failures (missing and rejected
replies), the bytes sent and received, and at the end the round's seconds and their split
into client training, client evaluation, server aggregation and the rest (Flower's overhead).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from logging import WARNING
from typing import Any

from flwr.app import Message, RecordDict
from flwr.supercore import log

from fedbilevel import protocol
from fedbilevel.strategies.cross_task import (
    check_cross_scores,
    cross_task_record,
    cross_task_row,
    split_cross,
    task_order,
)
from fedbilevel.strategies.replies import RejectedReply

# Train metrics with their own place in the round record; any others are kept under their own key.
_RECORDED_TRAIN_METRICS = {
    protocol.TRAIN_LOSS,
    protocol.TRAIN_SECONDS,
    protocol.PARTITION_ID,
    protocol.NUM_EXAMPLES,
    *protocol.BUSY_KEYS,
}
_MISSING_REASON = "no reply within round-timeout (node lost or too slow)"


def _covered(intervals: list[tuple[float, float]], start: float | None, end: float | None) -> float:
    """Length of the union of ``intervals`` clipped to [start, end] (0 if the phase did not run)."""
    if start is None or end is None:
        return 0.0
    clipped = sorted((max(a, start), min(b, end)) for a, b in intervals if b > start and a < end)
    total, current_start, current_end = 0.0, None, None
    for a, b in clipped:
        if current_end is None or a > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = a, b
        else:
            current_end = max(current_end, b)
    if current_end is not None:
        total += current_end - current_start
    return total


def over_all_clients(fields: Mapping[str, Any], clients: Sequence[int]) -> dict[str, Any]:
    """A strategy's round fields with its matrices (``similarity``, ``weights``: rows over ``participants``,
    columns over ``columns`` if given, else also ``participants``) spread over every known client, None
    where a row or column's client did not take part (``columns`` itself is dropped: the layout says it).

    So heatmaps compare across rounds when a fraction of the clients trains: row and column k are always
    client ``clients[k]`` (ascending partition id); ``participants`` still says who took part.

    Parameters
    ----------
    fields : mapping
        What :meth:`~fedbilevel.strategies.base.PersonalizedStrategy.personalize` returned.
    clients : sequence of int
        Every known partition id, ascending.

    Returns
    -------
    dict
        ``fields`` with N×N lists (None for absent clients); unchanged when everyone took part.
    """
    participants = list(fields.get("participants", []))
    out = dict(fields)
    columns = out.pop("columns", participants)
    if participants == columns == list(clients):
        return out
    row = {partition: k for k, partition in enumerate(participants)}
    column = {partition: k for k, partition in enumerate(columns)}
    for key in ("similarity", "weights"):
        if key in fields:
            matrix = fields[key]
            out[key] = [
                [matrix[row[i]][column[j]] if i in row and j in column else None for j in clients] for i in clients
            ]
    return out


class RoundLog:
    """One round's record (:attr:`record`), its clients' busy intervals and its phase time marks.

    Parameters
    ----------
    server_round : int
        The round's number, counted over resumes.

    Attributes
    ----------
    record : dict[str, Any]
        What results.json keeps of the round: ``round``, ``train`` and ``eval`` (partition id
        -> entry), ``failures``, ``bytes_down``, ``bytes_up``, then what the strategy adds, and
        ``seconds`` and ``time_split`` once :meth:`finish` ran.
    """

    def __init__(self, server_round: int) -> None:
        self.started = time.time()
        self.record: dict[str, Any] = {
            "round": server_round,
            "train": {},
            "eval": {},
            "failures": [],
            "bytes_down": 0,
            "bytes_up": 0,
        }
        self.start_failures = 0  # nodes that could not start as a client this round (note_start_failure)
        self._busy: dict[str, list[tuple[float, float]]] = {"train": [], "evaluate": []}  # phase -> client intervals
        self._marks: dict[str, float] = {}  # phase timestamps: train_sent, train_received, evaluate_...

    def mark(self, name: str) -> None:
        """Note the time now as ``name`` (``train_sent``, ``train_received``, ``evaluate_sent``, ...)."""
        self._marks[name] = time.time()

    def note_sent(self, content: RecordDict) -> None:
        """Count a message's payload in ``bytes_down``."""
        self.record["bytes_down"] += protocol.count_bytes(content)

    def note_received(self, message: Message) -> None:
        """Count a reply's payload in ``bytes_up`` (an error reply has none)."""
        self.record["bytes_up"] += protocol.count_bytes(message.content) if message.has_content() else 0

    def note_missing(self, phase: str, sent: Mapping[int, int], answered: set[int]) -> None:
        """Log and record every client in ``sent`` (node id -> partition id) whose node is not in ``answered``."""
        for node_id, partition_id in sorted(sent.items(), key=lambda item: item[1]):
            if node_id not in answered:
                log(
                    WARNING,
                    "round %d: %s reply from client %d (node %d) missing: %s",
                    self.record["round"],
                    phase,
                    partition_id,
                    node_id,
                    _MISSING_REASON,
                )
                self.record["failures"].append(
                    {"phase": phase, "partition_id": partition_id, "node_id": node_id, "reason": _MISSING_REASON}
                )

    def note_start_failure(self, node_id: int, partition_id: int | None, reason: str) -> None:
        """Log and record a node that could not start as a client this round (e.g. its data failed to
        load): it stands in the round's failures with phase ``start`` and counts as messaged."""
        who = f"client {partition_id} (node {node_id})" if partition_id is not None else f"node {node_id}"
        log(WARNING, "round %d: %s could not start: %s", self.record["round"], who, reason)
        self.record["failures"].append(
            {"phase": "start", "partition_id": partition_id, "node_id": node_id, "reason": reason}
        )
        self.start_failures += 1

    def note_rejected(self, phase: str, node_id: int, partition_id: int | None, error: RejectedReply) -> None:
        """Log and record a reply that is not used, with the reason (and a client's full error text)."""
        who = f"client {partition_id} (node {node_id})" if partition_id is not None else f"node {node_id}"
        log(WARNING, "round %d: %s reply from %s rejected: %s", self.record["round"], phase, who, error)
        failure = {"phase": phase, "partition_id": partition_id, "node_id": node_id, "reason": str(error)}
        if error.detail:
            failure["detail"] = error.detail
        self.record["failures"].append(failure)

    def note_busy(self, phase: str, metrics: Mapping[str, Any]) -> None:
        """Keep the interval a reply's client worked on its message, if it reports a valid one."""
        started, ended = (metrics.get(key) for key in protocol.BUSY_KEYS)
        if isinstance(started, float) and isinstance(ended, float) and ended >= started:
            self._busy[phase].append((started, ended))

    def note_train(self, partition_id: int, metrics: Mapping[str, Any]) -> None:
        """The train entry of a valid reply: loss, examples, seconds and any further client metrics."""
        self.record["train"][str(partition_id)] = {
            "loss": float(metrics[protocol.TRAIN_LOSS]),
            "num_examples": int(metrics[protocol.NUM_EXAMPLES]),
            "seconds": float(metrics.get(protocol.TRAIN_SECONDS, 0.0)),
            # e.g. the last step's loss, FedALA's weight learning
            **{key: float(value) for key, value in metrics.items() if key not in _RECORDED_TRAIN_METRICS},
        }

    def note_eval(self, replied: Mapping[int, Mapping[str, Any]]) -> dict[int, dict[str, float]]:
        """The eval entries of the valid replies (partition id -> metrics, in reply order).

        Scalar scores go to ``eval`` (ascending partition id); per-test-item lists to
        ``eval_items``, kept apart for intervals over test items. Returns the scalar scores
        in reply order.
        """
        scores: dict[int, dict[str, float]] = {}
        for partition_id, metrics in replied.items():
            scores[partition_id] = {
                k: float(v)
                for k, v in metrics.items()
                if k not in (protocol.PARTITION_ID, *protocol.BUSY_KEYS) and not isinstance(v, list)
            }
            items = {
                k.removeprefix(protocol.ITEMS_PREFIX): [float(x) for x in v]
                for k, v in metrics.items()
                if isinstance(v, list)
            }
            if items:
                self.record.setdefault("eval_items", {})[str(partition_id)] = items
        for partition_id in sorted(scores):
            self.record["eval"][str(partition_id)] = scores[partition_id]
        return scores

    def note_cross_task(
        self,
        replied: Mapping[int, Mapping[str, Any]],
        clients: Mapping[int, Mapping[str, Any]],
        nodes: Mapping[int, int],
    ) -> dict[int, dict[str, Any]]:
        """Record the round's ``cross_task`` matrix (eval-cross) from the valid evaluate replies; returns the
        replies' metrics without their ``cross-`` part, for :meth:`note_eval`.

        A reply whose cross-task part cannot be used (:func:`~fedbilevel.strategies.cross_task.check_cross_scores`)
        is logged and recorded as a failure of phase ``cross-task``; its row is null, its ordinary scores count.

        Parameters
        ----------
        replied : mapping of int to mapping
            Partition id -> metrics of each valid evaluate reply.
        clients : mapping of int to mapping
            Partition id -> query info of every started client.
        nodes : mapping of int to int
            Node id -> partition id (for the failures' ``node_id``).
        """
        node_of = {partition: node for node, partition in nodes.items()}
        tasks = task_order(clients)
        ordinary: dict[int, dict[str, Any]] = {}
        rows = {}
        mixing: dict[int, tuple[float, float]] = {}
        for partition_id, metrics in replied.items():
            ordinary[partition_id], _ = split_cross(metrics)
            try:
                lists = check_cross_scores(metrics, partition_id, clients)
            except RejectedReply as error:
                self.note_rejected("cross-task", node_of.get(partition_id), partition_id, error)
                continue
            scores, counts = cross_task_row(lists, metrics, partition_id, tasks, clients)
            rows[partition_id] = (scores, counts, lists[protocol.CROSS_SECONDS])
            if protocol.CROSS_DPA_MEAN_WEIGHT in lists and protocol.DPA_MEAN_WEIGHT in metrics:
                mixing[partition_id] = (float(metrics[protocol.DPA_MEAN_WEIGHT]), lists[protocol.CROSS_DPA_MEAN_WEIGHT])
        self.record["cross_task"] = cross_task_record(rows, clients, mixing)
        return ordinary

    def note_skipped(self, reason: str) -> None:
        """Record why this round aggregated nothing."""
        self.record["aggregation_skipped"] = reason

    def note_aggregation(self, fields: Mapping[str, Any], seconds: float) -> None:
        """Add the strategy's fields (e.g. similarity matrices) and the aggregation's seconds."""
        self.record.update(fields)
        self.record["seconds_aggregation"] = seconds

    def time_split(self, seconds: float) -> dict[str, float]:
        """Round time split into client training, client evaluation, server aggregation and the rest.

        A phase's client time is the union of the clients' busy intervals inside the
        phase (so parallel clients are not double counted); the rest of the round,
        where no client works and the server does not aggregate, is transport,
        scheduling and start-up: Flower's overhead (plus partition discovery).
        Assumes client and server clocks agree (true in simulation).
        """
        marks = self._marks
        split = {
            "client_train": _covered(self._busy["train"], marks.get("train_sent"), marks.get("train_received")),
            "client_evaluate": _covered(
                self._busy["evaluate"], marks.get("evaluate_sent"), marks.get("evaluate_received")
            ),
            "aggregation": float(self.record.get("seconds_aggregation", 0.0)),
        }
        split["other"] = max(seconds - sum(split.values()), 0.0)
        split["other_fraction"] = split["other"] / seconds if seconds > 0 else 0.0
        return split

    def finish(self) -> dict[str, Any]:
        """Add the round's ``seconds`` and ``time_split``; returns :attr:`record`."""
        self.record["seconds"] = time.time() - self.started
        self.record["time_split"] = self.time_split(self.record["seconds"])
        return self.record
