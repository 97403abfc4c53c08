"""What travels between ServerApp and ClientApp: every record and value key, and adapter <-> ArrayRecord.

Query (partition discovery), server -> client: ``config`` with ``query`` = ``partition``. Its reply
carries the ``info`` ConfigRecord: ``partition-id``, ``num-partitions``, ``task``, ``num-train``,
``num-test`` and ``majority-exact-match`` (the score of always giving the most common training answer).

Train / evaluate, server -> client: ``config`` (``server-round``, ``partition-id``, the partition the
adapter belongs to: the client refuses a message addressed to another partition, and
``adapter-digest``, which adapter the message is about) and ``arrays``, that adapter (packed:
:func:`adapter_to_record`), unless the
server knows the client holds it already: a client keeps the adapter it last received or trained in
its ``context.state``, so each adapter is downloaded once (the evaluate message of round t brings
θ̄ᵢ, the train message of round t + 1 names it). A client that does not hold the named adapter (a
SuperNode that lost its state) replies ``missing-adapter`` = 1 and is sent it in full. The config
also holds what the strategy asks of the client: FedProx's and FedAMP's ``proximal-mu``, FFA-LoRA's
``freeze-lora-a``, FedALA's ``fedala-*`` values (:class:`AlaSettings`), FedDPA's ``feddpa-*`` values
(:class:`~fedbilevel.strategies.feddpa.DpaSettings`; its adapter then holds the global adapter and,
prefixed ``local/``, the client's local one). Evaluate messages may also carry ``global`` (the mean
adapter, FedDPA's global adapter, whose scores come back prefixed ``global-``). With differential
privacy, train messages also carry the client's privacy account (``dp-history``) and train replies
add ``dp-epsilon-spent``, ``dp-noise-multiplier``, ``dp-sample-rate``, ``dp-steps`` and
``dp-stopped``; those keys are declared with the settings in :mod:`fedbilevel.privacy`.

Client -> server: ``arrays`` (train only) and ``metrics``: ``partition-id``, ``num-examples``,
``client-started`` and ``client-ended``; train replies add ``train-loss``, ``train-last-loss``,
``train-seconds`` and the client process's ``rss-mb`` and ``peak-rss-mb``; evaluate replies add
``eval-seconds``, the scores and their per-test-item lists (``items-<score>``). With FedALA both add
``ala-epochs`` and, when the mixing weights were learned, ``ala-loss`` and ``ala-mean-weight``. With
FedDPA train replies add ``feddpa-local-loss`` (once its local adapter trains) and evaluate replies
``feddpa-mean-weight``.

Cross-task evaluation (``eval-cross``): the final round's evaluate messages carry ``cross-task`` =
True in their config; the client then also scores its adapter on every partition of another task
and adds one list per value, each with one entry per partition (``num-partitions`` entries, in
partition order): ``cross-items`` (items scored: the partition's ``eval-split`` items; 0 for the
partitions of its own task, itself included, which it does not score again), ``cross-digests``
(:func:`digest_number` of the partition's data digest as it loaded it: the server compares it with
the owner's ``data-digest``), ``cross-<score>`` per text score (mean over those items; 0.0 where
none), and the scalar ``cross-seconds``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from fedbilevel.options import integer, number, option, validate

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
ADAPTER_DIGEST = "adapter-digest"  # config: adapter_digest() of the adapter a message is about
MISSING_ADAPTER = "missing-adapter"  # reply metric: 1 when the client does not hold the adapter named
# Evaluation metrics with this prefix are per-test-item lists (e.g. "items-exact_match").
ITEMS_PREFIX = "items-"
# Wall-clock time (time.time()) when a client started and finished handling a message;
# the server uses them to split round time into client work and Flower overhead.
BUSY_KEYS = ("client-started", "client-ended")

# Query: the message's config asks for the partition; the reply's info describes it.
QUERY = "query"
QUERY_PARTITION = "partition"
TASK = "task"
NUM_TRAIN = "num-train"
NUM_TEST = "num-test"
MAJORITY_EXACT_MATCH = "majority-exact-match"
NUM_TRUNCATED = "num-truncated"  # training examples whose instruction is cut to fit max-seq-len
DATA_DIGEST = "data-digest"  # of the partition's examples: a resumed run must see the same data
START_ERROR = "start-error"  # why the client cannot start (e.g. its data failed to load), in one line

# Cross-task evaluation (eval-cross): the evaluate config's flag, and the reply's per-partition lists.
CROSS_TASK = "cross-task"
CROSS_PREFIX = "cross-"  # reply metrics: cross-items, cross-digests, cross-<score>, cross-seconds
CROSS_ITEMS = "cross-items"
CROSS_DIGESTS = "cross-digests"
CROSS_SECONDS = "cross-seconds"
CROSS_DPA_MEAN_WEIGHT = "cross-feddpa-mean-weight"  # FedDPA: the mean α(x) over the other tasks' items

# Client-side steps a strategy declares in the train / evaluate config.
PROXIMAL_MU = "proximal-mu"  # μ of the proximal term μ/2 ‖θ − θ_received‖² (FedProx; FedAMP's λ)
FREEZE_LORA_A = "freeze-lora-a"  # True: train with the lora_A parameters frozen (FFA-LoRA)

# The scores an evaluate reply carries (each also per test item, under ITEMS_PREFIX).
TEXT_METRICS = ("rouge1", "rougeL", "exact_match")
IMAGE_METRICS = ("accuracy", "macro_f1")

# Reply metrics besides the scores.
TRAIN_LOSS = "train-loss"  # mean over the local steps
TRAIN_LAST_LOSS = "train-last-loss"
TRAIN_SECONDS = "train-seconds"
EVAL_SECONDS = "eval-seconds"
RSS_MB = "rss-mb"  # the client process's resident memory now
PEAK_RSS_MB = "peak-rss-mb"  # and at its peak
ALA_EPOCHS = "ala-epochs"  # FedALA's weight learning for the received global adapter
ALA_LOSS = "ala-loss"
ALA_MEAN_WEIGHT = "ala-mean-weight"
DPA_MEAN_WEIGHT = "feddpa-mean-weight"  # FedDPA evaluate replies: the mean α(x) over the scored items
DPA_LOCAL_LOSS = "feddpa-local-loss"  # FedDPA train replies: the local phase's mean loss
# FedDPA evaluate config: whether the client's local adapter has trained; until it has, the client scores
# the global adapter alone (α = 1), not α(x) times it plus an untrained (zero) local update.
DPA_LOCAL_TRAINED = "feddpa-local-trained"


@dataclass(frozen=True)
class AlaSettings:
    """FedALA's client hyper-parameters: run-config options the strategy declares in each message.

    Attributes
    ----------
    eta : float
        η, the learning rate of the weights W.
    data_fraction : float
        s, the fraction of the training data W is learned on (at least one example).
    top_fraction : float
        Fraction of the transformer blocks, from the top, whose adapters are mixed by W
        (the paper's p higher layers); lower blocks take the global adapter. Arrays in
        no block (e.g. a classifier head) count as top.
    start_epochs : int
        Epochs of W learning the first time; later rounds use one.
    """

    eta: float = option(
        "fedala-eta",
        1.0,
        number(0.0, low_open=True),
        "FedALA: learning rate η of the weights W (the paper's default). W's update is η·∇θ̂L·(Θ − θ), a product of "
        "two small numbers for LoRA adapters: at η = 1 the mean weight stayed at 1.000 on the synthetic federation "
        "(FedALA = FedAvg there); raise η to let it personalize (tuned: 10 on digits, 100 on the synthetic "
        "federation, 10⁴ on Flan-8)",
    )
    data_fraction: float = option(
        "fedala-data-fraction",
        0.8,
        number(0.0, low_open=True, high=1.0, high_open=False),
        "FedALA: fraction s of the training data W is learned on (the paper's default)",
    )
    top_fraction: float = option(
        "fedala-top-fraction",
        1.0,
        number(0.0, low_open=True, high=1.0, high_open=False),
        "FedALA: fraction of the transformer blocks (from the top) mixed by W; lower blocks take the global adapter",
    )
    start_epochs: int = option(
        "fedala-start-epochs",
        2,
        integer(1),
        "FedALA: epochs of W learning the first time (the paper trains to convergence; later rounds use one)",
    )

    def __post_init__(self) -> None:
        validate(self)

    def to_config(self) -> dict[str, float | int]:
        """The message config entries that switch ALA on at the client."""
        return {key: getattr(self, field) for field, key in _MESSAGE_KEYS.items()}

    @classmethod
    def from_config(cls, config: Mapping) -> AlaSettings | None:
        """The settings a message declares, or None when the strategy does not use ALA."""
        if _MESSAGE_KEYS["eta"] not in config:
            return None
        return cls(**{field: config[key] for field, key in _MESSAGE_KEYS.items()})


# AlaSettings field -> message config key: the run-config keys of the same names.
_MESSAGE_KEYS = {declared.name: declared.metadata["key"] for declared in fields(AlaSettings)}


def adapter_digest(adapter: Mapping[str, np.ndarray]) -> str:
    """SHA-256 (hex, 16 characters) of named arrays: names, dtypes, shapes and values, in order.

    Identifies an adapter on both sides of a message (which adapter a client holds) and in a
    run's record (which initial adapter it started from). About 2 GB/s: 10 ms for 4.2 M float32.
    """
    digest = hashlib.sha256()
    for name, array in adapter.items():
        digest.update(f"{name}\x1f{array.dtype}\x1f{array.shape}\x1e".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def digest_number(digest: str) -> int:
    """The first 48 bits of a hex digest (e.g. a ``data-digest``) as an int: a MetricRecord holds numbers only.

    Parameters
    ----------
    digest : str
        Hexadecimal, at least 12 characters.

    Returns
    -------
    int
        In [0, 2⁴⁸): exact in an int64 and in a float64.
    """
    return int(digest[:12], 16)


# An adapter travels packed: all its arrays' bytes back to back in one uint8 Array, and a manifest.
# Flower moves every Array of a message as its own object, one pull per object with at most one
# pull per CPU core in flight: SmolLM2's 240 arrays one by one made a SuperNode round's overhead
# 1.8x what it is packed (docs/BENCHMARKS.md, "The cost of a message on a real SuperNode").
PACKED = "packed"  # uint8, every array's bytes in manifest order, each starting at a multiple of ALIGNMENT
MANIFEST = "manifest"  # uint8, UTF-8 JSON: [[name, dtype, shape, offset], ...]
ALIGNMENT = 64  # bytes: array starts in the buffer are multiples of this, so every view is aligned for its dtype
_PACKABLE_KINDS = "biufc"  # bool, int, uint, float, complex: dtypes whose bytes are their values


def adapter_to_record(adapter: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Named arrays -> an ArrayRecord of two Arrays, ``manifest`` and ``packed`` (one Flower object each,
    or a few 5 MB chunks, rather than one per array).

    Parameters
    ----------
    adapter : Mapping[str, np.ndarray]
        Arrays of numeric or bool dtype, any shapes; their order is kept.

    Returns
    -------
    ArrayRecord
        :func:`record_to_adapter` gives back equal arrays (names, order, dtypes, shapes, values).

    Raises
    ------
    ValueError
        If an array's dtype is not numeric (e.g. object or string arrays).
    """
    arrays = {name: np.asarray(array) for name, array in adapter.items()}
    manifest, offset = [], 0
    for name, array in arrays.items():
        if array.dtype.kind not in _PACKABLE_KINDS:
            raise ValueError(f"array '{name}': dtype {array.dtype} cannot travel in an adapter (numeric or bool only)")
        manifest.append([name, array.dtype.str, list(array.shape), offset])
        offset += -(-array.nbytes // ALIGNMENT) * ALIGNMENT
    packed = np.zeros(offset, dtype=np.uint8)
    for (*_, start), array in zip(manifest, arrays.values(), strict=True):
        packed[start : start + array.nbytes] = array.reshape(-1).view(np.uint8)  # reshape copies a strided array
    text = np.frombuffer(json.dumps(manifest).encode(), dtype=np.uint8)
    return ArrayRecord({MANIFEST: Array(text.copy()), PACKED: Array(packed)})


def record_to_adapter(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord written by :func:`adapter_to_record` -> named NumPy arrays, names and order kept.

    The arrays are writable views of one buffer, each aligned for its dtype (no copy per array).

    Raises
    ------
    ValueError
        If the record is not a packed adapter: other entries, an unreadable manifest, a dtype that is not
        numeric, or an array outside the packed bytes (a reply from another version or a faulty client).
    """
    if set(record.keys()) != {MANIFEST, PACKED}:
        raise ValueError(f"not a packed adapter: entries {sorted(record.keys())[:4]}, expected {[MANIFEST, PACKED]}")
    try:
        manifest = json.loads(record[MANIFEST].numpy().tobytes().decode())
        buffer = record[PACKED].numpy()
        if buffer.dtype != np.uint8 or buffer.ndim != 1:
            raise ValueError(f"'{PACKED}' is {buffer.dtype} of shape {buffer.shape}, expected 1-d uint8")
        adapter = {}
        for name, dtype_str, shape, start in manifest:
            dtype = np.dtype(dtype_str)
            if dtype.kind not in _PACKABLE_KINDS:
                raise ValueError(f"array '{name}': dtype {dtype} is not numeric")
            size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if not 0 <= start <= start + size <= buffer.size:
                raise ValueError(f"array '{name}': bytes [{start}, {start + size}) outside the packed buffer")
            adapter[name] = buffer[start : start + size].view(dtype).reshape(shape)
    except (TypeError, ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise ValueError(f"unreadable packed adapter: {error}") from None
    return adapter


def count_bytes(content: RecordDict) -> int:
    """Payload bytes of a message, as the records themselves count them."""
    return sum(record.count_bytes() for record in content.values())
