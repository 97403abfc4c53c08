"""ClientApp logic: decode a message, run the shared train/eval loop, reply.

The base model and LoRA wrapper are built once per process and reused for every message
(Flower's simulation runs many clients in one worker process): each message loads the
complete adapter it carries, so nothing of one client leaks into the next.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable, Mapping
from logging import ERROR, INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore import log

from fedbilevel import logs, protocol
from fedbilevel.client.ala import (
    adaptive_local_aggregation,
    remember_local,
)
from fedbilevel.client.cross import other_task_scores
from fedbilevel.client.evaluate import Rows, evaluate_adapter
from fedbilevel.client.feddpa import image_representations, score_dual, text_representations, train_local_adapter
from fedbilevel.client.metrics import answer_text, score_answers
from fedbilevel.client.privacy import ClientPrivacy, plan_for
from fedbilevel.client.train import Codec, TextCodec, TrainResult, fit_report, proximal_term, train_adapter
from fedbilevel.client.vision import ImageCodec, evaluate_classifier
from fedbilevel.config import RunConfig
from fedbilevel.data import load_client_data
from fedbilevel.data.common import most_common, most_common_answer
from fedbilevel.data.settings import DataSettings
from fedbilevel.data.types import ClientData, ImageExample, data_digest
from fedbilevel.models.adapter import build_lora_model, get_adapter_arrays, initial_adapter_arrays, set_adapter_arrays
from fedbilevel.models.settings import LoraSettings, ModelSettings
from fedbilevel.models.zoo import image_preprocessor, is_image_classifier, load_tokenizer
from fedbilevel.resources import process_memory_mb
from fedbilevel.strategies.feddpa import LOCAL_PREFIX, DpaSettings, dual_adapter, split_adapter
from fedbilevel.strategies.fedsa_lora import is_lora_a

NODE_CONFIG_KEYS = ("device", "data-path")  # run-config keys a SuperNode's --node-config overrides


def partition_of(context: Context) -> tuple[int, int]:
    """(partition id, number of partitions) from the SuperNode's node config."""
    values = []
    for key in (protocol.PARTITION_ID, protocol.NUM_PARTITIONS):
        value = context.node_config.get(key)
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if not isinstance(value, int):
            raise ValueError(
                f"node-config key '{key}': value {value!r} is not allowed; expected an integer, "
                "e.g. flower-supernode --node-config 'partition-id=0 num-partitions=8'"
            )
        values.append(value)
    partition_id, num_partitions = values
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"node-config key 'partition-id': value {partition_id} is not allowed; "
            f"expected 0 ≤ partition-id < num-partitions ({num_partitions})"
        )
    return partition_id, num_partitions


