"""Run the app in Flower's simulation runtime: ``flwr run`` against a private SuperLink.

``flwr run .`` (README) is the way to run the app; this entry point serves scripts and
tests that need many runs from one environment with run-config overrides:

    python -m fedbilevel.simulation --num-supernodes 8 --set strategy=fedamp --set seed=1

Values use ``flwr run --run-config`` syntax (TOML literals; a bare word is a string).

The simulation path: Flower 1.42 marks ``flwr.simulation.run_simulation`` (the in-process
call this module used) deprecated and due for removal, and names ``flwr run`` as its
replacement. Its only other entry points need a SuperLink too (``flwr-simulation``, which a
SuperLink started with ``--simulation`` launches per run) or are private (``_run_simulation``).
So :func:`simulate` does what scripts/flwr_run.sh does for ``make run``: it starts a private
SuperLink in simulation mode on a free local port, with runtime dependency installation off
(the app runs in this environment; nothing is fetched) and its own ``FLWR_HOME`` in a
temporary folder; submits the app with ``flwr run`` (the complete run config as a TOML file,
the federation's size and resources as ``--federation-config``), streams the run's log,
asks the SuperLink how the run ended, raises with its reason unless it completed, and stops
the SuperLink and its processes. That costs a few seconds per run (a SuperLink start and
two ``flwr`` commands) and gives every run fresh server and client processes, as in
``make run``. ``RAY_ADDRESS`` in the environment attaches the run to an existing Ray cluster
(README, "Simulation on a Ray cluster").

The robustness harnesses (``--faulty-clients``, ``--absent-clients``) need a ClientApp that
the app's own entry point does not build; with them the run submits a generated app (the
project's pyproject.toml, its ClientApp from :func:`harness_client_app`), which imports this
environment's fedbilevel.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import tomli_w
from flwr.clientapp import ClientApp

from fedbilevel.client.app import make_client_app
from fedbilevel.config import PYPROJECT, ConfigError, RunConfig, parse_assignment, resolve
from fedbilevel.federation import federation

BIN = Path(sys.executable).parent  # flower-superlink and flwr of this environment
CONNECTION = "fedbilevel-simulation"  # the SuperLink connection's name in the private FLWR_HOME
OPTIONS = {
    "num_supernodes": "--num-supernodes",
    "cpus_per_client": "--cpus-per-client",
    "gpus_per_client": "--gpus-per-client",
}


def random_updates(partitions: Sequence[int], scale: float, seed: int):
    """A faulty-client harness: the listed clients send θ̄ + a random direction of ``scale``× their real update's norm.

    The direction is drawn per client and round from ``seed``, so runs are reproducible.
    """
    faulty = set(partitions)

    def corrupt(partition_id: int, server_round: int, received: dict, trained: dict) -> dict:
        if partition_id not in faulty:
            return trained
        rng = np.random.default_rng([seed, partition_id, server_round])
        noise = {name: rng.standard_normal(array.shape) for name, array in received.items()}
        update_norm = np.sqrt(sum(float(np.sum((trained[n].astype(np.float64) - received[n]) ** 2)) for n in received))
        noise_norm = np.sqrt(sum(float(np.sum(v**2)) for v in noise.values()))
        factor = scale * update_norm / noise_norm
        return {name: (received[name] + factor * noise[name]).astype(received[name].dtype) for name in received}

    return corrupt


def fault_harness(
    run_config: Mapping[str, Any],
    *,
    faulty_clients: Sequence[int] = (),
    faulty_scale: float = 10.0,
    absent_clients: Sequence[int] = (),
):
    """The update corruption for :func:`simulate`, or ``None`` when every client is honest.

    ``faulty_clients`` send scaled random updates (:func:`random_updates`); ``absent_clients``
    fail every training round (they raise, so the server records a failure and keeps their
    adapters), which is the reference a faulty client's damage is measured against.
    """
    both = set(faulty_clients) & set(absent_clients)
    if both:
        raise ConfigError(f"clients {sorted(both)} are both faulty and absent; a client can be only one")
    if not faulty_clients and not absent_clients:
        return None
    randomize = random_updates(faulty_clients, faulty_scale, int(run_config["seed"]))
    absent = set(absent_clients)

    def corrupt(partition_id: int, server_round: int, received: dict, trained: dict) -> dict:
        if partition_id in absent:
            raise RuntimeError(
                f"client {partition_id} is absent (test harness --absent-clients): no update in round {server_round}"
            )
        return randomize(partition_id, server_round, received, trained)

    return corrupt


def simulate(
    run_config: Mapping[str, Any],
    *,
    num_supernodes: int,
    cpus_per_client: float = 1.0,
    gpus_per_client: float = 0.0,
    faulty_clients: Sequence[int] = (),
    faulty_scale: float = 10.0,
    absent_clients: Sequence[int] = (),
) -> None:
    """One run of the fedbilevel app in Flower's simulation runtime (``flwr run``, module docstring).

    ``run_config`` is the complete run config (e.g. :func:`~fedbilevel.config.resolve`'s);
    ``cpus_per_client`` (whole) and ``gpus_per_client`` (a share: 0.5 puts two clients on a
    GPU) are what Ray reserves for each simulated client (:mod:`fedbilevel.federation`).
    ``faulty_clients`` send scaled random updates instead of their trained adapters and
    ``absent_clients`` fail every round (:func:`fault_harness`), for robustness experiments.
    Bad arguments raise :class:`~fedbilevel.config.ConfigError` before anything starts; a run
    that does not complete raises ``RuntimeError`` with Flower's reason (e.g. the ServerApp's error).
    """
    RunConfig.from_run_config(run_config)  # fail here, with the key named, not inside the run
    resources = federation(num_supernodes, cpus_per_client, gpus_per_client, names=OPTIONS)
    harness = {
        "faulty_clients": list(faulty_clients),
        "faulty_scale": faulty_scale,
        "absent_clients": list(absent_clients),
    }
    with_harness = fault_harness(run_config, **harness) is not None  # checks the harness too
    # The run's processes may still be leaving when the SuperLink has stopped: cleaning up is best effort.
    with tempfile.TemporaryDirectory(prefix="fedbilevel-simulation-", ignore_cleanup_errors=True) as folder:
        home = Path(folder)
        app = _harness_app(home / "app", {"seed": run_config["seed"], **harness}) if with_harness else PYPROJECT.parent
        (home / "run-config.toml").write_text(tomli_w.dumps(dict(run_config)))
        env = {
            **os.environ,
            "FLWR_HOME": str(home),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the SuperLink starts flower-superexec by name
            # Relative paths in the run config mean what they meant in this process.
            "FEDBILEVEL_OUTPUT_ROOT": os.environ.get("FEDBILEVEL_OUTPUT_ROOT", os.getcwd()),
        }
        with _superlink(home, env):
            command = [str(BIN / "flwr"), "run", str(app), CONNECTION, "--stream"]
            command += ["--run-config", str(home / "run-config.toml"), "--federation-config", resources.config()]
            submitted = subprocess.run(command, env=env)
            if submitted.returncode != 0:
                raise RuntimeError(f"flwr run exited with code {submitted.returncode} (its error is above)")
            _check_completed(env)


def harness_client_app(arguments: str) -> ClientApp:
    """The ClientApp with :func:`fault_harness`, for the generated harness app.

    ``arguments``: JSON of ``seed``, ``faulty_clients``, ``faulty_scale``, ``absent_clients``.
    """
    values = json.loads(arguments)
    return make_client_app(corrupt=fault_harness({"seed": values.pop("seed")}, **values))


def _harness_app(folder: Path, arguments: Mapping[str, Any]) -> Path:
    """An app folder: the project's pyproject.toml (name, run-config keys), the ClientApp :func:`harness_client_app`."""
    with open(PYPROJECT, "rb") as handle:
        project = tomllib.load(handle)
    project["project"].pop("readme", None)  # the folder holds no README
    project["tool"]["flwr"]["app"]["components"] = {
        "serverapp": "harness_app:server_app",
        "clientapp": "harness_app:client_app",
    }
    folder.mkdir()
    (folder / "pyproject.toml").write_text(tomli_w.dumps(project))
    (folder / "harness_app.py").write_text(
        '"""Generated by fedbilevel.simulation: the app with a robustness harness on its clients."""\n\n'
        "from fedbilevel.server import make_server_app\n"
        "from fedbilevel.simulation import harness_client_app\n\n"
        "server_app = make_server_app()\n"
        f"client_app = harness_client_app({json.dumps(dict(arguments))!r})\n"
    )
    return folder


