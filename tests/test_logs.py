"""log-level: every line once, library noise off unless asked for (fedbilevel.logs)."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import datasets
import pytest
import ray
from flwr.supercore import log
from flwr.supercore.logger import ConsoleHandler
from transformers.utils import logging as transformers_logging

from fedbilevel import logs
from fedbilevel.config import SCHEMA, ConfigError, load_app_config
from fedbilevel.models.zoo import TINY_MODEL
from fedbilevel.simulation import simulate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def libraries_as_found():
    """configure() sets process-wide state; `verbose` is the libraries' own defaults and Flower's INFO."""
    with warnings.catch_warnings():
        yield
    logs.configure("verbose", client=False)
    for name in logs.OWN_HANDLERS:
        logging.getLogger(name).propagate = True


@pytest.fixture
def console(monkeypatch):
    """What Flower's console handler prints, from Flower's logger as it is at import: another test in this
    worker process may have left it disabled or raised (e.g. a logging.config call, which disables loggers)."""
    flower = logging.getLogger("flwr")
    monkeypatch.setattr(flower, "disabled", False)
    monkeypatch.setattr(flower, "level", logging.DEBUG)
    monkeypatch.setattr(logging.root.manager, "disable", logging.NOTSET)
    (handler,) = [handler for handler in flower.handlers if isinstance(handler, ConsoleHandler)]
    monkeypatch.setattr(handler, "stream", io.StringIO())
    return handler.stream


def test_the_levels_are_the_declared_choices():
    check = SCHEMA["log-level"].metadata["check"]
    assert SCHEMA["log-level"].default == "info"
    assert [check("log-level", level) for level in logs.LIBRARY_LEVELS] == ["info", "verbose", "debug"]
    with pytest.raises(ConfigError, match=r"run-config key 'log-level': value 'loud' is not allowed"):
        check("log-level", "loud")


def test_info_silences_library_warnings_log_lines_and_progress_bars_and_verbose_brings_them_back():
    def shown() -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn("Tip: in future versions of Ray ...", FutureWarning, stacklevel=1)
            warnings.warn("`torch_dtype` is deprecated", DeprecationWarning, stacklevel=1)
            warnings.warn_explicit("a library's own remark", UserWarning, "modeling.py", 1, "transformers.modeling")
            warnings.warn("an application's warning", UserWarning, stacklevel=1)
        return [str(warning.message) for warning in caught]

    warnings.simplefilter("always")  # every warning would show but for configure's filters
    logs.configure("info", client=False)
    logs.configure("info", client=False)  # a client applies it per message: nothing piles up
    assert shown() == ["an application's warning"]
    assert transformers_logging.get_verbosity() == logging.ERROR
    assert not transformers_logging.is_progress_bar_enabled() and not datasets.is_progress_bar_enabled()
    logs.configure("verbose", client=False)
    assert len(shown()) == 4
    assert transformers_logging.get_verbosity() == logging.WARNING
    assert transformers_logging.is_progress_bar_enabled() and datasets.is_progress_bar_enabled()
    logs.configure("debug", client=False)
    assert transformers_logging.get_verbosity() == logging.DEBUG


def test_a_library_that_configures_the_root_logger_doubles_no_line(console):
    printed_by_root = io.StringIO()
    library_handler = logging.StreamHandler(printed_by_root)  # what opacus' import-time logging.basicConfig adds
    logging.getLogger().addHandler(library_handler)
    try:
        logs.configure("info", client=False)
        log(logging.INFO, "round 1: client 0 (reverse) trained on 16 examples, loss 0.4812")
        logging.getLogger("peft.tuners").warning("a library's remark")
        assert console.getvalue().count("client 0 (reverse)") == 1 and printed_by_root.getvalue() == ""
        logs.configure("verbose", client=False)
        logging.getLogger("peft.tuners").warning("a library's remark")
        assert printed_by_root.getvalue() == "a library's remark\n"
    finally:
        logging.getLogger().removeHandler(library_handler)


def test_a_simulated_client_keeps_only_its_warnings_and_errors_at_info(monkeypatch, console):
    def printed(level: int) -> bool:
        console.seek(0)
        console.truncate()
        log(level, "client 0 (reverse), round 1: 10 steps")
        return "client 0 (reverse)" in console.getvalue()

    logs.configure("info", client=True)  # a deployed SuperNode's ClientApp: its console is its own
    assert printed(logging.INFO)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # a Ray worker: Flower's simulation runtime
    logs.configure("info", client=True)
    assert not printed(logging.INFO) and printed(logging.WARNING)
    logs.configure("info", client=False)  # the server, in the same process as Ray's driver, keeps its report
    assert printed(logging.INFO)
    logs.configure("verbose", client=True)
    assert printed(logging.INFO) and not printed(logging.DEBUG)
    logs.configure("debug", client=True)
    assert printed(logging.DEBUG)


def test_a_simulation_logs_each_client_line_once_without_library_noise(tmp_path, capfd):
    config = {
        **load_app_config(ROOT / "pyproject.toml"),
        "model-name": TINY_MODEL,  # the smoke run's model (conf/smoke.toml), a shorter run
        "num-server-rounds": 2,
        "local-steps": 2,
        "synthetic-tasks": "reverse,uppercase",
        "synthetic-train-examples": 8,
        "synthetic-test-examples": 4,
        "eval-max-new-tokens": 2,
        "output-dir": str(tmp_path),
        "run-name": "quiet",
    }
    simulate(config, num_supernodes=2)
    lines = "".join(capfd.readouterr()).splitlines()
    for server_round in (1, 2):
        for client in ("client 0 (reverse)", "client 1 (uppercase)"):
            reports = [
                line
                for line in lines
                if client in line and f"round {server_round}" in line and ("trained" in line or "steps" in line)
            ]
            assert len(reports) == 1, reports
    for noise in ("Warning:", "Loading weights", "%|"):
        assert not [line for line in lines if noise in line], noise
    assert any("round 2/2 done" in line for line in lines) and any(
        "final personalized scores" in line for line in lines
    )
