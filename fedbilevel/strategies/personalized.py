"""Base for strategies that keep one adapter per client (FedBip and other personalized FL).

State is keyed by each client's stable partition id, never by the transport node id
(node ids change when a SuperNode restarts). Partition ids are discovered with a QUERY
message the first time a node id is seen. Every train/evaluate message carries only the
adapter of the partition it is addressed to, and names that partition so the client can
refuse a misrouted message. Replies are validated before anything is aggregated.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedbilevel import protocol
from fedbilevel.mixing import weighted_average

Adapter = dict[str, np.ndarray]
RoundCallback = Callable[[dict[str, Any]], None]
QUERY_TIMEOUT_S = 300.0  # a node that cannot say which partition it holds within this is left out
# Train metrics with their own place in the round record; any others are kept under their own key.
_RECORDED_TRAIN_METRICS = {protocol.TRAIN_LOSS, protocol.TRAIN_SECONDS, protocol.PARTITION_ID, protocol.NUM_EXAMPLES, *protocol.BUSY_KEYS}


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


class RejectedReply(ValueError):
    """A reply that must not be aggregated; the message says why, in one line.

    ``detail`` keeps a client's full error text (e.g. a traceback) for results.json.
    """

    def __init__(self, reason: str, *, detail: str = "") -> None:
        super().__init__(reason)
        self.detail = detail


def _last_line(text: str) -> str:
    """The last non-blank line of a client's error text: the exception message, not the traceback."""
    lines = [line.strip().rstrip("'>").strip() for line in text.splitlines() if line.strip().rstrip("'>").strip()]
    return lines[-1] if lines else text

