"""The run config: every run-config key, declared once by the component that uses it.

:class:`RunConfig` composes the components' own declarations (:mod:`fedbilevel.options`):
the run itself (strategy, rounds, seed, server timing, where results go, declared here), the
base model and its LoRA adapter (:mod:`fedbilevel.models.settings`), the federation
(:mod:`fedbilevel.data.settings`), local training and evaluation (declared here: both sides
read them), FedBip (:class:`~fedbilevel.aggregation.FedBipSettings` with its
:class:`~fedbilevel.weighting.Weighting`) and the baselines (their strategy modules, FedALA's
client step in :mod:`fedbilevel.protocol`). :data:`SCHEMA`, the defaults and the README's
key table follow from those declarations; tests keep pyproject's
``[tool.flwr.app.config]`` and the README equal to them. Every bad value fails with one line
naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedbilevel import options
from fedbilevel.aggregation import FedBipSettings
from fedbilevel.data.settings import DataSettings
from fedbilevel.models.settings import LoraSettings, ModelSettings
from fedbilevel.options import (
    ConfigError,
    boolean,
    choice,
    component,
    declared,
    defaults,
    integer,
    number,
    option,
    text,
    validate,
)
from fedbilevel.privacy import PrivacySettings
from fedbilevel.protocol import AlaSettings
from fedbilevel.strategies import FEDBIP_PRESETS, strategy_names
from fedbilevel.strategies.base import AGGREGATION_WEIGHTS
from fedbilevel.strategies.fedamp import FedAmpSettings
from fedbilevel.strategies.feddpa import DpaSettings
from fedbilevel.strategies.fedprox import FedProxSettings
from fedbilevel.strategies.sampling import SamplingSettings

__all__ = [
    "OPTIMIZERS",
    "PYPROJECT",
    "RESUMABLE_KEYS",
    "SCHEMA",
    "ConfigError",
    "RunConfig",
    "load_app_config",
    "parse_assignment",
    "resolve",
]


# The local optimizers train_adapter builds (fedbilevel.client.train).
OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class TrainSettings:
    """Local training, the same loop for every strategy (AdamW, or SGD).

    ``local-steps`` counts optimizer steps: with ``gradient-accumulation-steps`` k each step
    consumes k batches of ``batch-size``. The learning-rate schedule runs over one round's
    local steps, since each round starts a fresh optimizer.
    """

    local_steps: int = option(
        "local-steps",
        10,
        integer(1),
        "optimizer steps per client and round (each consumes `gradient-accumulation-steps` batches)",
    )
    batch_size: int = option("batch-size", 8, integer(1), "training batch size (of one forward and backward pass)")
    learning_rate: float = option(
        "learning-rate", 0.001, number(0.0, low_open=True), "the optimizer's (peak) learning rate"
    )
    optimizer: str = option(
        "optimizer",
        "adamw",
        choice(OPTIMIZERS),
        "local optimizer, fresh each round: 'adamw' (torch's AdamW, betas 0.9/0.999, no weight decay) or 'sgd' "
        "(with `momentum`; DP-SGD's own: where the noise dominates, AdamW moves every value by about the learning "
        "rate in a noise-chosen direction, SGD by the learning rate times the noise)",
    )
    momentum: float = option(
        "momentum", 0.0, number(0.0, low_open=False, high=1.0), "SGD momentum (optimizer 'sgd' only); 0: none"
    )
    max_seq_len: int = option(
        "max-seq-len",
        128,
        integer(8),
        "tokens per training example: a longer one loses the middle of its instruction (template and answer kept "
        "whole; counted as `num_truncated`); one whose template and answer alone exceed it stops the run at start-up",
    )
    gradient_accumulation_steps: int = option(
        "gradient-accumulation-steps",
        1,
        integer(1),
        "batches whose gradients add up to one optimizer step: k batches of b give the update of one batch of k·b",
    )
    lr_scheduler: str = option(
        "lr-scheduler",
        "constant",
        choice(("constant", "constant_with_warmup", "linear", "cosine")),
        "transformers' learning-rate schedule over a round's local steps (fresh each round, as the optimizer)",
    )
    warmup_steps: int = option(
        "warmup-steps",
        0,
        integer(0),
        "local steps of linear warm-up from 0 to `learning-rate` (a schedule other than constant; ≤ local-steps)",
    )
    max_grad_norm: float = option(
        "max-grad-norm",
        0.0,
        number(0.0, low_open=False),
        "clip the gradient's global L2 norm to this before each optimizer step; 0: no clipping",
    )
    gradient_checkpointing: bool = option(
        "gradient-checkpointing",
        False,
        boolean,
        "recompute activations in the backward pass: less activation memory for one more forward pass per batch",
    )

    def loop_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`fedbilevel.client.train.train_adapter` these settings fix, so
        every caller trains alike: all but ``local-steps`` (a caller may count steps otherwise) and
        ``max-seq-len`` (the codec's)."""
        return {
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "optimizer": self.optimizer,
            "momentum": self.momentum,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "lr_scheduler": self.lr_scheduler,
            "warmup_steps": self.warmup_steps,
            "max_grad_norm": self.max_grad_norm,
            "gradient_checkpointing": self.gradient_checkpointing,
        }

    def __post_init__(self) -> None:
        validate(self)
        if self.warmup_steps > self.local_steps:
            raise options.not_allowed(
                "warmup-steps", self.warmup_steps, f"expected at most local-steps ({self.local_steps})"
            )
        if self.momentum and self.optimizer != "sgd":
            raise options.not_allowed(
                "momentum", self.momentum, f"optimizer {self.optimizer!r} has no momentum key: expected 0, or 'sgd'"
            )
        if self.warmup_steps and self.lr_scheduler == "constant":
            raise options.not_allowed(
                "warmup-steps",
                self.warmup_steps,
                "lr-scheduler 'constant' has no warm-up: expected 0, or another lr-scheduler",
            )


