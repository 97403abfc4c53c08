"""Cross-task evaluation on the server (``eval-cross``): checking the clients' cross-task scores and
assembling the clients × tasks matrix of the final round's record.

The matrix's entry (client i, task t) is client i's final adapter on the ``eval-split`` items of the
clients of task t that started (the items those clients score themselves), as the item-weighted mean
of its per-partition scores, i.e. the mean over the union of those items; on its own task, its
ordinary score on its own items (so that entry is the round's ``eval`` score). A reply whose
cross-task part cannot be used is a failure of phase ``cross-task`` (its ordinary scores are kept),
and its row is null. Pure: no torch, no Flower.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedbilevel import protocol
from fedbilevel.strategies.replies import RejectedReply

CROSS_LISTS = (
    protocol.CROSS_ITEMS,
    protocol.CROSS_DIGESTS,
    *(f"{protocol.CROSS_PREFIX}{name}" for name in protocol.TEXT_METRICS),
)


def split_cross(metrics: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A reply's metrics without and with the ``cross-`` prefix: (ordinary, cross-task)."""
    ordinary = {k: v for k, v in metrics.items() if not k.startswith(protocol.CROSS_PREFIX)}
    cross = {k: v for k, v in metrics.items() if k.startswith(protocol.CROSS_PREFIX)}
    return ordinary, cross


def task_order(clients: Mapping[int, Mapping[str, Any]]) -> list[str]:
    """The tasks of the started clients, in order of the lowest partition id holding each."""
    return list(dict.fromkeys(clients[p].get(protocol.TASK) for p in sorted(clients)))


def check_cross_scores(
    metrics: Mapping[str, Any], partition_id: int, clients: Mapping[int, Mapping[str, Any]]
) -> dict[str, Any]:
    """The per-partition lists of a reply's cross-task part, if they may be used.

    Parameters
    ----------
    metrics : mapping
        The reply's metrics: its ordinary scores (finite, as :func:`~fedbilevel.strategies.replies.check_reply`
        checked) and its ``cross-`` part (unchecked: NaN or Inf fail here).
    partition_id : int
        The client that replied.
    clients : mapping of int to mapping
        Partition id -> the query reply's info of every started client (``task``, ``num-test``,
        ``num-partitions``, ``data-digest``).

    Returns
    -------
    dict[str, list or float]
        The lists of :data:`CROSS_LISTS`, each with one entry per partition, ``cross-seconds``, and
        ``cross-feddpa-mean-weight`` where the reply has it (FedDPA).

    Raises
    ------
    RejectedReply
        If the reply has no cross-task part, an ordinary text score (the own-task entry) or
        ``cross-seconds`` is missing, a list is missing or has another length than the client's
        ``num-partitions``, a started partition of another task was scored on a number of items other
        than its owner's ``num-test`` or from data whose digest is not its owner's ``data-digest``, a
        partition of the client's own task was scored, ``cross-seconds`` is not finite, a score is
        NaN or outside [0, 1], or a ``cross-feddpa-mean-weight`` is not a number in [−1, 1].
    """
    missing = [name for name in protocol.TEXT_METRICS if name not in metrics]
    if missing:
        raise RejectedReply(f"cross-task scores: no '{missing[0]}' score on its own task")
    _, cross = split_cross(metrics)
    if not cross:
        raise RejectedReply("cross-task scores: none in the reply; the evaluate message asked for them")
    seconds = cross.get(protocol.CROSS_SECONDS)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not np.isfinite(seconds):
        raise RejectedReply(f"cross-task scores: '{protocol.CROSS_SECONDS}' is {seconds!r}; expected a finite number")
    size = clients[partition_id].get(protocol.NUM_PARTITIONS)
    for key in CROSS_LISTS:
        value = cross.get(key)
        if not isinstance(value, list) or len(value) != size:
            found = f"{len(value)} entries" if isinstance(value, list) else repr(value)
            raise RejectedReply(f"cross-task scores: '{key}' is {found}; expected one entry per partition ({size})")
    own = clients[partition_id].get(protocol.TASK)
    items = cross[protocol.CROSS_ITEMS]
    for partition, info in sorted(clients.items()):
        if info.get(protocol.TASK) == own:
            expected = 0  # the client's own task: its ordinary score stands for it
        else:
            expected = info.get(protocol.NUM_TEST)
            digest = info.get(protocol.DATA_DIGEST)
            if digest is not None and cross[protocol.CROSS_DIGESTS][partition] != protocol.digest_number(digest):
                raise RejectedReply(
                    f"cross-task scores: partition {partition}'s data as this client loaded it differs from its "
                    f"owner's (data-digest {digest}); expected the same data-path, seed and data settings"
                )
        if items[partition] != expected:
            raise RejectedReply(
                f"cross-task scores: {items[partition]} items of partition {partition} ({info.get(protocol.TASK)}) "
                f"scored; expected {expected}"
            )
    for name in protocol.TEXT_METRICS:
        values = cross[f"{protocol.CROSS_PREFIX}{name}"]
        outside = next((p for p, value in enumerate(values) if not 0.0 <= value <= 1.0), None)
        if outside is not None:
            raise RejectedReply(
                f"cross-task scores: {name} {values[outside]!r} on partition {outside}; expected a score in [0, 1]"
            )
    checked = {**{key: list(cross[key]) for key in CROSS_LISTS}, protocol.CROSS_SECONDS: float(seconds)}
    if protocol.CROSS_DPA_MEAN_WEIGHT in cross:
        weight = cross[protocol.CROSS_DPA_MEAN_WEIGHT]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not -1.0 <= weight <= 1.0:
            raise RejectedReply(
                f"cross-task scores: '{protocol.CROSS_DPA_MEAN_WEIGHT}' is {weight!r}; expected a number in [-1, 1]"
            )
        checked[protocol.CROSS_DPA_MEAN_WEIGHT] = float(weight)
    return checked