def resolve_device(device: str) -> torch.device:
    """``auto`` -> the first CUDA GPU if there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"run-config key 'device': value {device!r} is not allowed here; "
            "no CUDA device is visible (use 'auto' or 'cpu')"
        )
    return torch.device(device)


@functools.lru_cache(maxsize=1)
def _model(settings: ModelSettings, lora: LoraSettings):
    if settings.client_threads > 0:
        torch.set_num_threads(settings.client_threads)
    model = build_lora_model(settings.name, lora, precision=settings.precision, device=resolve_device(settings.device))
    return model, None if is_image_classifier(settings.name) else _tokenizer(settings.name)


@functools.lru_cache(maxsize=1)
def _tokenizer(model_name: str):
    # One per process, shared by the start-up length check (query) and every train/evaluate message.
    return load_tokenizer(model_name)


@functools.lru_cache(maxsize=16)
def _data(data: DataSettings, seed: int, model_name: str, partition_id: int, num_partitions: int) -> ClientData:
    # Hub images are prepared as the model expects them (its image processor).
    preprocess = image_preprocessor(model_name) if data.image_column else None
    return load_client_data(data, partition_id, num_partitions, seed=seed, preprocess=preprocess)


def _seed(config: RunConfig, partition_id: int, server_round: int) -> int:
    """A per-client, per-round seed derived from the run seed (stable across processes)."""
    digest = hashlib.sha256(f"{config.seed}/{partition_id}/{server_round}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


# context.state records: the adapter this client last received or trained, and its digest.
HELD_ADAPTER = "held-adapter"
HELD_DIGEST = "held-adapter-digest"


class MissingAdapter(Exception):
    """The message names an adapter this client does not hold (e.g. its SuperNode lost its state)."""


def hold(state: RecordDict, adapter: Mapping[str, Any], digest: str) -> None:
    """Keep ``adapter`` (named arrays or an ArrayRecord) as the one this client holds."""
    state[HELD_ADAPTER] = adapter if isinstance(adapter, ArrayRecord) else protocol.adapter_to_record(adapter)
    state[HELD_DIGEST] = ConfigRecord({protocol.ADAPTER_DIGEST: digest})


def held_adapter(message: Message, state: RecordDict) -> dict[str, Any] | None:
    """The adapter a train or evaluate message is about: the one it carries (then held), or the one this
    client holds if the message names it by digest instead (one download per round); None if not held."""
    wanted = message.content.config_records[protocol.CONFIG].get(protocol.ADAPTER_DIGEST)
    if protocol.ARRAYS in message.content.array_records:
        record = message.content.array_records[protocol.ARRAYS]
        if wanted is not None:
            hold(state, record, wanted)
        return protocol.record_to_adapter(record)
    held = state.config_records.get(HELD_DIGEST)
    if wanted is None or held is None or held.get(protocol.ADAPTER_DIGEST) != wanted:
        return None
    return protocol.record_to_adapter(state.array_records[HELD_ADAPTER])


def missing_adapter_reply(message: Message, partition_id: int, digest: object) -> Message:
    """Ask the server for the adapter in full (it resends the message with ``arrays``)."""
    log(INFO, "client %d does not hold adapter %s; asking for it in full", partition_id, digest)
    metrics = MetricRecord({protocol.PARTITION_ID: partition_id, protocol.MISSING_ADAPTER: 1})
    return Message(RecordDict({protocol.METRICS: metrics}), reply_to=message)


class ClientSession:
    """What one message needs: the validated config, this node's partition and its data."""

    def __init__(self, context: Context, overrides: Mapping[str, Any] | None):
        self.started = time.time()
        # A SuperNode may set machine-specific keys for itself (its GPU, where its data lives).
        own = {key: context.node_config[key] for key in NODE_CONFIG_KEYS if key in context.node_config}
        self.config = RunConfig.from_run_config(context.run_config, {**(overrides or {}), **own})
        logs.configure(self.config.log_level, client=True)
        self.partition_id, self.num_partitions = partition_of(context)
        config = self.config
        self.data = _data(config.data, config.seed, config.model.name, self.partition_id, self.num_partitions)
        self.ala: protocol.AlaSettings | None = (
            None  # FedALA's client-side step, when the message asks for it (load_model)
        )
        self.received: dict[str, Any] = {}  # the adapter the message is about (load_model)
        self.dpa: DpaSettings | None = None  # FedDPA's settings, when the message declares them (load_model)
        self.local: dict[str, Any] = {}  # FedDPA: the local adapter of the message (the global one is loaded)
        self.images = isinstance(next(iter(self.data.train), None), ImageExample)
        if self.images != is_image_classifier(config.model.name):
            kind, model_kind = ("images", "a causal language model") if self.images else ("text", "an image classifier")
            raise ValueError(
                f"run-config key 'model-name': value {config.model.name!r} is {model_kind}, "
                f"but data={config.data.source!r} holds {kind}; choose a model for that data"
            )

    def codec(self, tokenizer) -> Codec:
        """How this client's examples become batches for the shared train loop."""
        return ImageCodec() if self.images else TextCodec(tokenizer, self.config.train.max_seq_len)

    @property
    def scored(self) -> list:
        """The items this client scores: its ``eval-split`` (test, or validation)."""
        return self.data.split(self.config.eval.split)

    def score(self, model, tokenizer, items: list | None = None, rows: Rows | None = None) -> dict:
        """The model's scores on this client's ``eval-split`` (test, or validation), or on ``items`` (the family's
        eval loop); ``rows``: entered around the model's calls on those items (FedDPA's per-item weights)."""
        settings, bf16 = self.config.eval, self.config.model.bf16_compute
        items = self.scored if items is None else items
        if self.images:
            return evaluate_classifier(
                model, items, batch_size=settings.batch_size, bf16_autocast=bf16, device=model.device, rows=rows
            )
        return evaluate_adapter(
            model,
            tokenizer,
            items,
            batch_size=settings.batch_size,
            max_new_tokens=settings.max_new_tokens,
            bf16_autocast=bf16,
            device=model.device,
            score_options=settings.option_scoring,
            rows=rows,
        )

    def represent(self, model, tokenizer, items: list):
        """FedDPA's representations E(x) of ``items`` (training or scored ones) under the model as it is."""
        settings, bf16 = self.config.eval, self.config.model.bf16_compute
        if self.images:
            return image_representations(
                model, items, batch_size=settings.batch_size, bf16_autocast=bf16, device=model.device
            )
        return text_representations(
            model,
            tokenizer,
            [item.instruction for item in items],
            batch_size=settings.batch_size,
            bf16_autocast=bf16,
            device=model.device,
        )

    def fit_training_examples(self) -> int:
        """Check at start-up, not after rounds of work, that every training example fits ``max-seq-len``;
        returns how many have their instruction cut to fit (logged). Images: 0."""
        if self.images:
            return 0
        max_seq_len = self.config.train.max_seq_len
        report = fit_report(_tokenizer(self.config.model.name), self.data.train, max_seq_len)
        if report.truncated:
            log(
                INFO,
                "client %d (%s): %d of %d training examples exceed max-seq-len %d (longest %d tokens); "
                "their instructions are cut to fit, answers kept whole",
                self.partition_id,
                self.data.task,
                report.truncated,
                report.examples,
                max_seq_len,
                report.longest,
            )
        return report.truncated

    def majority_score(self) -> float:
        """Exact match of always giving the most common training answer (label) on the ``eval-split``
        the client scores: the prior to beat, on the same items as the scores."""
        items = self.scored
        if self.images:
            majority, _ = most_common(example.label for example in self.data.train)
            return sum(example.label == majority for example in items) / len(items)
        answer, _ = most_common_answer(self.data.train, key=answer_text)
        return score_answers([answer] * len(items), [e.output for e in items])["exact_match"]

    def load_model(self, message: Message, context: Context):
        """The shared model with this client's adapter for the message (refusing a misrouted one).

        That is the adapter the message carries, unless the strategy declares FedALA's
        adaptive local aggregation: then the client mixes it with its local model. A FedDPA
        message's global adapter is loaded and its local one kept aside (``self.local``).
        Returns (model, tokenizer, server round, metrics of the client-side step).
        """
        config = message.content.config_records[protocol.CONFIG]
        addressed_to = config.get(protocol.PARTITION_ID)
        if addressed_to != self.partition_id:
            raise ValueError(
                f"message for partition {addressed_to!r} reached client {self.partition_id}; "
                "refusing another client's adapter"
            )
        adapter = held_adapter(message, context.state)
        if adapter is None:
            raise MissingAdapter(config.get(protocol.ADAPTER_DIGEST))
        self.received = adapter
        self.dpa = DpaSettings.from_config(config)
        if self.dpa is not None:
            adapter, self.local = split_adapter(adapter)
        model, tokenizer = _model(self.config.model, self.config.lora)
        set_adapter_arrays(model, adapter)
        server_round = int(config[protocol.SERVER_ROUND])
        step: dict[str, float] = {}
        self.ala = ala = protocol.AlaSettings.from_config(config)
        if ala is not None:
            step = adaptive_local_aggregation(
                model,
                self.codec(tokenizer),
                self.data.train,
                context.state,
                ala,
                batch_size=self.config.train.batch_size,
                seed=_seed(self.config, self.partition_id, server_round),
                device=model.device,
            )
            if step[protocol.ALA_EPOCHS]:
                log(
                    INFO,
                    "client %d, round %d: FedALA learned its mixing weights in %d epochs (mean weight %.3f)",
                    self.partition_id,
                    server_round,
                    step[protocol.ALA_EPOCHS],
                    step[protocol.ALA_MEAN_WEIGHT],
                )
        return model, tokenizer, server_round, step

    def metrics(self, values: Mapping[str, float | int | list[float]], num_examples: int) -> MetricRecord:
        """The reply's metrics: who, on how many examples, what, and when it was busy."""
        started, ended = protocol.BUSY_KEYS
        return MetricRecord(
            {
                protocol.PARTITION_ID: self.partition_id,
                protocol.NUM_EXAMPLES: num_examples,
                **values,
                started: self.started,
                ended: time.time(),
            }
        )


