"""Run-config schema: every key's type, range or allowed values, validated in one place.

Defaults live in ``pyproject.toml`` ``[tool.flwr.app.config]`` (Flower's source of truth
for ``flwr run . --run-config``); this module knows what each key may hold and turns the
flat kebab-case mapping into a typed :class:`RunConfig`. Every bad value fails with one
line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import tomllib

from fedbilevel.aggregation import LAYER_GROUPINGS, SIMILARITY_MODES, TASK_VECTOR_MODES
from fedbilevel.weighting import (
    NEGATIVE_COSINE_MODES,
    SIMILARITY_CENTERINGS,
    WEIGHTING_RULES,
)

PRECISIONS = ("fp32", "bf16-autocast", "bf16", "4bit")
SYNTHETIC_INSTRUCTIONS = ("shared", "per-task")
PARTITIONERS = ("natural", "dirichlet", "iid")
SYNTHETIC_SPLITS = ("task", "iid")

# The weighting keys at the paper's rule: pyproject.toml's defaults (a test keeps them equal).
PAPER_WEIGHTING: dict[str, Any] = {
    "negative-cosine": "clip",
    "weighting": "paper",
    "weighting-temperature": 0.1,
    "weighting-power": 2.0,
    "weighting-top-k": 1,
    "weighting-threshold": 0.5,
    "weighting-z-temperature": 1.0,
    "similarity-centering": "none",
    "self-weight-floor": 0.0,
    "similarity-ema": 0.0,
}

# Named FedBip presets (issue 7): strategy -> (the FedBip strategy it runs, the weighting keys
# it sets). The values were chosen from the weighting ablation in docs/BENCHMARKS.md.
_PLUS = {"weighting": "zscore-softmax", "weighting-z-temperature": 1.0}
FEDBIP_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "fedbip-plus": ("fedbip", _PLUS),
    "fedbip-plus-l": ("fedbip-l", _PLUS),
}


class ConfigError(ValueError):
    """A run-config value that is not allowed (message: one line with key, value, allowed)."""


def _int(low: int, high: int | None = None) -> Callable[[str, Any], int]:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            bound = f"an integer ≥ {low}" if high is None else f"an integer in [{low}, {high}]"
            raise ConfigError(f"run-config key '{key}': value {value!r} is not allowed; expected {bound}")
        return value

    return check


def _float(low: float, *, low_open: bool, high: float | None = None, high_open: bool = True) -> Callable[[str, Any], float]:
    def check(key: str, value: Any) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (value > low if low_open else value >= low)
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            left = "(" if low_open else "["
            right = "inf)" if high is None else (f"{high})" if high_open else f"{high}]")
            raise ConfigError(f"run-config key '{key}': value {value!r} is not allowed; expected a number in {left}{low}, {right}")
        return float(value)

    return check


def _choice(allowed: tuple[str, ...] | Callable[[], tuple[str, ...]]) -> Callable[[str, Any], str]:
    def check(key: str, value: Any) -> str:
        options = allowed() if callable(allowed) else allowed
        if value not in options:
            raise ConfigError(f"run-config key '{key}': value {value!r} is not allowed; choose one of {', '.join(options)}")
        return value

    return check


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"run-config key '{key}': value {value!r} is not allowed; expected true or false")
    return value


def _text(*, empty_ok: bool) -> Callable[[str, Any], str]:
    def check(key: str, value: Any) -> str:
        if not isinstance(value, str) or (not empty_ok and not value.strip()):
            raise ConfigError(f"run-config key '{key}': value {value!r} is not allowed; expected a non-empty string")
        return value

    return check


def _name_list(key: str, value: Any) -> tuple[str, ...]:
    names = tuple(part.strip() for part in value.split(",")) if isinstance(value, str) else ()
    if not names or not all(names) or len(set(names)) != len(names):
        raise ConfigError(
            f"run-config key '{key}': value {value!r} is not allowed; expected distinct comma-separated names, e.g. 'q_proj,v_proj'"
        )
    return names


def _device(key: str, value: Any) -> str:
    if not isinstance(value, str) or re.fullmatch(r"auto|cpu|cuda(:\d+)?", value) is None:
        raise ConfigError(f"run-config key '{key}': value {value!r} is not allowed; expected auto, cpu, cuda or cuda:N")
    return value


def _data_sources() -> tuple[str, ...]:
    from fedbilevel.data import DATA_LOADERS

    return tuple(DATA_LOADERS)


def _strategy_names() -> tuple[str, ...]:
    from fedbilevel.strategies import (
        strategy_names,  # late: strategies import this module
    )

    return strategy_names()


# run-config key -> (RunConfig field, checker). Order = order in config.json.
SCHEMA: dict[str, tuple[str, Callable[[str, Any], Any]]] = {
    "strategy": ("strategy", _choice(_strategy_names)),
    "num-server-rounds": ("num_server_rounds", _int(1)),
    "seed": ("seed", _int(0)),
    "min-nodes": ("min_nodes", _int(1)),
    "round-timeout": ("round_timeout", _float(0.0, low_open=True)),
    "min-available-fraction": ("min_available_fraction", _float(0.0, low_open=True, high=1.0, high_open=False)),
    "model-name": ("model_name", _text(empty_ok=False)),
    "device": ("device", _device),
    "precision": ("precision", _choice(PRECISIONS)),
    "client-threads": ("client_threads", _int(0)),
    "lora-r": ("lora_r", _int(1)),
    "lora-alpha": ("lora_alpha", _int(1)),
    "lora-dropout": ("lora_dropout", _float(0.0, low_open=False, high=1.0)),
    "lora-target-modules": ("lora_target_modules", _name_list),
    "data": ("data", _choice(_data_sources)),
    "synthetic-tasks": ("synthetic_tasks", _name_list),
    "synthetic-instruction": ("synthetic_instruction", _choice(SYNTHETIC_INSTRUCTIONS)),
    "synthetic-split": ("synthetic_split", _choice(SYNTHETIC_SPLITS)),
    "synthetic-train-examples": ("synthetic_train_examples", _int(1)),
    "synthetic-test-examples": ("synthetic_test_examples", _int(1)),
    "data-path": ("data_path", _text(empty_ok=True)),
    "max-train-examples": ("max_train_examples", _int(0)),
    "max-test-examples": ("max_test_examples", _int(0)),
    "hub-dataset": ("hub_dataset", _text(empty_ok=True)),
    "hub-subset": ("hub_subset", _text(empty_ok=True)),
    "hub-train-split": ("hub_train_split", _text(empty_ok=False)),
    "hub-test-split": ("hub_test_split", _text(empty_ok=True)),
    "partitioner": ("partitioner", _choice(PARTITIONERS)),
    "partition-by": ("partition_by", _text(empty_ok=True)),
    "dirichlet-alpha": ("dirichlet_alpha", _float(0.0, low_open=True)),
    "instruction-column": ("instruction_column", _text(empty_ok=False)),
    "input-column": ("input_column", _text(empty_ok=True)),
    "output-column": ("output_column", _text(empty_ok=False)),
    "task-column": ("task_column", _text(empty_ok=True)),
    "image-column": ("image_column", _text(empty_ok=True)),
    "num-labels": ("num_labels", _int(0)),
    "label-column": ("label_column", _text(empty_ok=False)),
    "test-fraction": ("test_fraction", _float(0.0, low_open=True, high=1.0)),
    "local-steps": ("local_steps", _int(1)),
    "batch-size": ("batch_size", _int(1)),
    "learning-rate": ("learning_rate", _float(0.0, low_open=True)),
    "max-seq-len": ("max_seq_len", _int(8)),
    "eval-every": ("eval_every", _int(0)),
    "eval-batch-size": ("eval_batch_size", _int(1)),
    "eval-max-new-tokens": ("eval_max_new_tokens", _int(1)),
    "eval-option-scoring": ("eval_option_scoring", _bool),
    "eval-global": ("eval_global", _bool),
    "proximal-mu": ("proximal_mu", _float(0.0, low_open=False)),
    "fedamp-lambda": ("fedamp_lambda", _float(0.0, low_open=False)),
    "fedamp-sigma": ("fedamp_sigma", _float(0.0, low_open=False)),
    "fedamp-self-weight": ("fedamp_self_weight", _float(0.0, low_open=False, high=1.0, high_open=False)),
    "fedala-eta": ("fedala_eta", _float(0.0, low_open=True)),
    "fedala-data-fraction": ("fedala_data_fraction", _float(0.0, low_open=True, high=1.0, high_open=False)),
    "fedala-top-fraction": ("fedala_top_fraction", _float(0.0, low_open=True, high=1.0, high_open=False)),
    "fedala-start-epochs": ("fedala_start_epochs", _int(1)),
    "negative-cosine": ("negative_cosine", _choice(NEGATIVE_COSINE_MODES)),
    "task-vector": ("task_vector", _choice(TASK_VECTOR_MODES)),
    "layer-grouping": ("layer_grouping", _choice(LAYER_GROUPINGS)),
    "similarity-space": ("similarity_space", _choice(SIMILARITY_MODES)),
    "weighting": ("weighting", _choice(WEIGHTING_RULES)),
    "weighting-temperature": ("weighting_temperature", _float(0.0, low_open=True)),
    "weighting-power": ("weighting_power", _float(1.0, low_open=False)),
    "weighting-top-k": ("weighting_top_k", _int(1)),
    "weighting-threshold": ("weighting_threshold", _float(-1.0, low_open=False, high=1.0, high_open=False)),
    "weighting-z-temperature": ("weighting_z_temperature", _float(0.0, low_open=True)),
    "similarity-centering": ("similarity_centering", _choice(SIMILARITY_CENTERINGS)),
    "self-weight-floor": ("self_weight_floor", _float(0.0, low_open=False, high=1.0, high_open=False)),
    "similarity-ema": ("similarity_ema", _float(0.0, low_open=False, high=1.0)),
    "output-dir": ("output_dir", _text(empty_ok=False)),
    "run-name": ("run_name", _text(empty_ok=True)),
    "resume-from": ("resume_from", _text(empty_ok=True)),
}


# Keys a resumed run may change: how it runs, not what it computes.
RESUMABLE_KEYS = frozenset(
    {"num-server-rounds", "resume-from", "round-timeout", "min-nodes", "min-available-fraction", "device", "client-threads", "output-dir", "run-name"}
)


@dataclass(frozen=True)
class RunConfig:
    """The validated run config. Field docs: README.md, "Run-config keys"."""

    strategy: str
    num_server_rounds: int
    seed: int
    min_nodes: int
    round_timeout: float
    min_available_fraction: float
    model_name: str
    device: str
    precision: str
    client_threads: int
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_target_modules: tuple[str, ...]
    data: str
    synthetic_tasks: tuple[str, ...]
    synthetic_instruction: str
    synthetic_split: str
    synthetic_train_examples: int
    synthetic_test_examples: int
    data_path: str
    max_train_examples: int
    max_test_examples: int
    hub_dataset: str
    hub_subset: str
    hub_train_split: str
    hub_test_split: str
    partitioner: str
    partition_by: str
    dirichlet_alpha: float
    instruction_column: str
    input_column: str
    output_column: str
    task_column: str
    image_column: str
    num_labels: int
    label_column: str
    test_fraction: float
    local_steps: int
    batch_size: int
    learning_rate: float
    max_seq_len: int
    eval_every: int
    eval_batch_size: int
    eval_max_new_tokens: int
    eval_option_scoring: bool
    eval_global: bool
    proximal_mu: float
    fedamp_lambda: float
    fedamp_sigma: float
    fedamp_self_weight: float
    fedala_eta: float
    fedala_data_fraction: float
    fedala_top_fraction: float
    fedala_start_epochs: int
    negative_cosine: str
    task_vector: str
    layer_grouping: str
    similarity_space: str
    weighting: str
    weighting_temperature: float
    weighting_power: float
    weighting_top_k: int
    weighting_threshold: float
    weighting_z_temperature: float
    similarity_centering: str
    self_weight_floor: float
    similarity_ema: float
    output_dir: str
    run_name: str
    resume_from: str

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> RunConfig:
        """Validate Flower's flat run config (plus optional overrides) into a RunConfig."""
        merged = {**run_config, **(overrides or {})}
        unknown = sorted(set(merged) - set(SCHEMA))
        if unknown:
            raise ConfigError(f"run-config key '{unknown[0]}': unknown key; known keys: {', '.join(SCHEMA)}")
        missing = [key for key in SCHEMA if key not in merged]
        if missing:
            raise ConfigError(f"run-config key '{missing[0]}': missing; add it to [tool.flwr.app.config] in pyproject.toml")
        values = {field: check(key, merged[key]) for key, (field, check) in SCHEMA.items()}
        _apply_preset(values)
        for source, key, field in (("flan-json", "data-path", "data_path"), ("hub", "hub-dataset", "hub_dataset")):
            if values["data"] == source and not values[field]:
                raise ConfigError(f"run-config key '{key}': value '' is not allowed with data='{source}'; name the {'folder' if source == 'flan-json' else 'dataset'}")
        if values["data"] == "hub" and values["partitioner"] != "iid" and not values["partition_by"]:
            raise ConfigError(f"run-config key 'partition-by': value '' is not allowed with partitioner='{values['partitioner']}'; name the column")
        if values["data"] == "synthetic" and values["synthetic_split"] == "iid" and values["synthetic_instruction"] != "per-task":
            raise ConfigError(
                "run-config key 'synthetic-split': value 'iid' is not allowed with synthetic-instruction='shared'; "
                "use 'per-task' (with one instruction for all tasks they cannot be told apart)"
            )
        if values["negative_cosine"] == "keep" and values["weighting"] != "paper":
            raise ConfigError(
                f"run-config key 'negative-cosine': value 'keep' is not allowed with weighting={values['weighting']!r}; "
                "only weighting='paper' keeps negative cosines"
            )
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        """Back to the flat kebab-case mapping (what config.json stores and run-config accepts)."""
        out: dict[str, Any] = {}
        for key, (field, _) in SCHEMA.items():
            value = getattr(self, field)
            out[key] = ",".join(value) if isinstance(value, tuple) else value
        return out

    @property
    def bf16_compute(self) -> bool:
        """Whether forward passes run under bf16 autocast (every precision but ``fp32``)."""
        return self.precision != "fp32"

    def evaluates_in_round(self, server_round: int) -> bool:
        """Evaluate every ``eval-every`` rounds, and always after the last round."""
        if server_round == self.num_server_rounds:
            return True
        return self.eval_every > 0 and server_round % self.eval_every == 0