@dataclass(frozen=True)
class EvalSettings:
    """When and how clients score their personalized adapters."""

    every: int = option("eval-every", 1, integer(0), "evaluate every k rounds (0: only after the last round)")
    batch_size: int = option("eval-batch-size", 32, integer(1), "batched greedy generation: batch size")
    max_new_tokens: int = option("eval-max-new-tokens", 16, integer(1), "batched greedy generation: new tokens at most")
    option_scoring: bool = option(
        "eval-option-scoring",
        True,
        boolean,
        "for test items whose instruction lists OPTIONS (Flan style), also rank the options by the model's "
        "log-probability (`option_accuracy`)",
    )
    include_global: bool = option(
        "eval-global",
        False,
        boolean,
        "evaluate messages also carry the global adapter (the weighted mean of the personalized ones: "
        "what FedAvg would deploy; `aggregation-weights`); clients score it too (`global-*` scores, "
        "`global_mean` per round). Doubles evaluation time",
    )
    split: str = option(
        "eval-split",
        "test",
        choice(("test", "validation")),
        "the split clients score (and the majority baseline is measured on): `test`, or `validation` (the items "
        "`val-fraction` holds out of training: for tuning, scripts/tune.py; needs `val-fraction` > 0)",
    )
    cross: bool = option(
        "eval-cross",
        False,
        boolean,
        "cross-task evaluation (FedDPA's test-time personalization): the final round also scores each client's "
        "adapter on the other tasks' `eval-split` items, those their own clients score (`cross_task` in the round's "
        "record, `cross_task.png`); costs each client one more evaluation for every client of another task (6 on the "
        "default 8 clients of 4 tasks); needs a task per client",
    )

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class RunConfig:
    """The validated run config: the run's own options and one component per concern.

    Build it with :meth:`from_run_config` (Flower's flat kebab-case mapping); field docs are
    each option's help (README.md, "Run-config keys").
    """

    strategy: str = option("strategy", "fedbip", choice(strategy_names), "registered strategy name")
    num_server_rounds: int = option("num-server-rounds", 3, integer(1), "federated rounds")
    seed: int = option("seed", 0, integer(0), "seeds data, the initial adapter and every client's training")
    min_nodes: int = option("min-nodes", 2, integer(1), "wait for this many connected SuperNodes before a round")
    round_timeout: float = option(
        "round-timeout", 3600.0, number(0.0, low_open=True), "seconds to wait for replies in a round"
    )
    min_available_fraction: float = option(
        "min-available-fraction",
        0.5,
        number(0.0, low_open=True, high=1.0, high_open=False),
        "a round aggregates only if at least this fraction of the clients replied validly; "
        "otherwise every adapter is kept",
    )
    aggregation_weights: str = option(
        "aggregation-weights",
        "examples",
        choice(AGGREGATION_WEIGHTS),
        "a client's weight in the weighted means of fedavg, fedprox, fedala, fedsa-lora, ffa-lora, feddpa and "
        "`eval-global`: `examples`, its training examples (McMahan et al.'s FedAvg, FedIT); `uniform`, equal (the "
        "official FedDPA and FedSA-LoRA code). The FedBip family, FedAMP and cluster-oracle weigh by similarity "
        "or group and ignore it",
    )
    sampling: SamplingSettings = component(SamplingSettings)
    model: ModelSettings = component(ModelSettings)
    lora: LoraSettings = component(LoraSettings)
    data: DataSettings = component(DataSettings)
    train: TrainSettings = component(TrainSettings)
    privacy: PrivacySettings = component(PrivacySettings)
    eval: EvalSettings = component(EvalSettings)
    fedprox: FedProxSettings = component(FedProxSettings)
    fedamp: FedAmpSettings = component(FedAmpSettings)
    fedala: AlaSettings = component(AlaSettings)
    feddpa: DpaSettings = component(DpaSettings)
    fedbip: FedBipSettings = component(FedBipSettings)
    output_dir: str = option("output-dir", "outputs", text(empty_ok=False), "where run folders are written")
    run_name: str = option("run-name", "", text(empty_ok=True), 'the run folder\'s name ("": strategy + UTC time)')
    resume_from: str = option(
        "resume-from", "", text(empty_ok=True), "a run folder to continue from its last checkpoint (below)"
    )
    log_level: str = option(
        "log-level",
        "info",
        choice(("info", "verbose", "debug")),
        "`info`: the run's report; library warnings, library log lines and progress bars off, and simulated "
        "clients' own lines off (the server logs each reply); `verbose`: those too; `debug`: also DEBUG lines",
    )
    tracker: str = option(
        "tracker",
        "none",
        choice(("none", "tensorboard")),
        "`tensorboard`: TensorBoard event files in `<run>/tensorboard/`, one step per round (personalized mean, "
        "per-client scores and train loss, time split, bytes, similarity and weight heatmaps; the `[tensorboard]` "
        "extra); `none`: none",
    )

    def __post_init__(self) -> None:
        validate(self)
        if self.eval.split == "validation" and self.data.val_fraction == 0:
            raise options.not_allowed(
                "eval-split", "validation", "with val-fraction = 0 there is no validation split: set val-fraction > 0"
            )
        missing = self.data.without_tasks() if self.eval.cross else None
        if missing:
            raise options.not_allowed(
                "eval-cross",
                True,
                f"{missing}; cross-task evaluation needs one task per client, two tasks at least: "
                "data='synthetic' with synthetic-split='task', data='flan-json', or text data='hub' with "
                "partitioner='natural'",
            )
        self.privacy.check_with(
            precision=self.model.precision,
            gradient_checkpointing=self.train.gradient_checkpointing,
            strategy=self.strategy,
        )

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> RunConfig:
        """Validate Flower's flat run config (plus optional overrides) into a RunConfig."""
        merged = {**run_config, **(overrides or {})}
        unknown = sorted(set(merged) - set(SCHEMA))
        if unknown:
            raise ConfigError(f"run-config key '{unknown[0]}': unknown key; known keys: {', '.join(SCHEMA)}")
        missing = [key for key in SCHEMA if key not in merged]
        if missing:
            raise ConfigError(
                f"run-config key '{missing[0]}': missing; add it to [tool.flwr.app.config] in pyproject.toml"
            )
        return options.from_run_config(cls, _with_preset(merged))

    def to_run_config(self) -> dict[str, Any]:
        """Back to the flat kebab-case mapping (what config.json stores and run-config accepts), in SCHEMA order."""
        flat = options.to_run_config(self)
        return {key: flat[key] for key in SCHEMA}

    def evaluates_in_round(self, server_round: int) -> bool:
        """Evaluate every ``eval-every`` rounds, and always after the last round."""
        if server_round == self.num_server_rounds:
            return True
        return self.eval.every > 0 and server_round % self.eval.every == 0

    def cross_evaluates_in_round(self, server_round: int) -> bool:
        """With ``eval-cross``, the final round only: cross-task evaluation costs each client one more
        evaluation for every client of another task, and the final adapters are the ones a client would deploy."""
        return self.eval.cross and server_round == self.num_server_rounds