UpdateCorruption = Callable[[int, int, dict, dict], dict]


def make_client_app(
    overrides: Mapping[str, Any] | None = None, *, corrupt: UpdateCorruption | None = None
) -> ClientApp:
    """The fedbilevel ClientApp.

    ``overrides`` replace run-config values (for tests and scripts). ``corrupt`` is a test
    harness for robustness experiments (``python -m fedbilevel.simulation --faulty-clients``):
    ``(partition id, round, received, trained) -> adapter to send``.
    """
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        partition_id, num_partitions = partition_of(context)  # a bad node config has no partition to name
        try:
            session = ClientSession(context, overrides)
            if session.config.privacy.enabled:  # a DP budget this client's data cannot meet stops it here
                plan_for(session.config, num_examples=len(session.data.train), num_clients=session.num_partitions)
            info = ConfigRecord(
                {
                    protocol.PARTITION_ID: session.partition_id,
                    protocol.NUM_PARTITIONS: session.num_partitions,
                    protocol.TASK: session.data.task,
                    protocol.NUM_TRAIN: len(session.data.train),
                    protocol.NUM_TEST: len(session.scored),  # the items scored (eval-split)
                    # The score of always giving the most common training answer: what the model
                    # must beat to have learned more than the label prior.
                    protocol.MAJORITY_EXACT_MATCH: session.majority_score(),
                    # Instructions cut to fit max-seq-len (an example that cannot fit stops the run here).
                    protocol.NUM_TRUNCATED: session.fit_training_examples(),
                    protocol.DATA_DIGEST: data_digest(session.data),
                }
            )
            # θ⁰ follows from the run config (cheap: shapes from the meta device), so the first train
            # message can name it rather than carry it.
            initial = initial_adapter_arrays(session.config.model.name, session.config.lora, seed=session.config.seed)
            hold(context.state, initial, protocol.adapter_digest(initial))
        except Exception as error:  # any reason a client cannot start is reported and recorded, not lost
            reason = f"{type(error).__name__}: {' '.join(str(error).split())}"
            log(ERROR, "client %d cannot start: %s", partition_id, reason)
            info = ConfigRecord(
                {
                    protocol.PARTITION_ID: partition_id,
                    protocol.NUM_PARTITIONS: num_partitions,
                    protocol.START_ERROR: reason,
                }
            )
        return Message(RecordDict({protocol.INFO: info}), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        session = ClientSession(context, overrides)
        try:
            model, tokenizer, server_round, step = session.load_model(message, context)
        except MissingAdapter as missing:
            return missing_adapter_reply(message, session.partition_id, missing)
        config, settings = session.config, session.config.train
        # Strategies declare client-side steps in the message (FedProx's μ, FedAMP's λ, FFA-LoRA's frozen A).
        declared = message.content.config_records[protocol.CONFIG]
        mu = float(declared.get(protocol.PROXIMAL_MU, 0.0))
        freeze_lora_a = bool(declared.get(protocol.FREEZE_LORA_A, False))
        privacy = ClientPrivacy.for_message(
            config,
            num_examples=len(session.data.train),
            num_clients=session.num_partitions,
            state=context.state,
            declared=declared,
        )
        if privacy is not None and privacy.exhausted:  # the adapter goes back as received: a zero update
            log(
                INFO,
                "client %d, round %d: stops training, its next round would exceed dp-epsilon (%s)",
                session.partition_id,
                server_round,
                privacy.describe(),
            )
            values = {protocol.TRAIN_LOSS: 0.0, protocol.TRAIN_LAST_LOSS: 0.0, protocol.TRAIN_SECONDS: 0.0}
            metrics = session.metrics({**values, **privacy.stopped()}, len(session.data.train))
            hold(context.state, session.received, protocol.adapter_digest(session.received))
            content = RecordDict(
                {protocol.ARRAYS: protocol.adapter_to_record(session.received), protocol.METRICS: metrics}
            )
            return Message(content, reply_to=message)

        def run_training() -> TrainResult:
            """The shared loop on the model's trainable parameters, for this client and round."""
            return train_adapter(
                model,
                session.codec(tokenizer),
                session.data.train,
                steps=settings.local_steps,
                bf16_autocast=config.model.bf16_compute,
                device=model.device,
                seed=_seed(config, session.partition_id, server_round),
                extra_loss=proximal_term(model, mu) if mu > 0 else None,
                freeze_lora_a=freeze_lora_a,
                dp_sgd=privacy.dp_sgd() if privacy is not None else None,
                **settings.loop_options(),
            )

        local, phase = session.local, {}
        if session.dpa is not None and server_round > 1:  # FedDPA-T: the local adapter first, from round 2 on
            local, local_result = train_local_adapter(
                model, session.local, run_training, local_weight=session.dpa.local_weight
            )
            phase = {protocol.DPA_LOCAL_LOSS: local_result.loss}
            log(
                INFO,
                "client %d, round %d: FedDPA's local adapter trained in %.1f s, mean loss %.4f",
                session.partition_id,
                server_round,
                local_result.seconds,
                local_result.loss,
            )
        result = run_training()  # FedDPA: its global adapter, alone
        log(
            INFO,
            "client %d (%s), round %d: %d steps in %.1f s, mean loss %.4f, last %.4f",
            session.partition_id,
            session.data.task,
            server_round,
            settings.local_steps,
            result.seconds,
            result.loss,
            result.last_loss,
        )
        values = {
            protocol.TRAIN_LOSS: result.loss,
            protocol.TRAIN_LAST_LOSS: result.last_loss,
            protocol.TRAIN_SECONDS: result.seconds,
            **step,
            **phase,
            **process_memory_mb(),
        }
        if privacy is not None:  # this round's release is counted before it is sent
            values.update(privacy.spend(context.state))
            log(INFO, "client %d, round %d: %s", session.partition_id, server_round, privacy.describe())
        metrics = session.metrics(values, len(session.data.train))
        trained = get_adapter_arrays(model)
        if session.dpa is not None:
            trained = dual_adapter(trained, local)
        if session.ala is not None:
            remember_local(context.state, trained)
        if privacy is not None:  # dp = "update": the clipped, noised update; frozen arrays go back as received
            # What did not train goes back as received: FFA-LoRA's frozen A, FedDPA's local adapter before round 2.
            untrained_local = session.dpa is not None and not phase
            names = [
                name
                for name in trained
                if not (freeze_lora_a and is_lora_a(name)) and not (untrained_local and name.startswith(LOCAL_PREFIX))
            ]
            trained = privacy.release(session.received, trained, names=names)
        if corrupt is not None:
            trained = corrupt(session.partition_id, server_round, session.received, trained)
        hold(context.state, trained, protocol.adapter_digest(trained))  # the next message may name it
        content = RecordDict({protocol.ARRAYS: protocol.adapter_to_record(trained), protocol.METRICS: metrics})
        return Message(content, reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        session = ClientSession(context, overrides)
        try:
            model, tokenizer, server_round, step = session.load_model(message, context)
        except MissingAdapter as missing:
            return missing_adapter_reply(message, session.partition_id, missing)
        config = message.content.config_records[protocol.CONFIG]
        # FedDPA before the client's local adapter has trained: the global adapter alone (α = 1)
        mixed = session.dpa is not None and config.get(protocol.DPA_LOCAL_TRAINED, True)
        if not mixed:
            score = functools.partial(session.score, model, tokenizer)
        else:  # FedDPA: the global and local adapters, mixed per item

            def score(items: list | None = None) -> dict:
                return score_dual(
                    model,
                    session.local,
                    session.dpa,
                    training=session.data.train,
                    scored=session.scored if items is None else items,
                    represent=lambda chosen: session.represent(model, tokenizer, chosen),
                    score=lambda rows: session.score(model, tokenizer, items, rows),
                    seed=_seed(session.config, session.partition_id, server_round),
                )

        scores = score()
        if session.dpa is not None and not mixed:
            scores[protocol.DPA_MEAN_WEIGHT] = 1.0
        if config.get(protocol.CROSS_TASK):  # eval-cross: the other tasks
            scores.update(other_task_scores(score, session.config, session.partition_id, session.num_partitions))
        summary = ", ".join(
            f"{key} {scores[key]:.3f}" for key in ("exact_match", "rougeL", "accuracy", "macro_f1") if key in scores
        )
        log(
            INFO,
            "client %d (%s), round %d: evaluated %d items in %.1f s, %s",
            session.partition_id,
            session.data.task,
            server_round,
            len(session.scored),
            scores[protocol.EVAL_SECONDS],
            summary,
        )
        if protocol.GLOBAL in message.content.array_records:  # also score the mean adapter (eval-global)
            set_adapter_arrays(model, protocol.record_to_adapter(message.content.array_records[protocol.GLOBAL]))
            shared = session.score(model, tokenizer)
            scores.update({f"{protocol.GLOBAL_PREFIX}{k}": v for k, v in shared.items() if not isinstance(v, list)})
        scores.update(step)  # e.g. FedALA's weight learning for this global model
        return Message(RecordDict({protocol.METRICS: session.metrics(scores, len(session.scored))}), reply_to=message)

    return app
