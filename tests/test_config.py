"""Run-config schema: pyproject defaults agree with it, bad values fail in one clear line."""

import tomllib
from pathlib import Path

import pytest

from fedbilevel.config import SCHEMA, ConfigError, RunConfig, load_app_config, resolve

DEFAULTS = load_app_config(Path(__file__).resolve().parents[1] / "pyproject.toml")


def test_pyproject_defaults_cover_the_schema_and_round_trip():
    assert list(DEFAULTS) == list(SCHEMA)
    config = RunConfig.from_run_config(DEFAULTS)
    assert config.to_run_config() == DEFAULTS
    assert (
        config.strategy == "fedbip"
        and config.fedbip.weighting.negative == "clip"
        and config.fedbip.task_vector == "round"
    )


def test_overrides_win():
    config = RunConfig.from_run_config(DEFAULTS, {"strategy": "fedbip-l", "lora-target-modules": "q_proj, v_proj"})
    assert config.strategy == "fedbip-l"
    assert config.lora.target_modules == ("q_proj", "v_proj")


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("strategy", "fedfoo", "choose one of fedbip, fedbip-l, local, fedavg, fedprox"),
        ("proximal-mu", -0.5, "expected a number in [0.0, inf)"),
        ("num-server-rounds", 0, "expected an integer ≥ 1"),
        ("num-server-rounds", True, "expected an integer ≥ 1"),
        ("lora-r", 2.5, "expected an integer ≥ 1"),
        ("learning-rate", -0.1, "expected a number in (0.0, inf)"),
        ("learning-rate", float("nan"), "expected a number in (0.0, inf)"),
        ("lora-dropout", 1.0, "expected a number in [0.0, 1.0)"),
        ("negative-cosine", "abs", "choose one of clip, keep"),
        ("task-vector", "global", "choose one of round, cumulative"),
        ("layer-grouping", "head", "choose one of array, block"),
        ("similarity-space", "dense", "choose one of flat, lora-product"),
        ("device", "tpu", "expected auto, cpu, cuda or cuda:N"),
        ("precision", "fp8", "choose one of fp32, bf16-autocast, bf16, 4bit"),
        ("data", "imagenet", "choose one of synthetic"),
        ("synthetic-instruction", "mixed", "choose one of shared, per-task"),
        ("lora-target-modules", "q_proj,,v_proj", "expected distinct comma-separated names"),
        ("lora-target-modules", "q_proj,q_proj", "expected distinct comma-separated names"),
        ("model-name", " ", "expected a non-empty string"),
    ],
)
def test_bad_value_fails_in_one_line_naming_key_value_and_allowed(key, value, allowed):
    with pytest.raises(ConfigError) as caught:
        RunConfig.from_run_config(DEFAULTS, {key: value})
    message = str(caught.value)
    assert "\n" not in message
    assert f"'{key}'" in message and repr(value) in message and allowed in message


def test_unknown_and_missing_keys():
    with pytest.raises(ConfigError, match="run-config key 'lora-rank': unknown key; known keys: strategy"):
        RunConfig.from_run_config(DEFAULTS, {"lora-rank": 4})
    partial = {k: v for k, v in DEFAULTS.items() if k != "seed"}
    with pytest.raises(ConfigError, match="run-config key 'seed': missing"):
        RunConfig.from_run_config(partial)


def test_evaluation_schedule():
    every_two = RunConfig.from_run_config(DEFAULTS, {"num-server-rounds": 5, "eval-every": 2})
    assert [r for r in range(1, 6) if every_two.evaluates_in_round(r)] == [2, 4, 5]
    final_only = RunConfig.from_run_config(DEFAULTS, {"num-server-rounds": 3, "eval-every": 0})
    assert [r for r in range(1, 4) if final_only.evaluates_in_round(r)] == [3]


def _shipped_run_configs():
    """Every run config under conf/: whole files, and each [label] table of a variants file."""
    for path in sorted((Path(__file__).resolve().parents[1] / "conf").glob("*.toml")):
        tables = tomllib.loads(path.read_text())
        if any(isinstance(value, dict) for value in tables.values()):
            yield from (pytest.param(values, id=f"{path.name}[{label}]") for label, values in tables.items())
        else:
            yield pytest.param(tables, id=path.name)


@pytest.mark.parametrize("written", list(_shipped_run_configs()))
def test_every_shipped_run_config_resolves_as_written(written):
    resolved = resolve(written)
    assert {key: resolved[key] for key in written} == written
