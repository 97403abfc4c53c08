"""What travels between ServerApp and ClientApp: record keys and adapter <-> ArrayRecord.

Server -> client (train / evaluate): ``arrays`` (the client's own adapter) and ``config``
(``server-round`` and ``partition-id``, the partition the adapter belongs to; the client
refuses a message addressed to another partition); evaluate messages may also carry
``global`` (the mean adapter, whose scores come back prefixed ``global-``). Client -> server: ``arrays`` (train
only) and ``metrics`` (``partition-id``, ``num-examples``, losses or scores). Query
(partition discovery): the reply's ``info`` ConfigRecord describes the client's partition.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

ARRAYS = "arrays"
GLOBAL = "global"  # evaluate messages with eval-global: the mean adapter, scored as well
GLOBAL_PREFIX = "global-"  # its scores in the reply's metrics
CONFIG = "config"
METRICS = "metrics"
INFO = "info"

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
NUM_EXAMPLES = "num-examples"
SERVER_ROUND = "server-round"
# Evaluation metrics with this prefix are per-test-item lists (e.g. "items-exact_match").
ITEMS_PREFIX = "items-"
# Wall-clock time (time.time()) when a client started and finished handling a message;
# the server uses them to split round time into client work and Flower overhead.
BUSY_KEYS = ("client-started", "client-ended")


def adapter_to_record(adapter: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named arrays -> ArrayRecord, preserving names and order."""
    return ArrayRecord({name: Array(np.ascontiguousarray(array)) for name, array in adapter.items()})


def record_to_adapter(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> named NumPy arrays, preserving names and order."""
    return {name: array.numpy() for name, array in record.items()}


def count_bytes(content: RecordDict) -> int:
    """Payload bytes of a message, as the records themselves count them."""
    return sum(record.count_bytes() for record in content.values())
