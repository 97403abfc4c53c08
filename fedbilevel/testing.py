"""Test doubles for strategy tests and server-side measurements.

:class:`InProcessGrid` runs a strategy's real server loop against in-process clients: no
Ray, no SuperLink. :class:`FakeClient` answers QUERY/TRAIN/EVALUATE messages like the real
ClientApp (with a distinct, seeded update per client and round, :func:`update_of`) and
remembers every adapter it was sent; :class:`FakeGrid` serves fake clients
(:func:`fake_federation` builds a set of them). :func:`resumed_and_unbroken` runs a strategy
through a checkpoint and without one; :func:`assert_adapters_equal` compares two adapters.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.server.superlink.linkstate.utils import NODE_UNAVAILABLE_ERROR_REASON
from flwr.serverapp import Grid

from fedbilevel import protocol
from fedbilevel.checkpoint import STORE, load_checkpoint, save_checkpoint
from fedbilevel.strategies.base import PersonalizedStrategy

INITIAL = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32)}

# A LoRA adapter named as peft saves it: one module's factors and an image classifier's head, for the
# strategies that treat A, B and the head apart (fedsa-lora, ffa-lora, feddpa).
LORA_A = "base_model.model.layers.0.q_proj.lora_A.weight"
LORA_B = "base_model.model.layers.0.q_proj.lora_B.weight"
LORA_HEAD = "base_model.model.classifier.weight"
LORA_THETA0 = {
    LORA_A: np.arange(6, dtype=np.float32).reshape(2, 3),
    LORA_B: np.zeros((3, 2), np.float32),
    LORA_HEAD: np.array([1.0, -1.0], np.float32),
}


class InProcessGrid(Grid):
    """A Grid that hands every message to an in-process client: no Ray, no SuperLink.

    ``nodes`` maps node ids to objects with ``handle(message) -> reply or None`` (None: the
    node never answers). It runs a strategy's real server loop for strategy tests and for
    server-side measurements (``scripts/memory_growth.py``); ``nodes`` may be reassigned
    (a restarted SuperNode comes back under a new id).

    Parameters
    ----------
    nodes : dict[int, Any]
        Node id -> client with a ``handle`` method.
    """

    def __init__(self, nodes: dict[int, Any]):
        self.nodes = nodes

    def set_run(self, run_id: int) -> None:
        pass

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id)

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        messages = list(messages)
        for message in messages:  # as Flower's grids do when they push a message
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        replies = [self.nodes[m.metadata.dst_node_id].handle(m) for m in messages]
        return [reply for reply in replies if reply is not None]


class UnavailableNode:
    """A node the SuperLink still lists but that stopped answering (e.g. a killed SuperNode): the
    reply to each message is Flower's own "Node Unavailable" error, sent by the SuperLink (its own node id)."""

    def handle(self, message: Message) -> Message:
        """Flower's error reply to ``message``, from the SuperLink."""
        reply = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=NODE_UNAVAILABLE_ERROR_REASON), reply_to=message)
        reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID  # as Flower's SuperLink sends it
        return reply


def update_of(partition_id: int, server_round: int) -> dict[str, np.ndarray]:
    """A distinct task vector per client and round (clients 0,1 and 2,3 point alike).

    Parameters
    ----------
    partition_id : int
        The client.
    server_round : int
        The round.

    Returns
    -------
    dict[str, np.ndarray]
        An update shaped like :data:`INITIAL`.
    """
    rng = np.random.default_rng(1000 * partition_id + server_round)
    direction = np.ones(10) if partition_id < 2 else np.r_[np.ones(5), -np.ones(5)]
    flat = (direction + 0.3 * rng.normal(size=10)).astype(np.float32)
    return {"a": flat[:6].reshape(2, 3), "b": flat[6:]}


