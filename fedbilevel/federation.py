"""The simulated federation: its size and each client's CPUs and GPU share, as Flower's federation config.

One definition for both ways of simulating the app: ``python -m fedbilevel.simulation``
(``--num-supernodes``, ``--cpus-per-client``, ``--gpus-per-client``) and
scripts/flwr_run.sh, which runs ``python -m fedbilevel.federation`` to turn its environment
variables (:data:`ENVIRONMENT`) into ``flwr run --federation-config``. A bad value fails
before anything starts, with one line naming the option or variable, the value and what is
allowed.

A GPU share is what Flower's Ray backend reserves for each simulated client
(``client-resources-num-gpus``): 0.5 runs two clients on each GPU, and Ray points each
client's ``CUDA_VISIBLE_DEVICES`` at its GPU, so ``device = "auto"`` trains there. A share
above 1 must be whole (Ray's rule). A share needs GPUs: on this machine (as many as torch
sees), or, with ``RAY_ADDRESS`` set, in the existing Ray cluster that Flower attaches to,
whose GPUs this machine cannot see (Flower then stops with "ActorPool is empty" if no client
fits on any of its machines).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedbilevel.options import ConfigError

# Field -> (environment variable of scripts/flwr_run.sh, its default).
ENVIRONMENT = {
    "num_supernodes": ("FEDBILEVEL_NUM_SUPERNODES", "8"),
    "cpus_per_client": ("FEDBILEVEL_CPUS_PER_CLIENT", "1"),
    "gpus_per_client": ("FEDBILEVEL_GPUS_PER_CLIENT", "0"),
}


@dataclass(frozen=True)
class Federation:
    """A checked simulated federation (build it with :func:`federation`)."""

    num_supernodes: int
    cpus_per_client: int
    gpus_per_client: float

    def config(self) -> str:
        """The value of ``flwr run --federation-config`` (Flower turns it into its Ray backend config)."""
        return (
            f"num-supernodes={self.num_supernodes} client-resources-num-cpus={self.cpus_per_client} "
            f"client-resources-num-gpus={self.gpus_per_client}"
        )


def federation(
    num_supernodes: Any, cpus_per_client: Any, gpus_per_client: Any, *, names: Mapping[str, str]
) -> Federation:
    """The federation from numbers or their text, checked.

    Parameters
    ----------
    num_supernodes, cpus_per_client, gpus_per_client
        Simulated clients, Ray CPUs per client (whole: Flower's federation config holds an
        integer) and the GPU share per client (0: none).
    names : mapping
        Field name -> what the user set it as (an option or an environment variable), for errors.
    """
    supernodes = _number(names["num_supernodes"], num_supernodes)
    if supernodes < 1 or supernodes != int(supernodes):
        raise _not_allowed(names["num_supernodes"], num_supernodes, "expected a whole number of clients, at least 1")
    cpus = _number(names["cpus_per_client"], cpus_per_client)
    if cpus < 1 or cpus != int(cpus):
        raise _not_allowed(
            names["cpus_per_client"], cpus_per_client, "expected a whole number of CPUs, at least 1 (Flower's rule)"
        )
    gpus = _number(names["gpus_per_client"], gpus_per_client)
    if gpus < 0 or (gpus > 1 and gpus != int(gpus)):
        raise _not_allowed(
            names["gpus_per_client"],
            gpus_per_client,
            "expected a share in [0, 1] or a whole number of GPUs (Ray's rule)",
        )
    if gpus > 0 and not os.environ.get("RAY_ADDRESS"):
        visible = torch.cuda.device_count()
        if gpus > visible:
            here = (
                f"this machine has {visible} GPUs: expected at most {visible}"
                if visible
                else "no GPU is visible here: expected 0"
            )
            raise _not_allowed(
                names["gpus_per_client"], gpus_per_client, f"{here}, or RAY_ADDRESS set to a Ray cluster with GPUs"
            )
    return Federation(int(supernodes), int(cpus), gpus)


def _number(name: str, value: Any) -> float:
    try:
        number = float(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else math.nan
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise _not_allowed(name, value, "expected a number")
    return number


def _not_allowed(name: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{name}: value {value!r} is not allowed; {expected}")


def main() -> None:
    """Print scripts/flwr_run.sh's ``--federation-config`` from its environment, or fail in one line."""
    values = {field: os.environ.get(variable, default) for field, (variable, default) in ENVIRONMENT.items()}
    try:
        print(federation(**values, names={field: variable for field, (variable, _) in ENVIRONMENT.items()}).config())
    except ConfigError as error:
        sys.exit(f"fedbilevel: {error}")


if __name__ == "__main__":
    main()
