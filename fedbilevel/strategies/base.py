"""Base for strategies that keep one adapter per client (FedBip and other personalized FL).

State is keyed by each client's stable partition id, never by the transport node id
(node ids change when a SuperNode restarts). Partition ids are discovered with a QUERY
message the first time a node id is seen. Every train/evaluate message is about the adapter
of the partition it is addressed to, and names that partition so the client can refuse a
misrouted message; it carries the adapter only when the server does not know the node to
hold it already (the client keeps what it last received or trained), so a client downloads
its adapter once a round. Per-client state lives in a
:class:`~fedbilevel.checkpoint.ClientStore` (on disk in a run), so only the round's clients
are held in memory. Replies are validated before anything is aggregated
(:mod:`fedbilevel.strategies.replies`); the round's record is kept by
:class:`~fedbilevel.strategies.rounds.RoundLog`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedbilevel import protocol
from fedbilevel.checkpoint import ClientStore
from fedbilevel.options import ConfigError
from fedbilevel.privacy import UPDATE_SENSITIVITY, PrivacyLedger
from fedbilevel.strategies.cross_task import split_cross
from fedbilevel.strategies.replies import RejectedReply, check_adapter, check_reply, last_line, senders_of
from fedbilevel.strategies.rounds import RoundLog, over_all_clients
from fedbilevel.strategies.sampling import SamplingSettings, sample_clients, sample_size

Adapter = dict[str, np.ndarray]
RoundCallback = Callable[[dict[str, Any]], None]
QUERY_TIMEOUT_S = 300.0  # a node that cannot say which partition it holds within this is left out
AGGREGATION_WEIGHTS = ("examples", "uniform")  # aggregation-weights: by training examples, or equally


def _asks_for_adapter(message: Message) -> bool:
    """Whether a reply says its client does not hold the adapter the message named (``missing-adapter``)."""
    if message.has_error() or protocol.METRICS not in message.content.metric_records:
        return False
    return message.content.metric_records[protocol.METRICS].get(protocol.MISSING_ADAPTER) == 1


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
        Called with the finished round's record (see :class:`~fedbilevel.strategies.rounds.RoundLog`),
        e.g. to write results.json after every round.
    evaluate_round : callable, optional
        ``server_round -> bool``: whether clients evaluate after this round (default: always).
    min_available_fraction : float (default: 0.5)
        A round aggregates only when at least this fraction of the clients sent a train
        message replied validly; otherwise every adapter is kept unchanged.
    evaluate_global : bool (default: False)
        Evaluate messages also carry the global adapter (the training-set-size weighted
        mean of all personalized adapters, what FedAvg would deploy), which every client
        scores on its own test split too.
    sampling : SamplingSettings, optional
        The fraction (and minimum) of clients that train, and that evaluate, each round
        (default: every client); the round's ``sampled`` record lists them.
    seed : int (default: 0)
        The run seed: each round's sample is drawn from it and the round.
    evaluate_cross : callable, optional
        ``server_round -> bool``: whether this round's evaluate messages ask for cross-task scores
        (eval-cross; default: never); the round's record then holds the ``cross_task`` matrix
        (:mod:`fedbilevel.strategies.cross_task`).
    aggregation_weights : {"examples", "uniform"} (default: "examples")
        How a client's adapter counts in a weighted mean (FedAvg and the strategies built on it,
        and the global adapter): by its training examples, as McMahan et al.'s FedAvg and FedIT,
        or equally, as the official FedDPA and FedSA-LoRA code.
    """

    def __init__(
        self,
        *,
        initial_adapter: Mapping[str, np.ndarray],
        min_nodes: int = 2,
        on_round_end: RoundCallback | None = None,
        evaluate_round: Callable[[int], bool] | None = None,
        min_available_fraction: float = 0.5,
        evaluate_global: bool = False,
        sampling: SamplingSettings | None = None,
        seed: int = 0,
        evaluate_cross: Callable[[int], bool] | None = None,
        aggregation_weights: str = "examples",
    ) -> None:
        if not initial_adapter:
            raise ValueError("initial_adapter: must contain at least one array")
        if not 0 < min_available_fraction <= 1:
            raise ValueError(
                f"min_available_fraction: {min_available_fraction} is not allowed; expected a number in (0, 1]"
            )
        self.min_available_fraction = min_available_fraction
        if aggregation_weights not in AGGREGATION_WEIGHTS:
            raise ValueError(
                f"aggregation_weights: {aggregation_weights!r} is not allowed; expected one of {AGGREGATION_WEIGHTS}"
            )
        self.aggregation_weights = aggregation_weights
        self.sampling = sampling or SamplingSettings()
        self.seed = seed
        self.evaluate_global = evaluate_global
        self.round_offset = 0  # rounds completed before a resume: Flower counts from 1 again
        self.initial_adapter: Adapter = {k: np.asarray(v) for k, v in initial_adapter.items()}
        self._initial_digest = protocol.adapter_digest(self.initial_adapter)
        self.min_nodes = min_nodes
        self.on_round_end = on_round_end
        self.evaluate_round = evaluate_round or (lambda _round: True)
        self.evaluate_cross = evaluate_cross or (lambda _round: False)
        # Per-client state lives in the store: only the round's clients in memory (run_server attaches its folder).
        self.store = ClientStore()
        self.adapters = self.store.table("adapters")  # partition id -> θ̄ᵢ
        self.node_partitions: dict[int, int] = {}  # node id -> partition id
        self.clients: dict[int, dict[str, Any]] = {}  # partition id -> info from its query reply
        self.history: list[dict[str, Any]] = []
        self._round: RoundLog | None = None  # the round in progress, from configure_train on
        self._sent: dict[str, dict[int, int]] = {}  # phase -> node id -> partition id messaged
        self._outbox: dict[str, list[Message]] = {}  # phase -> the messages sent (replies are matched to them)
        self._phase_args: dict[str, tuple] = {}  # phase -> (round, config, message type, global adapter or None)
        # partition id -> (node id, digest of the adapter that node holds): the next message names it, not sends it
        self._held: dict[int, tuple[int, str]] = {}
        self._pending: dict[int, tuple[int, str]] = {}  # partition id -> (node id, digest) of its message in flight
        self._grid: Grid | None = None  # for resending an adapter in full within a phase (start)
        self._timeout: float | None = None
        # Each client's DP account as its replies report it: checkpointed, and sent back so a client
        # that lost its own (a resumed run) continues it (fedbilevel.privacy).
        self.privacy = PrivacyLedger()

    # ------------------------------------------------------------------ subclass API

    def personalize(self, server_round: int, trained: dict[int, Adapter], weights: dict[int, float]) -> dict[str, Any]:
        """Update ``self.adapters`` for the clients in ``trained`` (partition id -> θᵢ).

        ``weights`` (partition id -> weight > 0) is each client's weight in a weighted mean: its
        training examples, or 1 with ``aggregation-weights = "uniform"``. Returns extra fields for
        this round's record (e.g. similarity matrices).
        """
        raise NotImplementedError

    def client_config(self) -> dict[str, Any]:
        """Values added to every train and evaluate message's config, for client-side steps
        a strategy declares (e.g. FedProx's ``proximal-mu``, FedALA's mixing); the shared
        client code reads them."""
        return {}

    def partition_config(self, phase: str, partition_id: int) -> dict[str, Any]:
        """Values added to one client's message config for ``phase`` ("train" or "evaluate"): its DP
        account in train messages; strategies add per-client values."""
        return self.privacy.config_for(partition_id) if phase == "train" else {}

    def summary(self) -> None:
        """Log the strategy's configuration."""
        log(INFO, "\t├──> %s: one adapter per client, keyed by partition id", type(self).__name__)
        log(INFO, "\t└──> Minimum nodes: %d", self.min_nodes)

    # ------------------------------------------------------------------ state

    def checkpoint(self) -> dict[str, Any]:
        """Write the round's changed per-client state to the store; return the record a resumed run needs.

        The record (:func:`fedbilevel.checkpoint.save_checkpoint` writes it) has the completed
        round, the clients' info and the store's manifest; subclasses with more small state add it.
        """
        completed = self.history[-1]["round"] if self.history else self.round_offset
        record = {
            "round": completed,
            "clients": {str(p): info for p, info in self.clients.items()},
            "store": self.store.flush(completed),
        }
        if self.privacy.histories:
            record["privacy"] = self.privacy.to_record()
            record["privacy_update_sensitivity"] = UPDATE_SENSITIVITY  # how dp='update' noise was scaled
        return record

    def restore(self, meta: Mapping[str, Any]) -> None:
        """Continue from a :meth:`checkpoint` record (the store attached to the run's folder); the next
        round is ``meta["round"] + 1``."""
        self.store.load(meta["store"])
        self.clients = {int(p): dict(info) for p, info in meta["clients"].items()}
        self.round_offset = int(meta["round"])
        added = self.privacy.restore(meta.get("privacy", {}), after_round=self.round_offset)
        if added:
            log(
                INFO,
                "DP accounts: %d release(s) after round %d's checkpoint counted from the journal",
                added,
                self.round_offset,
            )

    def aggregation_weight(self, num_examples: int) -> float:
        """A client's weight in a weighted mean: its ``num_examples``, or 1 (``aggregation-weights``)."""
        return float(num_examples) if self.aggregation_weights == "examples" else 1.0

    def global_adapter(self) -> Adapter:
        """Σᵢ wᵢ θᵢ / Σᵢ wᵢ over the known clients' personalized adapters (wᵢ: :meth:`aggregation_weight`
        of its training examples).

        One client at a time from the store, summed in float64, so memory stays that of two adapters.
        """
        partitions = sorted(self.clients)
        sizes = np.array(
            [self.aggregation_weight(max(int(self.clients[p].get(protocol.NUM_TRAIN) or 1), 1)) for p in partitions]
        )
        total = {name: np.zeros(array.shape) for name, array in self.initial_adapter.items()}
        for partition_id, weight in zip(partitions, sizes / sizes.sum()):
            for name, array in self.personalized_adapter(partition_id).items():
                total[name] += weight * array
        return {name: total[name].astype(array.dtype) for name, array in self.initial_adapter.items()}

    def adapter_for(self, partition_id: int) -> Adapter:
        """The adapter a partition trains from next (θ⁰ until the client has been personalized)."""
        return self.adapters.get(partition_id, self.initial_adapter)

    def personalized_adapter(self, partition_id: int) -> Adapter:
        """The client's personalized model: what it evaluates and what is saved at the end.

        The same as :meth:`adapter_for` unless a strategy trains from one adapter and
        personalizes another (FedAMP trains from the cloud model uᵢ, evaluates wᵢ).
        """
        return self.adapter_for(partition_id)

    def saved_adapters(self, partition_id: int) -> dict[str, Adapter]:
        """What is saved for the client at the end: sub-folder of its folder ("": the folder itself) -> adapter.

        Its personalized adapter, unless a strategy's personalized model is more than one adapter
        (FedDPA's global and local adapters).
        """
        return {"": self.personalized_adapter(partition_id)}

    # ------------------------------------------------------------------ Flower hooks

    def start(self, grid: Grid, *args: Any, timeout: float = 3600, **kwargs: Any):
        """Flower's round loop (:meth:`flwr.serverapp.strategy.Strategy.start`), keeping the grid and
        timeout for resending an adapter in full to a client that no longer holds it."""
        self._grid, self._timeout = grid, timeout
        return super().start(grid, *args, timeout=timeout, **kwargs)

    def configure_train(self, server_round: int, arrays, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """One TRAIN message per sampled partition, about (carrying or naming) that partition's own adapter."""
        server_round += self.round_offset
        self._round = RoundLog(server_round)
        # Who was messaged is per round: a round without evaluation expects no evaluate replies.
        self._sent, self._outbox = {}, {}
        self._discover_partitions(grid)
        messages = self._messages(server_round, config, MessageType.TRAIN)
        self._round.mark("train_sent")
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        """Validate replies, then let the subclass personalize the clients that replied."""
        server_round += self.round_offset
        self._round.mark("train_received")
        trained: dict[int, Adapter] = {}
        num_examples: dict[int, int] = {}
        for partition_id, metrics, adapter in self._valid_replies("train", replies):
            trained[partition_id] = adapter
            num_examples[partition_id] = int(metrics[protocol.NUM_EXAMPLES])
            self._round.note_train(partition_id, metrics)
            spent = self.privacy.note(partition_id, metrics, server_round=server_round)
            if spent is not None:
                log(INFO, "round %d: client %d %s", server_round, partition_id, spent)
            log(
                INFO,
                "round %d: client %d (%s) trained on %d examples, loss %.4f",
                server_round,
                partition_id,
                self.clients.get(partition_id, {}).get(protocol.TASK, "?"),
                num_examples[partition_id],
                float(metrics[protocol.TRAIN_LOSS]),
            )
        messaged = len(self._sent["train"]) + self._round.start_failures  # a client that cannot start counts
        needed = math.ceil(self.min_available_fraction * messaged)
        if not trained or len(trained) < needed:
            reason = f"{len(trained)} of {messaged} clients replied validly, {needed} needed (min-available-fraction)"
            log(WARNING, "round %d: %s; every adapter is kept unchanged", server_round, reason)
            self._round.note_skipped(reason)
            return None, None
        started = time.time()
        weights = {p: self.aggregation_weight(n) for p, n in num_examples.items()}
        fields = over_all_clients(self.personalize(server_round, trained, weights), sorted(self.clients))
        self._round.note_aggregation(fields, time.time() - started)
        total = sum(num_examples.values())
        losses = self._round.record["train"]
        mean_loss = sum(losses[str(p)]["loss"] * n for p, n in num_examples.items()) / total
        return None, MetricRecord({protocol.TRAIN_LOSS: mean_loss, protocol.NUM_EXAMPLES: total})

    def configure_evaluate(self, server_round: int, arrays, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """One EVALUATE message per sampled partition, about its current personalized adapter."""
        server_round += self.round_offset
        if not self.evaluate_round(server_round):
            return []
        messages = self._messages(server_round, config, MessageType.EVALUATE)
        self._round.mark("evaluate_sent")
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record each client's own scores; return their unweighted mean (personalized score)."""
        self._round.mark("evaluate_received")
        replied = {partition_id: metrics for partition_id, metrics, _ in self._valid_replies("evaluate", replies)}
        if self.evaluate_cross(self._round.record["round"]):
            replied = self._round.note_cross_task(replied, self.clients, self.node_partitions)
        else:  # cross- metrics were not asked for: they are not scores of this round (and unchecked)
            replied = {partition_id: split_cross(metrics)[0] for partition_id, metrics in replied.items()}
        scores = self._round.note_eval(replied)
        mean = None
        if scores:
            names = sorted(set.intersection(*(set(s) for s in scores.values())) - {protocol.NUM_EXAMPLES})
            mean = MetricRecord({k: float(np.mean([s[k] for s in scores.values()])) for k in names})
        self._finish_round()
        return mean

    # ------------------------------------------------------------------ internals

    def _messages(self, server_round: int, config: ConfigRecord, message_type: str) -> list[Message]:
        """One message per client sampled for this phase (:mod:`fedbilevel.strategies.sampling`)."""
        phase = "train" if message_type == MessageType.TRAIN else "evaluate"
        sampled = set(self._sample(server_round, phase))
        shared = self.global_adapter() if message_type == MessageType.EVALUATE and self.evaluate_global else None
        self._phase_args[phase] = (server_round, config, message_type, shared)
        chosen = {node: partition for node, partition in self.node_partitions.items() if partition in sampled}
        messages = [
            self._message(phase, node_id, partition_id)
            for node_id, partition_id in sorted(chosen.items(), key=lambda item: item[1])
        ]
        self._sent[phase] = chosen
        self._outbox[phase] = messages  # Flower gives them their ids when it sends them
        return messages

    def _message(self, phase: str, node_id: int, partition_id: int, *, full: bool = False) -> Message:
        """The phase's message to one client: its adapter in full, or only its digest when the node holds it."""
        server_round, config, message_type, shared = self._phase_args[phase]
        adapter = self.adapter_for(partition_id) if phase == "train" else self.personalized_adapter(partition_id)
        digest = protocol.adapter_digest(adapter)
        round_config = ConfigRecord(
            {**dict(config), **self.client_config(), **self.partition_config(phase, partition_id)}
        )
        round_config[protocol.SERVER_ROUND] = server_round
        round_config[protocol.PARTITION_ID] = partition_id
        round_config[protocol.ADAPTER_DIGEST] = digest
        if phase == "evaluate" and self.evaluate_cross(server_round):
            round_config[protocol.CROSS_TASK] = True
        content = RecordDict({protocol.CONFIG: round_config})
        if full or self._held.get(partition_id) != (node_id, digest):
            content[protocol.ARRAYS] = protocol.adapter_to_record(adapter)
        if shared is not None:
            content[protocol.GLOBAL] = protocol.adapter_to_record(shared)
        self._round.note_sent(content)
        self._pending[partition_id] = (node_id, digest)
        return Message(content=content, message_type=message_type, dst_node_id=node_id)

    def _count_rejected_release(self, message: Message, partition_id: int) -> None:
        """A rejected train reply that reports a DP round was still released: it counts in the account."""
        if message.has_error() or protocol.METRICS not in message.content.metric_records:
            return
        server_round = self._round.record["round"]
        try:
            spent = self.privacy.note(
                partition_id, message.content.metric_records[protocol.METRICS], server_round=server_round
            )
        except ValueError:  # no usable DP round in it (and the client's own account has it, if it has one)
            return
        if spent is not None:
            log(
                INFO,
                "round %d: client %d's rejected reply counts in its DP account: %s",
                server_round,
                partition_id,
                spent,
            )

    def _sample(self, server_round: int, phase: str) -> list[int]:
        """The clients of this phase, recorded in the round's ``sampled``: all unless a fraction is set."""
        settings = self.sampling
        fraction, minimum, key = (
            (settings.fraction_train, settings.min_train_nodes, "min-train-nodes")
            if phase == "train"
            else (settings.fraction_evaluate, settings.min_evaluate_nodes, "min-evaluate-nodes")
        )
        available = sorted(self.node_partitions.values())
        # Refuse a minimum the federation (the clients that could not start included) can never meet; sample
        # among the clients that started, all of them when fewer than the minimum did.
        sample_size(len(available) + self._round.start_failures, fraction, minimum, key=key)
        size = sample_size(len(available), fraction, min(minimum, len(available)), key=key)
        chosen = sample_clients(available, size, seed=self.seed, server_round=server_round, phase=phase)
        self._round.record.setdefault("sampled", {})[phase] = chosen
        return chosen

    def _valid_replies(
        self, phase: str, replies: Iterable[Message], *, resent: tuple[dict[int, int], list[Message]] | None = None
    ) -> Iterator[tuple[int, dict[str, Any], Adapter | None]]:
        """(partition id, metrics, adapter: train replies only) of each reply that may be used.

        Every reply's bytes are counted; clients that did not answer and rejected replies
        are logged and recorded as failures. A client that no longer holds the adapter its
        message named is sent it in full, once. Lazy, so each reply's log lines stay in order.
        """
        replies = list(replies)
        sent, outbox = resent or (self._sent.get(phase, {}), self._outbox.get(phase, []))
        senders = senders_of(replies, outbox)
        self._outbox[phase] = []  # the adapters they carry are no longer needed (one per client of the round)
        self._round.note_missing(phase, sent, set(senders))
        for node_id in set(sent) - set(senders):
            self._held.pop(sent[node_id], None)
        lacking: dict[int, int] = {}
        for message, node_id in zip(replies, senders):
            self._round.note_received(message)
            partition_id = self.node_partitions.get(node_id)
            if resent is None and partition_id is not None and _asks_for_adapter(message):
                lacking[node_id] = partition_id
                continue
            try:
                partition_id, metrics = check_reply(message, partition_id, phase)
                adapter = check_adapter(message.content, self.initial_adapter) if phase == "train" else None
            except RejectedReply as error:
                self._round.note_rejected(phase, node_id, partition_id, error)
                if phase == "train" and partition_id is not None:
                    self._count_rejected_release(message, partition_id)
                self._held.pop(partition_id, None)  # what it holds now is unknown
                continue
            self._round.note_busy(phase, metrics)
            # The client now holds the adapter it trained, or the one it evaluated.
            held = protocol.adapter_digest(adapter) if adapter is not None else self._pending[partition_id][1]
            self._held[partition_id] = (node_id, held)
            yield partition_id, metrics, adapter
        if lacking:
            log(
                INFO,
                "round %d: clients %s no longer hold their adapter; sending it in full",
                self._round.record["round"],
                sorted(lacking.values()),
            )
            messages = [self._message(phase, node, partition, full=True) for node, partition in lacking.items()]
            again = list(self._grid.send_and_receive(messages, timeout=self._timeout))
            yield from self._valid_replies(phase, again, resent=(lacking, messages))

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
            Message(
                content=RecordDict({protocol.CONFIG: ConfigRecord({protocol.QUERY: protocol.QUERY_PARTITION})}),
                message_type=MessageType.QUERY,
                dst_node_id=node_id,
            )
            for node_id in new
        ]
        replies = list(grid.send_and_receive(queries, timeout=QUERY_TIMEOUT_S))  # read twice below
        senders = senders_of(replies, queries)
        for node_id in sorted(set(new) - set(senders)):
            self._round.note_start_failure(node_id, None, "no reply to the partition query within its timeout")
        for reply, node_id in zip(replies, senders):
            info = {}
            if not reply.has_error() and protocol.INFO in reply.content.config_records:
                info = dict(reply.content.config_records[protocol.INFO])
            partition_id = info.get(protocol.PARTITION_ID)
            if reply.has_error() or not info or protocol.START_ERROR in info:
                reason = info.get(protocol.START_ERROR) or "reply has no 'info' record"
                if reply.has_error():
                    reason = f"client error: {last_line(reply.error.reason)}"
                self._round.note_start_failure(node_id, partition_id, reason)
                continue
            if not isinstance(partition_id, int) or partition_id < 0:
                reason = f"reported partition-id {partition_id!r}; expected an integer ≥ 0"
                self._round.note_start_failure(node_id, None, reason)
                continue
            holder = next((n for n, p in self.node_partitions.items() if p == partition_id), None)
            if holder is not None:
                # Not a failure of the partition: its holder serves it (and its failures are recorded). A
                # restarted SuperNode waits here until the SuperLink drops its old node, then takes over.
                log(
                    WARNING,
                    "node %d claims partition %d, already served by node %d; it waits",
                    node_id,
                    partition_id,
                    holder,
                )
                continue
            known = self.clients.get(partition_id, {}).get(protocol.DATA_DIGEST)
            if known is not None and info.get(protocol.DATA_DIGEST) != known:
                digest = info.get(protocol.DATA_DIGEST)
                raise ConfigError(
                    f"client {partition_id} (node {node_id}): its data (digest {digest}) differs from the data "
                    f"earlier rounds of this run used ({known}); restore it or start a new run"
                )
            self.node_partitions[node_id] = partition_id
            self.clients[partition_id] = info
            self._held[partition_id] = (node_id, self._initial_digest)  # a client derives θ⁰ itself at start
            log(INFO, "node %d is client %d (%s)", node_id, partition_id, info.get(protocol.TASK, "?"))
        failures = self._round.record["failures"]
        first = failures[0]["reason"] if failures else "no reply to the partition query"
        if not self.node_partitions:
            # Every client failed to start (e.g. a bad data-path): stop with the reason, not train nothing.
            raise RuntimeError(f"no client could start; the first error: {first}")
        started, total = len(self.node_partitions), len(self.node_partitions) + self._round.start_failures
        needed = math.ceil(self.min_available_fraction * total)
        if not self.history and started < needed:
            # At start-up (e.g. a max-seq-len too short for most clients' data) no round could ever
            # aggregate: stop with the reason now, not after rounds of work.
            raise RuntimeError(
                f"only {started} of {total} clients could start, {needed} needed (min-available-fraction); "
                f"the first error: {first}"
            )

    def _finish_round(self) -> None:
        record = self._round.finish()
        self.history.append(record)
        if self.on_round_end is not None:
            self.on_round_end(record)
