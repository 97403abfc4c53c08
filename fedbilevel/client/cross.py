"""Cross-task evaluation (``eval-cross``): a client's adapter on the other tasks' items.

A client holds only its own partition, but every loader is deterministic given the data
settings, the run seed, the partition and the number of partitions, so a client loads every
other partition itself with the same call the owning client makes
(:func:`fedbilevel.data.load_client_data`) and scores the ``eval-split`` items of those whose
task differs from its own: the items their owners score, capped as theirs are
(``max-test-examples``). The reply says, per partition, how many items were scored and the
digest of the data loaded, so the server can check them against what each owner reported
(:mod:`fedbilevel.strategies.cross_task`). Its own task's partitions are not scored again: the
own-task score is the client's ordinary score, on its own items.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from logging import INFO
from typing import Any

from flwr.supercore import log

from fedbilevel import protocol
from fedbilevel.config import RunConfig
from fedbilevel.data import load_client_data
from fedbilevel.data.settings import DataSettings
from fedbilevel.data.types import ClientData, Example, data_digest

Scorer = Callable[[Sequence[Example]], Mapping[str, Any]]


@functools.lru_cache(maxsize=1)
def all_partitions(data: DataSettings, seed: int, num_partitions: int) -> tuple[ClientData | str, ...]:
    """Every partition of the federation, loaded as its owner loads it (text data: no preprocessing).

    A partition that cannot be loaded is the reason (str) instead: its owner could not start for
    the same reason and is a recorded failure, which is no cause to lose this client's scores.
    Cached: the clients that one simulation process runs share one copy.
    """
    return tuple(_load_or_reason(data, p, num_partitions, seed) for p in range(num_partitions))


def _load_or_reason(data: DataSettings, partition_id: int, num_partitions: int, seed: int) -> ClientData | str:
    try:
        return load_client_data(data, partition_id, num_partitions, seed=seed)
    except Exception as error:  # whatever stops the owner's start-up (a client's start catches the same)
        return f"{type(error).__name__}: {error}"


def other_task_items(
    partitions: Sequence[ClientData | str], partition_id: int, split: str
) -> list[tuple[int, list[Example]]]:
    """(partition id, its ``split`` items) of each loaded partition whose task differs from ``partition_id``'s.

    Parameters
    ----------
    partitions : sequence of ClientData or str
        The federation, indexed by partition id (:func:`all_partitions`; str: why it could not be
        loaded, so not scored).
    partition_id : int
        The scoring client.
    split : str
        ``eval-split``: the split every client scores.

    Returns
    -------
    list of (int, list of Example)
        In partition order.
    """
    own = partitions[partition_id].task
    return [
        (p, data.split(split)) for p, data in enumerate(partitions) if isinstance(data, ClientData) and data.task != own
    ]


def per_partition(
    scores: Mapping[str, Any], scored: Sequence[tuple[int, Sequence[Example]]], num_partitions: int
) -> dict[str, list[float] | list[int]]:
    """The reply's per-partition lists from the per-item scores of the concatenated items.

    Parameters
    ----------
    scores : mapping
        What the scorer returned for the items of ``scored`` in order: ``items-<score>`` lists
        of float for each of :data:`fedbilevel.protocol.TEXT_METRICS`, one entry per item.
    scored : sequence of (int, sequence of Example)
        (partition id, its items) in the order they were scored.
    num_partitions : int
        Length of every list.

    Returns
    -------
    dict
        ``cross-items`` (list of int) and ``cross-<score>`` (list of float: the mean over the
        partition's items), one entry per partition; 0 where a partition was not scored.
    """
    out: dict[str, list] = {protocol.CROSS_ITEMS: [0] * num_partitions}
    out.update({f"{protocol.CROSS_PREFIX}{name}": [0.0] * num_partitions for name in protocol.TEXT_METRICS})
    start = 0
    for partition, items in scored:
        stop = start + len(items)
        out[protocol.CROSS_ITEMS][partition] = len(items)
        for name in protocol.TEXT_METRICS:
            values = scores[f"{protocol.ITEMS_PREFIX}{name}"][start:stop]
            out[f"{protocol.CROSS_PREFIX}{name}"][partition] = sum(values) / len(values)
        start = stop
    return out


def other_task_scores(score: Scorer, config: RunConfig, partition_id: int, num_partitions: int) -> dict[str, Any]:
    """The evaluate reply's ``cross-*`` metrics: the model ``score`` uses, on the other tasks' items.

    Parameters
    ----------
    score : callable
        ``items -> scores`` with the run's evaluation (the client's own scoring, on other items),
        returning ``items-<score>`` lists as :func:`fedbilevel.client.evaluate.evaluate_adapter`.
    config : RunConfig
        The client's run config: the federation (``data``, with the node's ``data-path``), the
        run seed and ``eval-split``.
    partition_id, num_partitions : int
        The scoring client and the federation's size.

    Returns
    -------
    dict
        ``cross-items``, ``cross-digests`` (list of int), ``cross-<score>`` (list of float),
        one entry per partition (see :mod:`fedbilevel.protocol`), and ``cross-seconds`` (float);
        with FedDPA's mixing (``score`` returns ``feddpa-mean-weight``), ``cross-feddpa-mean-weight``:
        the mean α(x) over the other tasks' items.
        A partition that cannot be loaded is logged and has 0 items and digest 0: the server
        ignores it if its owner did not start either, and records a ``cross-task`` failure of this
        client if it did (this node's data then differs from the owner's).
    """
    started = time.time()
    partitions = all_partitions(config.data, config.seed, num_partitions)
    for p, reason in enumerate(partitions):
        if isinstance(reason, str):
            log(INFO, "client %d: partition %d cannot be loaded, not scored (eval-cross): %s", partition_id, p, reason)
    scored = other_task_items(partitions, partition_id, config.eval.split)
    items = [item for _, chunk in scored for item in chunk]
    scores = score(items) if items else {}
    out: dict[str, Any] = per_partition(scores, scored, num_partitions)
    if protocol.DPA_MEAN_WEIGHT in scores:
        out[protocol.CROSS_DPA_MEAN_WEIGHT] = scores[protocol.DPA_MEAN_WEIGHT]
    out[protocol.CROSS_DIGESTS] = [
        protocol.digest_number(data_digest(partition)) if isinstance(partition, ClientData) else 0
        for partition in partitions
    ]
    out[protocol.CROSS_SECONDS] = time.time() - started
    log(
        INFO,
        "client %d (%s): scored %d items of %d other-task partitions in %.1f s (eval-cross)",
        partition_id,
        partitions[partition_id].task,
        len(items),
        len(scored),
        out[protocol.CROSS_SECONDS],
    )
    return out