class FakeClient:
    """A client that answers like the real ClientApp and remembers what it was sent.

    It reports task ``task<partition_id // 2>``, trains by adding :func:`update_of` to the
    adapter it received and scores ``exact_match`` = its partition id.

    Parameters
    ----------
    partition_id : int
        The partition it holds.
    behaviour : {"good", "silent", "raise", "nan", "huge", "shape", "impostor", "forgetful"} (default: "good")
        How it answers train messages: normally; never; with a client error; with a NaN
        value; with its update scaled by 1e25 (finite, but its square overflows float32); with
        an array of the wrong shape; claiming partition 0; normally, but it forgets the adapter
        it holds after every message (a SuperNode that loses its state), so a message naming it
        by digest gets a ``missing-adapter`` reply.
    data_digest : str, optional
        Reported in the query reply as the partition's data digest (a resumed run compares it).
    initial : dict[str, np.ndarray] (default: :data:`INITIAL`)
        θ⁰, the adapter it derives at start as the ClientApp does (the strategy's ``initial_adapter``).
    update : callable (default: :func:`update_of`)
        ``(partition id, round) -> update`` shaped like ``initial``: what its training adds.
    num_examples : int (default: 10)
        The training examples its replies report (``num-examples``).

    Attributes
    ----------
    received : list[tuple[str, int, dict[str, np.ndarray]]]
        (message type, server round, adapter) of every train and evaluate message it could use.
    full : list[bool]
        Whether each train and evaluate message carried the adapter (else it named one by digest).
    configs : list[dict]
        Their configs.
    globals : list[dict[str, np.ndarray]]
        The global adapters of evaluate messages (eval-global).
    """

    def __init__(
        self,
        partition_id: int,
        behaviour: str = "good",
        *,
        data_digest: str | None = None,
        initial: Mapping[str, np.ndarray] = INITIAL,
        update: Callable[[int, int], Mapping[str, np.ndarray]] = update_of,
        num_examples: int = 10,
    ):
        self.partition_id = partition_id
        self.behaviour = behaviour
        self.data_digest = data_digest
        self.initial = dict(initial)
        self.update = update
        self.num_examples = num_examples
        self.received: list[tuple[str, int, dict[str, np.ndarray]]] = []
        self.configs: list[dict] = []
        self.globals: list[dict[str, np.ndarray]] = []
        self.full: list[bool] = []
        self._held: tuple[str, dict[str, np.ndarray]] | None = None  # (digest, adapter), as the ClientApp holds it

    def handle(self, message: Message) -> Message | None:
        """The reply to ``message``, or None (a ``silent`` client's train reply)."""
        if message.metadata.message_type == MessageType.QUERY:
            task = f"task{self.partition_id // 2}"
            info = ConfigRecord({protocol.PARTITION_ID: self.partition_id, protocol.TASK: task})
            if self.data_digest is not None:
                info[protocol.DATA_DIGEST] = self.data_digest
            if self.behaviour != "forgetful":  # as the ClientApp, it derives θ⁰ itself and holds it
                self._held = (protocol.adapter_digest(self.initial), self.initial)
            return Message(RecordDict({protocol.INFO: info}), reply_to=message)
        config = message.content.config_records[protocol.CONFIG]
        self.configs.append(dict(config))
        assert config[protocol.PARTITION_ID] == self.partition_id, "message routed to the wrong client"
        wanted = config[protocol.ADAPTER_DIGEST]
        self.full.append(protocol.ARRAYS in message.content.array_records)
        if self.full[-1]:
            adapter = protocol.record_to_adapter(message.content.array_records[protocol.ARRAYS])
        elif self._held is not None and self._held[0] == wanted:
            adapter = self._held[1]
        else:
            metrics = MetricRecord({protocol.PARTITION_ID: self.partition_id, protocol.MISSING_ADAPTER: 1})
            return Message(RecordDict({protocol.METRICS: metrics}), reply_to=message)
        self._held = None if self.behaviour == "forgetful" else (wanted, adapter)
        server_round = int(config[protocol.SERVER_ROUND])
        self.received.append((message.metadata.message_type, server_round, adapter))
        if protocol.GLOBAL in message.content.array_records:
            self.globals.append(protocol.record_to_adapter(message.content.array_records[protocol.GLOBAL]))
        started = time.time()
        time.sleep(0.005)  # some client work, so busy intervals have a length
        metrics = {
            protocol.PARTITION_ID: self.partition_id,
            protocol.NUM_EXAMPLES: self.num_examples,
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
            trace = (
                "Traceback (most recent call last):\n"
                '  File "client_app.py", line 161, in __call__\n'
                "RuntimeError: CUDA out of memory'>"
            )
            return Message(Error(code=0, reason=trace), reply_to=message)
        trained = {k: v + self.update(self.partition_id, server_round)[k] for k, v in adapter.items()}
        if self.behaviour == "nan":
            trained["b"][0] = np.nan
        if self.behaviour == "huge":
            update = self.update(self.partition_id, server_round)
            trained = {k: v + np.float32(1e25) * update[k] for k, v in adapter.items()}
        if self.behaviour == "shape":
            trained["b"] = np.zeros(5, np.float32)
        if self.behaviour == "impostor":
            metrics[protocol.PARTITION_ID] = 0
        metrics[protocol.TRAIN_LOSS] = 1.0
        if self.behaviour != "forgetful":
            self._held = (protocol.adapter_digest(trained), trained)
        content = RecordDict(
            {protocol.ARRAYS: protocol.adapter_to_record(trained), protocol.METRICS: MetricRecord(metrics)}
        )
        return Message(content, reply_to=message)


class FakeGrid(InProcessGrid):
    """In-process grid: node id -> FakeClient; node ids can be reassigned (a restart)."""


def fake_federation(
    size: int,
    *,
    initial: Mapping[str, np.ndarray] = INITIAL,
    update: Callable[[int, int], Mapping[str, np.ndarray]] = update_of,
) -> dict[int, FakeClient]:
    """Node id -> fake client: partitions 0..size-1 on nodes 10, 11, ...

    Parameters
    ----------
    size : int
        The number of clients.
    initial : dict[str, np.ndarray] (default: :data:`INITIAL`)
        θ⁰, the adapter each client derives at start.
    update : callable (default: :func:`update_of`)
        ``(partition id, round) -> update``: what each client's training adds.

    Returns
    -------
    dict[int, FakeClient]
        Fresh clients, for a :class:`FakeGrid`.
    """
    return {10 + p: FakeClient(p, initial=initial, update=update) for p in range(size)}


S = TypeVar("S", bound=PersonalizedStrategy)


def resumed_and_unbroken(
    make: Callable[[], S], clients: Callable[[], dict[int, FakeClient]], folder: Path, *, num_rounds: int
) -> tuple[S, S, dict[int, FakeClient]]:
    """A strategy resumed from a checkpoint for its last round, and the same strategy run unbroken.

    One strategy runs ``num_rounds`` rounds; a second runs ``num_rounds - 1``, attaches its
    store to ``folder/store`` and saves its checkpoint in ``folder``; a third attaches that
    store, restores the checkpoint and runs the last round. Each run serves fresh clients.

    Parameters
    ----------
    make : callable
        ``() -> strategy``: a new strategy, the same each call.
    clients : callable
        ``() -> {node id: client}``: a fresh federation (e.g. :func:`fake_federation`).
    folder : Path
        Where the checkpoint and the store are written (a test's ``tmp_path``).
    num_rounds : int
        The rounds of the unbroken run.

    Returns
    -------
    tuple[strategy, strategy, dict[int, FakeClient]]
        The resumed strategy, the unbroken one, and the clients of the resumed round.
    """
    unbroken = make()
    unbroken.start(FakeGrid(clients()), ArrayRecord(), num_rounds=num_rounds)
    first = make()
    first.start(FakeGrid(clients()), ArrayRecord(), num_rounds=num_rounds - 1)
    first.store.attach(folder / STORE)
    save_checkpoint(folder, first.checkpoint())
    resumed = make()
    resumed.store.attach(folder / STORE)
    resumed.restore(load_checkpoint(folder))
    last = clients()
    resumed.start(FakeGrid(last), ArrayRecord(), num_rounds=1)
    return resumed, unbroken, last


def assert_adapters_equal(got: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> None:
    """Assert that two adapters name the same arrays in the same order, each equal to rtol 1e-6.

    Parameters
    ----------
    got : dict[str, np.ndarray]
        The adapter to check.
    expected : dict[str, np.ndarray]
        What it should be.
    """
    assert list(got) == list(expected)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, err_msg=name)