# run-config key -> its field, over every component, in declaration order (pyproject's and config.json's).
SCHEMA: dict[str, dataclasses.Field] = dict(declared(RunConfig))

# Keys a resumed run may change: how it runs, not what it computes.
RESUMABLE_KEYS = frozenset(
    {
        "num-server-rounds",
        "resume-from",
        "round-timeout",
        "min-nodes",
        "min-available-fraction",
        "device",
        "client-threads",
        "log-level",
        "tracker",
        "output-dir",
        "run-name",
    }
)


def saved_run_config(saved: Mapping[str, Any]) -> dict[str, Any]:
    """The run config of a run's config.json, with the declared default of every key added since it ran:
    a new key defaults to the old behaviour, so that is what the run did."""
    return {**defaults(RunConfig), **saved}


def _with_preset(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with a preset strategy's weighting keys set, refusing other choices.

    A key may be left at its default (the paper's value; it is then replaced) or set to the
    preset's own; anything else would be silently overridden, so it is an error.
    """
    values = dict(values)
    if values["strategy"] not in FEDBIP_PRESETS:
        return values
    base, preset = FEDBIP_PRESETS[values["strategy"]]
    for key, value in preset.items():
        if values[key] != value and values[key] != SCHEMA[key].default:
            raise ConfigError(
                f"run-config key '{key}': value {values[key]!r} is not allowed with strategy='{values['strategy']}', "
                f"which sets {key}={value!r}; use strategy='{base}' to choose the weighting yourself"
            )
        values[key] = value
    return values


def key_table() -> str:
    """The README's table of run-config keys (markdown), from the declarations."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, field in SCHEMA.items():
        default = field.default
        if isinstance(default, tuple):
            default = ",".join(default)
        shown = ('""' if default == "" else f"`{default}`") if isinstance(default, str) else str(default).lower()
        rows.append(f"| `{key}` | {shown} | {field.metadata['help']} |")
    return "\n".join(rows)


# The source checkout's pyproject.toml: the app's default run config (flwr run reads it itself).
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def parse_assignment(text: str) -> tuple[str, Any]:
    """``key=value`` with a TOML value (``lr=3e-4``, ``name='x'``); a bare word is a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"run-config override {text!r} is not allowed; expected KEY=VALUE, e.g. strategy='fedbip'")
    try:
        return key.strip(), tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return key.strip(), value.strip()


def resolve(overrides: Mapping[str, Any], toml_files: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Defaults from pyproject.toml, then each TOML file, then ``overrides``; validated."""
    if not PYPROJECT.is_file():
        raise ConfigError(f"{PYPROJECT} not found: run from a source checkout (pip install -e .)")
    config = load_app_config(PYPROJECT)
    for path in toml_files:
        with open(path, "rb") as handle:
            config.update(tomllib.load(handle))
    config.update(overrides)
    RunConfig.from_run_config(config)  # fail here, with the key named, not inside Ray
    return config


def load_app_config(pyproject: str | Path = "pyproject.toml") -> dict[str, Any]:
    """The default run config of a Flower app (``[tool.flwr.app.config]``), e.g. for ``run_simulation``.

    ``flwr run`` reads this table itself; Flower's ``run_simulation`` passes no run config,
    so scripts and tests load the defaults here and apply overrides on top.
    """
    with open(pyproject, "rb") as handle:
        return dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])
