"""Pure checks of a client's reply before anything of it is aggregated.

A reply is used only if it is no error, names the partition its message was for, counts
examples, has finite metrics, and (train replies) has a finite loss and an adapter shaped
like θ⁰ with finite values small enough for the aggregation's float32 arithmetic. The
checks raise :class:`RejectedReply` with the reason in one line; recording and logging the
rejection is the strategy's part (:mod:`fedbilevel.strategies.rounds`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Message, RecordDict

from fedbilevel import protocol
from fedbilevel.privacy import released

# The largest squared L2 norm of an adapter the server aggregates. Task vectors τ = θ − θ̄ then have
# ‖τ‖² ≤ 2‖θ‖² + 2‖θ̄‖² ≤ float32's maximum, so every Gram entry, cosine and weighted sum the strategies
# compute in float32 stays finite; a finite but huge update is refused like NaN/Inf, not left to overflow.
MAX_SQUARED_NORM = float(np.finfo(np.float32).max) / 4


class RejectedReply(ValueError):
    """A reply that must not be aggregated; the message says why, in one line.

    Parameters
    ----------
    reason : str
        Why, in one line (the failure's ``reason`` in results.json).
    detail : str (default: "")
        A client's full error text (e.g. a traceback), kept as the failure's ``detail``.
    """

    def __init__(self, reason: str, *, detail: str = "") -> None:
        super().__init__(reason)
        self.detail = detail


def last_line(text: str) -> str:
    """The last non-blank line of a client's error text: the exception message, not the traceback.

    Parameters
    ----------
    text : str
        The error reason Flower relays from a ClientApp that raised.

    Returns
    -------
    str
        That line without the ``'>`` Flower appends, or ``text`` if it has no such line.
    """
    lines = [line.strip().rstrip("'>").strip() for line in text.splitlines() if line.strip().rstrip("'>").strip()]
    return lines[-1] if lines else text


def senders_of(replies: Sequence[Message], sent: Sequence[Message]) -> list[int]:
    """The node each reply answers for: its source, or, for an error Flower itself sends (e.g. "Node
    Unavailable" from the SuperLink, whose node id is not the client's), the destination of the
    message it replies to. Without this, one lost node counts twice: once missing, once unknown.

    Parameters
    ----------
    replies : sequence of Message
        The replies from ``grid.send_and_receive``.
    sent : sequence of Message
        The messages of this phase, after sending (Flower's grids give them their message ids).

    Returns
    -------
    list[int]
        One node id per reply, in order.
    """
    destinations = {message.metadata.dst_node_id for message in sent}
    answered = {message.metadata.message_id: message.metadata.dst_node_id for message in sent}
    return [
        reply.metadata.src_node_id
        if reply.metadata.src_node_id in destinations
        else answered.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        for reply in replies
    ]


def check_reply(message: Message, expected_partition: int | None, phase: str) -> tuple[int, dict[str, Any]]:
    """The partition id and metrics of a reply that may be used.

    Parameters
    ----------
    message : Message
        A client's reply to a train or evaluate message.
    expected_partition : int or None
        The partition its sender was messaged as (None: the sender was not messaged).
    phase : {"train", "evaluate"}
        Train replies must also report a finite ``train-loss``.

    Returns
    -------
    tuple[int, dict[str, Any]]
        ``expected_partition`` and the reply's metrics.

    Raises
    ------
    RejectedReply
        If the reply is an error, comes from an unknown node, lacks its metrics, names
        another partition, counts no examples, (train) has no finite loss or incomplete DP
        metrics (:func:`fedbilevel.privacy.released`), or any metric is NaN or Inf (but the
        ``cross-`` ones: :func:`fedbilevel.strategies.cross_task.check_cross_scores` checks those).
    """
    if message.has_error():
        raise RejectedReply(f"client error: {last_line(message.error.reason)}", detail=message.error.reason)
    if expected_partition is None:
        raise RejectedReply("reply from a node that was not sent a message")
    metrics_records = message.content.metric_records
    if protocol.METRICS not in metrics_records:
        raise RejectedReply(f"reply has no '{protocol.METRICS}' record")
    metrics = dict(metrics_records[protocol.METRICS])
    if metrics.get(protocol.PARTITION_ID) != expected_partition:
        raise RejectedReply(
            f"partition-id {metrics.get(protocol.PARTITION_ID)!r} in reply; the message was for {expected_partition}"
        )
    count = metrics.get(protocol.NUM_EXAMPLES)
    if not isinstance(count, (int, float)) or not count > 0:
        raise RejectedReply(f"num-examples {count!r}; expected a number > 0")
    if phase == "train" and not np.isfinite(metrics.get(protocol.TRAIN_LOSS, np.nan)):
        raise RejectedReply(f"train-loss {metrics.get(protocol.TRAIN_LOSS)!r}; expected a finite number")
    if phase == "train":
        try:
            released(metrics)
        except ValueError as error:
            raise RejectedReply(str(error)) from None
    for key, value in metrics.items():  # a NaN score would make the round's mean NaN
        if key.startswith(protocol.CROSS_PREFIX):
            continue  # eval-cross's part: its own checks refuse it alone, keeping the ordinary scores
        if not np.all(np.isfinite(value)):
            raise RejectedReply(f"metric '{key}': {value!r} holds NaN or Inf; expected finite numbers")
    return expected_partition, metrics


def check_adapter(content: RecordDict, reference: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The adapter of a train reply, if it matches ``reference`` and is finite.

    Parameters
    ----------
    content : RecordDict
        The reply's content.
    reference : dict[str, np.ndarray]
        θ⁰: the names, shapes and dtypes a valid adapter has.

    Returns
    -------
    dict[str, np.ndarray]
        The reply's adapter, in the order it was sent.

    Raises
    ------
    RejectedReply
        If the adapter is missing or not packed as :func:`~fedbilevel.protocol.adapter_to_record` packs it, has
        other names, shapes or dtypes, holds NaN or Inf, or its
        squared L2 norm exceeds :data:`MAX_SQUARED_NORM`.
    """
    if protocol.ARRAYS not in content.array_records:
        raise RejectedReply(f"reply has no '{protocol.ARRAYS}' record")
    try:
        adapter = protocol.record_to_adapter(content.array_records[protocol.ARRAYS])
    except ValueError as error:
        raise RejectedReply(str(error)) from None
    missing = [k for k in reference if k not in adapter]
    unexpected = [k for k in adapter if k not in reference]
    if missing or unexpected:
        raise RejectedReply(f"adapter keys differ: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, expected in reference.items():
        array = adapter[name]
        if array.shape != expected.shape:
            raise RejectedReply(f"array '{name}': shape {array.shape}, expected {expected.shape}")
        if array.dtype != expected.dtype:
            raise RejectedReply(f"array '{name}': dtype {array.dtype}, expected {expected.dtype}")
        if not np.all(np.isfinite(array)):
            raise RejectedReply(f"array '{name}': contains NaN or Inf")
    squared_norm = sum(float(np.sum(np.square(array, dtype=np.float64))) for array in adapter.values())
    if not squared_norm <= MAX_SQUARED_NORM:
        raise RejectedReply(
            f"adapter: squared norm {squared_norm:.3g} exceeds {MAX_SQUARED_NORM:.3g}; values this large would make "
            "the aggregation's float32 arithmetic overflow"
        )
    return adapter