def _apply_preset(values: dict[str, Any]) -> None:
    """Set a preset strategy's weighting keys in ``values`` (RunConfig fields), refusing other choices.

    A key may be left at the paper's value (it is then replaced) or set to the preset's own;
    anything else would be silently overridden, so it is an error.
    """
    if values["strategy"] not in FEDBIP_PRESETS:
        return
    base, preset = FEDBIP_PRESETS[values["strategy"]]
    for key, value in preset.items():
        field = SCHEMA[key][0]
        if values[field] != value and values[field] != PAPER_WEIGHTING[key]:
            raise ConfigError(
                f"run-config key '{key}': value {values[field]!r} is not allowed with strategy='{values['strategy']}', "
                f"which sets {key}={value!r}; use strategy='{base}' to choose the weighting yourself"
            )
        values[field] = value


def resolve_user_path(path: str) -> Path:
    """A path from the run config: relative ones are taken relative to ``$FEDBILEVEL_OUTPUT_ROOT``
    when set (scripts/flwr_run.sh sets it to the project folder: under ``flwr run`` the apps run
    from a copy of the project elsewhere), else to the working directory."""
    return (Path(os.environ.get("FEDBILEVEL_OUTPUT_ROOT", ".")) / Path(path).expanduser()).resolve()


def load_app_config(pyproject: str | Path = "pyproject.toml") -> dict[str, Any]:
    """The default run config of a Flower app (``[tool.flwr.app.config]``), e.g. for ``run_simulation``.

    ``flwr run`` reads this table itself; Flower's ``run_simulation`` passes no run config,
    so scripts and tests load the defaults here and apply overrides on top.
    """
    with open(pyproject, "rb") as handle:
        return dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])


assert [f.name for f in fields(RunConfig)] == [field for field, _ in SCHEMA.values()], "SCHEMA and RunConfig disagree"
