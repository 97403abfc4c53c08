"""A GPU share per simulated client: checked before anything starts, and what Flower's Ray backend reserves.

This machine may have no GPU, so the share is followed as far as it goes here: through Flower's
own parsing into its backend config, and into a run on a Ray cluster that declares a GPU
(Flower attaches to it through RAY_ADDRESS, as on a cluster of GPU machines).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import warnings
from pathlib import Path

import pytest
import ray
import torch
from flwr.cli.run.run import _parse_federation_config_overrides
from flwr.cli.typing import SuperLinkConnection
from flwr.simulation.app import _run_simulation_settings

from fedbilevel.config import ConfigError, load_app_config
from fedbilevel.federation import Federation, federation
from fedbilevel.models.zoo import TINY_MODEL
from fedbilevel.simulation import OPTIONS, main, simulate

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = pytest.mark.skipif(torch.cuda.device_count() > 0, reason="this machine has a GPU")


def test_the_share_reaches_flowers_backend_config():
    """The federation config goes through `flwr run`'s parser and flwr-simulation's settings, as in a run."""
    config = Federation(num_supernodes=8, cpus_per_client=1, gpus_per_client=0.5).config()
    parsed = _parse_federation_config_overrides(
        [config], SuperLinkConnection(name="local", address="127.0.0.1:9093", insecure=True)
    )
    num_supernodes, backend, backend_config, _, _ = _run_simulation_settings(parsed)
    assert (num_supernodes, backend) == (8, "ray")
    assert backend_config["client_resources"] == {"num_cpus": 1, "num_gpus": 0.5}


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("num_supernodes", 0, "expected a whole number of clients"),
        ("cpus_per_client", 0.5, "expected a whole number of CPUs"),
        ("gpus_per_client", -0.5, r"expected a share in \[0, 1\] or a whole number of GPUs"),
        ("gpus_per_client", 1.5, r"expected a share in \[0, 1\] or a whole number of GPUs"),
        ("gpus_per_client", "half", "expected a number"),
        ("gpus_per_client", "nan", "expected a number"),
    ],
)
def test_bad_values_fail_in_one_line_naming_the_option(field, value, expected):
    values = {"num_supernodes": 2, "cpus_per_client": 1, "gpus_per_client": 0, field: value}
    with pytest.raises(ConfigError, match=rf"^{OPTIONS[field]}: value {value!r} is not allowed; {expected}"):
        federation(**values, names=OPTIONS)


@NO_GPU
def test_a_share_without_a_gpu_is_refused_unless_a_ray_cluster_is_named(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match=r"^--gpus-per-client: value 0\.5 is not allowed; no GPU is visible here"):
        federation(2, 1, 0.5, names=OPTIONS)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # the cluster's GPUs are not this machine's
    assert federation(2, 1, 0.5, names=OPTIONS).gpus_per_client == 0.5


@NO_GPU
def test_flwr_run_script_refuses_a_share_without_a_gpu_in_one_line_before_starting(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    with socket.socket() as sock:  # should the check fail to stop it, the SuperLink would not clash
        sock.bind(("127.0.0.1", 0))
        env["FEDBILEVEL_SUPERLINK_PORT"] = str(sock.getsockname()[1])
    env["FEDBILEVEL_GPUS_PER_CLIENT"] = "0.5"
    result = subprocess.run(
        [str(ROOT / "scripts" / "flwr_run.sh")], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "fedbilevel: FEDBILEVEL_GPUS_PER_CLIENT: value '0.5' is not allowed; no GPU is visible here: "
        "expected 0, or RAY_ADDRESS set to a Ray cluster with GPUs"
    ]


@NO_GPU
def test_simulation_cli_refuses_a_share_without_a_gpu(monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(SystemExit) as stopped:
        main(["--gpus-per-client", "0.5", "--run-config", str(ROOT / "conf" / "smoke.toml")])
    assert stopped.value.code == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .endswith(
            "error: --gpus-per-client: value 0.5 is not allowed; no GPU is visible here: "
            "expected 0, or RAY_ADDRESS set to a Ray cluster with GPUs"
        )
    )


@pytest.fixture
def ray_cluster_with_one_gpu(monkeypatch):
    """A Ray cluster declaring 1 GPU (a logical resource: it needs no real one), named by RAY_ADDRESS."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # Ray's accelerator tip
        ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    monkeypatch.setenv("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    yield
    ray.shutdown()


def test_a_simulation_attaches_to_a_ray_cluster_and_reserves_the_share(ray_cluster_with_one_gpu, tmp_path, capfd):
    config = {
        **load_app_config(ROOT / "pyproject.toml"),
        "model-name": TINY_MODEL,
        "num-server-rounds": 1,
        "local-steps": 1,
        "synthetic-train-examples": 8,
        "synthetic-test-examples": 4,
        "eval-max-new-tokens": 2,
        "output-dir": str(tmp_path),
        "run-name": "whole-gpu",
        "log-level": "verbose",  # the clients' own lines, which Ray prefixes with their worker
    }
    # A whole GPU per client on the cluster's 2 CPUs and 1 GPU: one worker, which serves both clients in turn
    # (without the share, Flower would start one worker per CPU).
    simulate(config, num_supernodes=2, gpus_per_client=1)
    results = json.loads((tmp_path / "whole-gpu" / "results.json").read_text())
    assert set(results["rounds"][0]["train"]) == {"0", "1"}, results["rounds"][0]["failures"]
    workers = set(re.findall(r"\(ClientAppActor pid=(\d+)\)", "".join(capfd.readouterr())))
    assert len(workers) == 1, workers