@contextlib.contextmanager
def _superlink(home: Path, env: Mapping[str, str]) -> Iterator[None]:
    """A SuperLink in simulation mode on a free local port, named :data:`CONNECTION` in ``home``'s
    config.toml; stopped on exit (its process group), and the processes it started for the run
    (flower-superexec, flwr-simulation, Ray) exit with it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    connection = {"address": f"127.0.0.1:{port}", "insecure": True}
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}}))
    log = home / "superlink.log"
    command = [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--disable-runtime-dependency-installation"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-file", str(log)]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.time() + 120
        while not _healthy(port):
            if process.poll() is not None or time.time() > deadline:
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise RuntimeError(f"the SuperLink on port {port} did not start:\n{tail}")
            time.sleep(0.5)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).is_success
    except httpx.HTTPError:
        return False


def _check_completed(env: Mapping[str, str]) -> None:
    """Raise unless the run completed: ``flwr run --stream`` exits 0 whatever the ServerApp did.

    Waits for the run to finish should the log stream have ended before it.
    """
    while True:
        listing = subprocess.run(
            [str(BIN / "flwr"), "ls", CONNECTION, "--format", "json"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        (run,) = json.loads(listing.stdout)["runs"]  # the SuperLink is private: one run
        if run["status"].startswith("finished"):
            break
        time.sleep(2)
    if run["status"] != "finished:completed":
        details = " ".join(str(run.get("status-details") or "no details").split())
        raise RuntimeError(f"run {run['run-id']} ended {run['status']}: {details}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-supernodes", type=int, default=8, help="simulated clients (default: 8)")
    parser.add_argument("--cpus-per-client", type=float, default=1.0, help="Ray CPUs per client (default: 1)")
    parser.add_argument(
        "--gpus-per-client",
        type=float,
        default=0.0,
        help="GPU share per client: 0.5 runs two clients on each GPU (default: 0)",
    )
    parser.add_argument(
        "--run-config",
        action="append",
        default=[],
        metavar="FILE.toml",
        help="run-config file(s), e.g. conf/smoke.toml",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="run-config override (repeatable)"
    )
    parser.add_argument("--config-json", help="the complete run config as a JSON file (what scripts/compare.py passes)")
    parser.add_argument(
        "--faulty-clients",
        default="",
        metavar="IDS",
        help="robustness experiments: comma-separated partition ids "
        "that send random updates instead of their trained adapters",
    )
    parser.add_argument(
        "--faulty-scale",
        type=float,
        default=10.0,
        help="norm of a faulty update, in multiples of the real one's (default: 10)",
    )
    parser.add_argument(
        "--absent-clients",
        default="",
        metavar="IDS",
        help="robustness experiments: comma-separated partition ids "
        "that fail every training round (the reference for --faulty-clients)",
    )
    args = parser.parse_args(argv)
    faulty = _partition_ids(parser, "--faulty-clients", args.faulty_clients)
    absent = _partition_ids(parser, "--absent-clients", args.absent_clients)
    try:
        if args.config_json:
            config = json.loads(Path(args.config_json).read_text())
        else:
            config = resolve(dict(parse_assignment(a) for a in args.set), args.run_config)
        simulate(
            config,
            num_supernodes=args.num_supernodes,
            cpus_per_client=args.cpus_per_client,
            gpus_per_client=args.gpus_per_client,
            faulty_clients=faulty,
            faulty_scale=args.faulty_scale,
            absent_clients=absent,
        )
    except ConfigError as error:
        parser.error(str(error))
    except RuntimeError as error:
        sys.exit(f"fedbilevel: {error}")  # the reason last, after the run's log


def _partition_ids(parser: argparse.ArgumentParser, option: str, text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        parser.error(f"{option}: {text!r} is not allowed; expected comma-separated partition ids")


if __name__ == "__main__":
    # A terminated simulation stops its SuperLink too (simulate's clean-up runs on SystemExit).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    main()
