"""A fake Grid and fake clients for strategy tests.

The fake clients answer QUERY/TRAIN/EVALUATE messages like the real ClientApp and
remember every adapter they were sent.
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from fedbilevel import protocol
from fedbilevel.simulation import InProcessGrid

INITIAL = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32)}


def update_of(partition_id: int, server_round: int) -> dict[str, np.ndarray]:
    """A distinct task vector per client and round (clients 0,1 and 2,3 point alike)."""
    rng = np.random.default_rng(1000 * partition_id + server_round)
    direction = np.ones(10) if partition_id < 2 else np.r_[np.ones(5), -np.ones(5)]
    flat = (direction + 0.3 * rng.normal(size=10)).astype(np.float32)
    return {"a": flat[:6].reshape(2, 3), "b": flat[6:]}


class FakeClient:
    def __init__(self, partition_id: int, behaviour: str = "good"):
        self.partition_id = partition_id
        self.behaviour = behaviour
        self.received: list[tuple[str, int, dict[str, np.ndarray]]] = []
        self.configs: list[dict] = []
        self.globals: list[dict[str, np.ndarray]] = []  # global adapters of evaluate messages (eval-global)

    def handle(self, message: Message) -> Message:
        if message.metadata.message_type == MessageType.QUERY:
            info = ConfigRecord({protocol.PARTITION_ID: self.partition_id, "task": f"task{self.partition_id // 2}"})
            return Message(RecordDict({protocol.INFO: info}), reply_to=message)
        config = message.content.config_records[protocol.CONFIG]
        self.configs.append(dict(config))
        assert config[protocol.PARTITION_ID] == self.partition_id, "message routed to the wrong client"
        adapter = protocol.record_to_adapter(message.content.array_records[protocol.ARRAYS])
        server_round = int(config[protocol.SERVER_ROUND])
        self.received.append((message.metadata.message_type, server_round, adapter))
        if protocol.GLOBAL in message.content.array_records:
            self.globals.append(protocol.record_to_adapter(message.content.array_records[protocol.GLOBAL]))
        started = time.time()
        time.sleep(0.005)  # some client work, so busy intervals have a length
        metrics = {
            protocol.PARTITION_ID: self.partition_id,
            protocol.NUM_EXAMPLES: 10,
            protocol.BUSY_KEYS[0]: started,
            protocol.BUSY_KEYS[1]: time.time(),
        }
        if message.metadata.message_type == MessageType.EVALUATE:
            metrics["exact_match"] = float(self.partition_id)
            return Message(RecordDict({protocol.METRICS: MetricRecord(metrics)}), reply_to=message)
        if self.behaviour == "silent":  # never answers a train message (a lost node, a timeout)
            return None
        if self.behaviour == "raise":
            # Shaped like the error Flower relays from a ClientApp that raised: a traceback, message last.
            trace = "Traceback (most recent call last):\n  File \"client_app.py\", line 161, in __call__\nRuntimeError: CUDA out of memory'>"
            return Message(Error(code=0, reason=trace), reply_to=message)
        trained = {k: v + update_of(self.partition_id, server_round)[k] for k, v in adapter.items()}
        if self.behaviour == "nan":
            trained["b"][0] = np.nan
        if self.behaviour == "shape":
            trained["b"] = np.zeros(5, np.float32)
        if self.behaviour == "impostor":
            metrics[protocol.PARTITION_ID] = 0
        metrics["train-loss"] = 1.0
        content = RecordDict({protocol.ARRAYS: protocol.adapter_to_record(trained), protocol.METRICS: MetricRecord(metrics)})
        return Message(content, reply_to=message)


class FakeGrid(InProcessGrid):
    """In-process grid: node id -> FakeClient; node ids can be reassigned (a restart)."""
