"""Run the app in Flower's in-process simulation, without a SuperLink.

``flwr run .`` (README) is the way to run the app; this entry point serves scripts and
tests that need many runs from one environment with run-config overrides:

    python -m fedbilevel.simulation --num-supernodes 8 --set strategy=fedamp --set seed=1

Values use ``flwr run --run-config`` syntax (TOML literals; a bare word is a string).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.simulation import run_simulation

from fedbilevel.client.app import make_client_app
from fedbilevel.config import ConfigError, RunConfig, parse_assignment, resolve
from fedbilevel.server import make_server_app


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
    faulty_clients: Sequence[int] = (),
    faulty_scale: float = 10.0,
    absent_clients: Sequence[int] = (),
) -> None:
    """One run of the fedbilevel ServerApp and ClientApp in Flower's simulation engine.

    ``faulty_clients`` send scaled random updates instead of their trained adapters and
    ``absent_clients`` fail every round (:func:`fault_harness`), for robustness experiments.
    """
    corrupt = fault_harness(
        run_config, faulty_clients=faulty_clients, faulty_scale=faulty_scale, absent_clients=absent_clients
    )
    run_simulation(
        server_app=make_server_app(run_config),
        client_app=make_client_app(run_config, corrupt=corrupt),
        num_supernodes=num_supernodes,
        backend_config={"client_resources": {"num_cpus": cpus_per_client}},
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-supernodes", type=int, default=8, help="simulated clients (default: 8)")
    parser.add_argument("--cpus-per-client", type=float, default=1.0, help="Ray CPUs per client (default: 1)")
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
    if args.config_json:
        config = json.loads(Path(args.config_json).read_text())
        RunConfig.from_run_config(config)
    else:
        config = resolve(dict(parse_assignment(a) for a in args.set), args.run_config)
    try:
        simulate(
            config,
            num_supernodes=args.num_supernodes,
            cpus_per_client=args.cpus_per_client,
            faulty_clients=faulty,
            faulty_scale=args.faulty_scale,
            absent_clients=absent,
        )
    except ConfigError as error:
        parser.error(str(error))


def _partition_ids(parser: argparse.ArgumentParser, option: str, text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        parser.error(f"{option}: {text!r} is not allowed; expected comma-separated partition ids")


if __name__ == "__main__":
    main()