class PersonalizedStrategy(Strategy):
    """Per-client adapters, routed by partition id; subclasses implement :meth:`personalize`.

    Parameters
    ----------
    initial_adapter : dict[str, np.ndarray]
        θ⁰, the adapter every client starts from. Its names, shapes and dtypes define
        what a valid reply looks like.
    min_nodes : int (default: 2)
        Wait until at least this many nodes are connected before a round starts.
    on_round_end : callable, optional
        Called with the finished round's record (see :meth:`round_record`), e.g. to
        write results.json after every round.
    evaluate_round : callable, optional
        ``server_round -> bool``: whether clients evaluate after this round (default: always).
    min_available_fraction : float (default: 0.5)
        A round aggregates only when at least this fraction of the clients sent a train
        message replied validly; otherwise every adapter is kept unchanged.
    evaluate_global : bool (default: False)
        Evaluate messages also carry the global adapter (the training-set-size weighted
        mean of all personalized adapters, what FedAvg would deploy), which every client
        scores on its own test split too.
    """

    # Attributes holding partition id -> adapter that a checkpoint must keep.
    checkpointed: tuple[str, ...] = ("adapters",)

    def __init__(
        self,
        *,
        initial_adapter: Mapping[str, np.ndarray],
        min_nodes: int = 2,
        on_round_end: RoundCallback | None = None,
        evaluate_round: Callable[[int], bool] | None = None,
        min_available_fraction: float = 0.5,
        evaluate_global: bool = False,
    ) -> None:
        if not initial_adapter:
            raise ValueError("initial_adapter: must contain at least one array")
        if not 0 < min_available_fraction <= 1:
            raise ValueError(f"min_available_fraction: {min_available_fraction} is not allowed; expected a number in (0, 1]")
        self.min_available_fraction = min_available_fraction
        self.evaluate_global = evaluate_global
        self.round_offset = 0  # rounds completed before a resume: Flower counts from 1 again
        self.initial_adapter: Adapter = {k: np.asarray(v) for k, v in initial_adapter.items()}
        self.min_nodes = min_nodes
        self.on_round_end = on_round_end
        self.evaluate_round = evaluate_round or (lambda _round: True)
        self.adapters: dict[int, Adapter] = {}  # partition id -> θ̄ᵢ
        self.node_partitions: dict[int, int] = {}  # node id -> partition id
        self.clients: dict[int, dict[str, Any]] = {}  # partition id -> info from its query reply
        self.history: list[dict[str, Any]] = []
        self._round: dict[str, Any] = {}
        self._round_started = 0.0
        self._marks: dict[str, float] = {}  # phase timestamps of the current round
        self._busy: dict[str, list[tuple[float, float]]] = {}  # phase -> client busy intervals
        self._sent: dict[str, dict[int, int]] = {}  # phase -> node id -> partition id messaged this round

    # ------------------------------------------------------------------ subclass API

    def personalize(self, server_round: int, trained: dict[int, Adapter], num_examples: dict[int, int]) -> dict[str, Any]:
        """Update ``self.adapters`` for the clients in ``trained`` (partition id -> θᵢ).

        Returns extra fields for this round's record (e.g. similarity matrices).
        """
        raise NotImplementedError

    def client_config(self) -> dict[str, Any]:
        """Values added to every train and evaluate message's config, for client-side steps
        a strategy declares (e.g. FedProx's ``proximal-mu``, FedALA's mixing); the shared
        client code reads them."""
        return {}

    def summary(self) -> None:
        """Log the strategy's configuration."""
        log(INFO, "\t├──> %s: one adapter per client, keyed by partition id", type(self).__name__)
        log(INFO, "\t└──> Minimum nodes: %d", self.min_nodes)

    # ------------------------------------------------------------------ state

    def checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The state a resumed run needs: named arrays and a JSON-able record.

        Arrays are ``<attribute>/<partition id>/<adapter array name>`` for every
        attribute in :attr:`checkpointed`; the record has the completed round and the
        clients' info. Subclasses with more state extend both.
        """
        arrays = {
            f"{attribute}/{partition_id}/{name}": array
            for attribute in self.checkpointed
            for partition_id, adapter in getattr(self, attribute).items()
            for name, array in adapter.items()
        }
        completed = self.history[-1]["round"] if self.history else self.round_offset
        return arrays, {"round": completed, "clients": {str(p): info for p, info in self.clients.items()}}

    def restore(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Load a :meth:`checkpoint`; the next round is ``meta["round"] + 1``."""
        for attribute in self.checkpointed:
            getattr(self, attribute).clear()
        loaded: dict[tuple[str, int], dict[str, np.ndarray]] = {}
        for key, array in arrays.items():
            attribute, _, rest = key.partition("/")
            if attribute in self.checkpointed:  # other keys belong to a subclass
                partition_id, name = rest.split("/", 1)
                loaded.setdefault((attribute, int(partition_id)), {})[name] = array
        for (attribute, partition_id), adapter in loaded.items():
            if set(adapter) != set(self.initial_adapter):
                raise ValueError(f"checkpoint: {attribute} of client {partition_id} has other arrays than this run's adapter")
            getattr(self, attribute)[partition_id] = {name: adapter[name] for name in self.initial_adapter}
        self.clients = {int(p): dict(info) for p, info in meta["clients"].items()}
        self.round_offset = int(meta["round"])

    def global_adapter(self) -> Adapter:
        """Σᵢ nᵢ θᵢ / Σᵢ nᵢ over the known clients' personalized adapters (nᵢ: training examples)."""
        partitions = sorted(self.clients)
        sizes = [max(int(self.clients[p].get(protocol.NUM_TRAIN) or 1), 1) for p in partitions]
        return weighted_average([self.personalized_adapter(p) for p in partitions], sizes)

    def adapter_for(self, partition_id: int) -> Adapter:
        """The adapter a partition trains from next (θ⁰ until the client has been personalized)."""
        return self.adapters.get(partition_id, self.initial_adapter)

    def personalized_adapter(self, partition_id: int) -> Adapter:
        """The client's personalized model: what it evaluates and what is saved at the end.

        The same as :meth:`adapter_for` unless a strategy trains from one adapter and
        personalizes another (FedAMP trains from the cloud model uᵢ, evaluates wᵢ).
        """
        return self.adapter_for(partition_id)

    # ------------------------------------------------------------------ Flower hooks

    def configure_train(self, server_round: int, arrays, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """One TRAIN message per known partition, carrying that partition's own adapter."""
        server_round += self.round_offset
        self._round_started = time.time()
        self._round = {
            "round": server_round,
            "train": {},
            "eval": {},
            "failures": [],
            "bytes_down": 0,
            "bytes_up": 0,
        }
        self._busy = {"train": [], "evaluate": []}
        self._discover_partitions(grid)
        messages = self._messages(server_round, config, MessageType.TRAIN)
        self._marks = {"train_sent": time.time()}
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """Validate replies, then let the subclass personalize the clients that replied."""
        server_round += self.round_offset
        self._marks["train_received"] = time.time()
        trained: dict[int, Adapter] = {}
        num_examples: dict[int, int] = {}
        replies = list(replies)
        self._note_missing("train", replies)
        for message in replies:
            self._round["bytes_up"] += protocol.count_bytes(message.content) if message.has_content() else 0
            try:
                partition_id, metrics = self._check_reply(message, "train")
                adapter = self._check_adapter(message.content)
            except RejectedReply as error:
                self._reject(message, "train", error)
                continue
            self._note_busy("train", metrics)
            trained[partition_id] = adapter
            num_examples[partition_id] = int(metrics[protocol.NUM_EXAMPLES])
            self._round["train"][str(partition_id)] = {
                "loss": float(metrics[protocol.TRAIN_LOSS]),
                "num_examples": num_examples[partition_id],
                "seconds": float(metrics.get(protocol.TRAIN_SECONDS, 0.0)),
                # e.g. the last step's loss, FedALA's weight learning
                **{key: float(value) for key, value in metrics.items() if key not in _RECORDED_TRAIN_METRICS},
            }
            log(
                INFO,
                "round %d: client %d (%s) trained on %d examples, loss %.4f",
                server_round,
                partition_id,
                self.clients.get(partition_id, {}).get(protocol.TASK, "?"),
                num_examples[partition_id],
                float(metrics[protocol.TRAIN_LOSS]),
            )
        needed = math.ceil(self.min_available_fraction * len(self._sent["train"]))
        if not trained or len(trained) < needed:
            reason = f"{len(trained)} of {len(self._sent['train'])} clients replied validly, {needed} needed (min-available-fraction)"
            log(WARNING, "round %d: %s; every adapter is kept unchanged", server_round, reason)
            self._round["aggregation_skipped"] = reason
            return None, None
        started = time.time()
        self._round.update(self.personalize(server_round, trained, num_examples))
        self._round["seconds_aggregation"] = time.time() - started
        total = sum(num_examples.values())
        mean_loss = sum(self._round["train"][str(p)]["loss"] * n for p, n in num_examples.items()) / total
        return None, MetricRecord({protocol.TRAIN_LOSS: mean_loss, protocol.NUM_EXAMPLES: total})

    def configure_evaluate(self, server_round: int, arrays, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """One EVALUATE message per partition with its (new) personalized adapter."""
        server_round += self.round_offset
        if not self.evaluate_round(server_round):
            return []
        messages = self._messages(server_round, config, MessageType.EVALUATE)
        self._marks["evaluate_sent"] = time.time()
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record each client's own scores; return their unweighted mean (personalized score)."""
        self._marks["evaluate_received"] = time.time()
        scores: dict[int, dict[str, float]] = {}
        replies = list(replies)
        self._note_missing("evaluate", replies)
        for message in replies:
            self._round["bytes_up"] += protocol.count_bytes(message.content) if message.has_content() else 0
            try:
                partition_id, metrics = self._check_reply(message, "evaluate")
            except RejectedReply as error:
                self._reject(message, "evaluate", error)
                continue
            self._note_busy("evaluate", metrics)
            scores[partition_id] = {
                k: float(v) for k, v in metrics.items() if k not in (protocol.PARTITION_ID, *protocol.BUSY_KEYS) and not isinstance(v, list)
            }
            # Per-test-item scores (lists), kept apart for intervals over test items.
            items = {k.removeprefix(protocol.ITEMS_PREFIX): [float(x) for x in v] for k, v in metrics.items() if isinstance(v, list)}
            if items:
                self._round.setdefault("eval_items", {})[str(partition_id)] = items
        for partition_id in sorted(scores):
            self._round["eval"][str(partition_id)] = scores[partition_id]
        mean = None
        if scores:
            names = sorted(set.intersection(*(set(s) for s in scores.values())) - {protocol.NUM_EXAMPLES})
            mean = MetricRecord({k: float(np.mean([s[k] for s in scores.values()])) for k in names})
        self._finish_round()
        return mean

    # ------------------------------------------------------------------ internals

    def _messages(self, server_round: int, config: ConfigRecord, message_type: str) -> list[Message]:
        messages = []
        adapter_of = self.adapter_for if message_type == MessageType.TRAIN else self.personalized_adapter
        shared = self.global_adapter() if message_type == MessageType.EVALUATE and self.evaluate_global else None
        for node_id, partition_id in sorted(self.node_partitions.items(), key=lambda item: item[1]):
            round_config = ConfigRecord({**dict(config), **self.client_config()})
            round_config[protocol.SERVER_ROUND] = server_round
            round_config[protocol.PARTITION_ID] = partition_id
            content = RecordDict(
                {
                    protocol.ARRAYS: protocol.adapter_to_record(adapter_of(partition_id)),
                    protocol.CONFIG: round_config,
                }
            )
            if shared is not None:
                content[protocol.GLOBAL] = protocol.adapter_to_record(shared)
            self._round["bytes_down"] += protocol.count_bytes(content)
            messages.append(Message(content=content, message_type=message_type, dst_node_id=node_id))
        self._sent["train" if message_type == MessageType.TRAIN else "evaluate"] = dict(self.node_partitions)
        return messages

    def _discover_partitions(self, grid: Grid) -> None:
        """Map node ids to partition ids, asking only nodes not seen before."""
        while len(node_ids := list(grid.get_node_ids())) < self.min_nodes:
            log(INFO, "waiting for nodes: %d connected, %d required (min-nodes)", len(node_ids), self.min_nodes)
            time.sleep(1.0)
        for gone in set(self.node_partitions) - set(node_ids):
            log(WARNING, "node %d (client %d) disconnected", gone, self.node_partitions.pop(gone))
        new = [node_id for node_id in node_ids if node_id not in self.node_partitions]
        if not new:
            return
        queries = [
            Message(content=RecordDict({protocol.CONFIG: ConfigRecord({protocol.QUERY: protocol.QUERY_PARTITION})}), message_type=MessageType.QUERY, dst_node_id=node_id)
            for node_id in new
        ]
        reasons = []
        for reply in grid.send_and_receive(queries, timeout=QUERY_TIMEOUT_S):
            node_id = reply.metadata.src_node_id
            if reply.has_error() or protocol.INFO not in reply.content.config_records:
                reason = reply.error.reason if reply.has_error() else "reply has no 'info' record"
                reasons.append(reason)
                log(WARNING, "node %d did not report its partition (%s); it is left out", node_id, reason)
                continue
            info = dict(reply.content.config_records[protocol.INFO])
            partition_id = info.get(protocol.PARTITION_ID)
            if not isinstance(partition_id, int) or partition_id < 0:
                log(WARNING, "node %d reported partition-id %r; expected an integer ≥ 0; it is left out", node_id, partition_id)
                continue
            holder = next((n for n, p in self.node_partitions.items() if p == partition_id), None)
            if holder is not None:
                log(WARNING, "node %d claims partition %d, already served by node %d; it is left out", node_id, partition_id, holder)
                continue
            self.node_partitions[node_id] = partition_id
            self.clients[partition_id] = info
            log(INFO, "node %d is client %d (%s)", node_id, partition_id, info.get(protocol.TASK, "?"))
        if not self.node_partitions:
            # Every client failed to start (e.g. a bad data-path): stop with the reason, not train nothing.
            raise RuntimeError(f"no client could start; the first error: {reasons[0] if reasons else 'no reply to the partition query'}")

    def _check_reply(self, message: Message, phase: str) -> tuple[int, dict[str, Any]]:
        """The partition id and metrics of a reply that may be used, else RejectedReply."""
        if message.has_error():
            raise RejectedReply(f"client error: {_last_line(message.error.reason)}", detail=message.error.reason)
        expected = self.node_partitions.get(message.metadata.src_node_id)
        if expected is None:
            raise RejectedReply("reply from a node that was not sent a message")
        metrics_records = message.content.metric_records
        if protocol.METRICS not in metrics_records:
            raise RejectedReply(f"reply has no '{protocol.METRICS}' record")
        metrics = dict(metrics_records[protocol.METRICS])
        if metrics.get(protocol.PARTITION_ID) != expected:
            raise RejectedReply(f"partition-id {metrics.get(protocol.PARTITION_ID)!r} in reply; the message was for {expected}")
        count = metrics.get(protocol.NUM_EXAMPLES)
        if not isinstance(count, (int, float)) or not count > 0:
            raise RejectedReply(f"num-examples {count!r}; expected a number > 0")
        if phase == "train" and not np.isfinite(metrics.get(protocol.TRAIN_LOSS, np.nan)):
            raise RejectedReply(f"train-loss {metrics.get(protocol.TRAIN_LOSS)!r}; expected a finite number")
        return expected, metrics

    def _check_adapter(self, content: RecordDict) -> Adapter:
        """The reply's adapter if it matches θ⁰'s names, shapes and dtypes and is finite."""
        if protocol.ARRAYS not in content.array_records:
            raise RejectedReply(f"reply has no '{protocol.ARRAYS}' record")
        adapter = protocol.record_to_adapter(content.array_records[protocol.ARRAYS])
        missing = [k for k in self.initial_adapter if k not in adapter]
        unexpected = [k for k in adapter if k not in self.initial_adapter]
        if missing or unexpected:
            raise RejectedReply(f"adapter keys differ: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for name, reference in self.initial_adapter.items():
            array = adapter[name]
            if array.shape != reference.shape:
                raise RejectedReply(f"array '{name}': shape {array.shape}, expected {reference.shape}")
            if array.dtype != reference.dtype:
                raise RejectedReply(f"array '{name}': dtype {array.dtype}, expected {reference.dtype}")
            if not np.all(np.isfinite(array)):
                raise RejectedReply(f"array '{name}': contains NaN or Inf")
        return adapter

    def _note_missing(self, phase: str, replies: list[Message]) -> None:
        """Record every client that was sent a message but did not answer at all."""
        answered = {message.metadata.src_node_id for message in replies}
        for node_id, partition_id in sorted(self._sent.get(phase, {}).items(), key=lambda item: item[1]):
            if node_id not in answered:
                reason = "no reply within round-timeout (node lost or too slow)"
                log(WARNING, "round %d: %s reply from client %d (node %d) missing: %s", self._round["round"], phase, partition_id, node_id, reason)
                self._round["failures"].append({"phase": phase, "partition_id": partition_id, "node_id": node_id, "reason": reason})

    def _reject(self, message: Message, phase: str, error: RejectedReply) -> None:
        node_id = message.metadata.src_node_id
        partition_id = self.node_partitions.get(node_id)
        who = f"client {partition_id} (node {node_id})" if partition_id is not None else f"node {node_id}"
        log(WARNING, "round %d: %s reply from %s rejected: %s", self._round["round"], phase, who, error)
        failure = {"phase": phase, "partition_id": partition_id, "node_id": node_id, "reason": str(error)}
        if error.detail:
            failure["detail"] = error.detail
        self._round["failures"].append(failure)

    def _note_busy(self, phase: str, metrics: Mapping[str, Any]) -> None:
        started, ended = (metrics.get(key) for key in protocol.BUSY_KEYS)
        if isinstance(started, float) and isinstance(ended, float) and ended >= started:
            self._busy[phase].append((started, ended))

    def _time_split(self, seconds: float) -> dict[str, float]:
        """Round time split into client training, client evaluation, server aggregation and the rest.

        A phase's client time is the union of the clients' busy intervals inside the
        phase (so parallel clients are not double counted); the rest of the round,
        where no client works and the server does not aggregate, is transport,
        scheduling and start-up: Flower's overhead (plus partition discovery).
        Assumes client and server clocks agree (true in simulation).
        """
        split = {
            "client_train": _covered(self._busy["train"], self._marks.get("train_sent"), self._marks.get("train_received")),
            "client_evaluate": _covered(self._busy["evaluate"], self._marks.get("evaluate_sent"), self._marks.get("evaluate_received")),
            "aggregation": float(self._round.get("seconds_aggregation", 0.0)),
        }
        split["other"] = max(seconds - sum(split.values()), 0.0)
        split["other_fraction"] = split["other"] / seconds if seconds > 0 else 0.0
        return split

    def _finish_round(self) -> None:
        self._round["seconds"] = time.time() - self._round_started
        self._round["time_split"] = self._time_split(self._round["seconds"])
        self.history.append(self._round)
        if self.on_round_end is not None:
            self.on_round_end(self._round)