def cross_task_row(
    lists: Mapping[str, Sequence],
    own_scores: Mapping[str, float],
    partition_id: int,
    tasks: Sequence[str],
    clients: Mapping[int, Mapping[str, Any]],
) -> tuple[dict[str, list[float]], list[int]]:
    """One client's row of the matrix: per metric, its score on each task's items, and the item counts.

    Parameters
    ----------
    lists : mapping
        Its checked per-partition lists (:func:`check_cross_scores`).
    own_scores : mapping of str to float
        Its ordinary scores this round (``num-examples``: the items they are over).
    partition_id : int
        The client.
    tasks : sequence of str
        The matrix's columns (:func:`task_order`).
    clients : mapping of int to mapping
        Partition id -> info of every started client.

    Returns
    -------
    tuple of (dict[str, list of float], list of int)
        Per metric of :data:`fedbilevel.protocol.TEXT_METRICS`, one score per task (the item-weighted
        mean over that task's started partitions; the ordinary score on its own task), and the
        number of items behind each.
    """
    own = clients[partition_id].get(protocol.TASK)
    scores: dict[str, list[float]] = {name: [] for name in protocol.TEXT_METRICS}
    counts: list[int] = []
    for task in tasks:
        if task == own:
            counts.append(int(own_scores[protocol.NUM_EXAMPLES]))
            for name in protocol.TEXT_METRICS:
                scores[name].append(float(own_scores[name]))
            continue
        members = [p for p in sorted(clients) if clients[p].get(protocol.TASK) == task]
        weights = np.array([lists[protocol.CROSS_ITEMS][p] for p in members], dtype=np.float64)
        counts.append(int(weights.sum()))
        for name in protocol.TEXT_METRICS:
            values = np.array([lists[f"{protocol.CROSS_PREFIX}{name}"][p] for p in members], dtype=np.float64)
            scores[name].append(float(values @ weights / weights.sum()))
    return scores, counts


def cross_task_means(cross: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """Own-task and other-task means of a recorded matrix (:func:`cross_task_record`'s layout).

    Own task: the mean over clients of each one's entry in its own task's column. Other tasks: the
    mean over clients of the mean of each one's entries in the other columns (every client counts
    once, as in the personalized mean). Clients without a row (null) are left out.

    Parameters
    ----------
    cross : mapping
        ``tasks`` (list of str), ``client_tasks`` (list of str, one per row) and ``scores``
        (metric -> rows × tasks list of lists, a row None where the client has no scores).

    Returns
    -------
    dict
        ``{"own_task": {metric: mean}, "other_task": {metric: mean}}``; a mean is None when no
        client has a row, and the other-task mean also when there is a single task.
    """
    tasks = list(cross["tasks"])
    out: dict[str, dict[str, float | None]] = {"own_task": {}, "other_task": {}}
    for name, rows in cross["scores"].items():
        own, other = [], []
        for row, task in zip(rows, cross["client_tasks"]):
            if row is None:
                continue
            column = tasks.index(task)
            own.append(row[column])
            if len(tasks) > 1:
                other.append(float(np.mean([v for k, v in enumerate(row) if k != column])))
        out["own_task"][name] = float(np.mean(own)) if own else None
        out["other_task"][name] = float(np.mean(other)) if other else None
    return out


def cross_task_record(
    rows: Mapping[int, tuple[Mapping[str, list[float]], list[int], float]],
    clients: Mapping[int, Mapping[str, Any]],
    mixing: Mapping[int, tuple[float, float]] | None = None,
) -> dict[str, Any]:
    """The round record's ``cross_task`` entry: the clients × tasks matrix and its means.

    Parameters
    ----------
    rows : mapping of int to tuple
        Partition id -> (per-metric scores over the tasks, item counts, seconds spent), from
        :func:`cross_task_row`, for every client with usable cross-task scores.
    clients : mapping of int to mapping
        Partition id -> info of every started client.
    mixing : mapping of int to (float, float), optional
        FedDPA: partition id -> its mean α(x), the global adapter's weight, over its own items and
        over the other tasks' items.

    Returns
    -------
    dict
        ``tasks`` (columns, :func:`task_order`), ``clients`` (rows: partition ids ordered by task,
        then id), ``client_tasks`` (each row's own task), ``scores`` (metric -> rows × tasks list of
        lists of float), ``items`` (rows × tasks int counts), ``seconds`` (per row); a row is None
        where the client has no usable cross-task scores. Then ``own_task_mean`` and
        ``other_task_mean`` (metric -> float or None, :func:`cross_task_means`). With ``mixing``,
        ``feddpa_mean_weight``: per row [own items, other tasks' items] or None.
    """
    tasks = task_order(clients)
    order = sorted(clients, key=lambda p: (tasks.index(clients[p].get(protocol.TASK)), p))
    record: dict[str, Any] = {
        "tasks": tasks,
        "clients": order,
        "client_tasks": [clients[p].get(protocol.TASK) for p in order],
        "scores": {name: [rows[p][0][name] if p in rows else None for p in order] for name in protocol.TEXT_METRICS},
        "items": [rows[p][1] if p in rows else None for p in order],
        "seconds": [rows[p][2] if p in rows else None for p in order],
    }
    if mixing:
        record["feddpa_mean_weight"] = [list(mixing[p]) if p in mixing else None for p in order]
    means = cross_task_means(record)
    record["own_task_mean"], record["other_task_mean"] = means["own_task"], means["other_task"]
    return record
