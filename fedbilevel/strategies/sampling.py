"""Client sampling: which clients train, and which evaluate, in a round.

The sample size is Flower's (``FedAvg``'s ``sample_nodes``): max(int(N × fraction), minimum).
The draw differs from Flower's on purpose: Flower samples with Python's global ``random``, so
a resumed run would draw other clients; here each round's sample is drawn from a generator
seeded by the run seed, the round and the phase, over the clients in ascending partition id,
so a run and its resumed continuation sample the same clients (FlowerTune, OpenFedLLM and
FedDPA's code sample a fraction per round likewise, uniformly without replacement).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedbilevel.options import ConfigError, integer, number, option, validate

_PHASES = {"train": 0, "evaluate": 1}


@dataclass(frozen=True)
class SamplingSettings:
    """How many clients train and evaluate per round (every client by default)."""

    fraction_train: float = option(
        "fraction-train",
        1.0,
        number(0.0, low_open=True, high=1.0, high_open=False),
        "fraction of the clients that train each round, drawn from the run seed and the round",
    )
    min_train_nodes: int = option(
        "min-train-nodes", 2, integer(1), "at least this many clients train each round (Flower's `min_train_nodes`)"
    )
    fraction_evaluate: float = option(
        "fraction-evaluate",
        1.0,
        number(0.0, low_open=True, high=1.0, high_open=False),
        "fraction of the clients that evaluate their current personalized adapter in an evaluation round",
    )
    min_evaluate_nodes: int = option(
        "min-evaluate-nodes", 2, integer(1), "at least this many clients evaluate (Flower's `min_evaluate_nodes`)"
    )

    def __post_init__(self) -> None:
        validate(self)


def sample_size(num_clients: int, fraction: float, minimum: int, *, key: str) -> int:
    """max(int(N × fraction), minimum), as Flower's FedAvg; a minimum above N is refused, naming ``key``."""
    if minimum > num_clients:
        raise ConfigError(
            f"run-config key '{key}': value {minimum} is not allowed; the federation has {num_clients} clients"
        )
    return max(int(num_clients * fraction), minimum)


def sample_clients(partitions: Sequence[int], size: int, *, seed: int, server_round: int, phase: str) -> list[int]:
    """``size`` of ``partitions``, drawn without replacement, in ascending partition id.

    Parameters
    ----------
    partitions : sequence of int
        The partition ids that can take part.
    size : int
        How many to draw; all of them when it is at least their number (no draw is made then).
    seed, server_round : int
        The run seed and the round (counted over resumes): the same pair gives the same sample.
    phase : {"train", "evaluate"}
        Train and evaluate samples are independent draws.

    Returns
    -------
    list[int]
        The sampled partition ids, sorted.
    """
    ordered = sorted(partitions)
    if size >= len(ordered):
        return ordered
    rng = np.random.default_rng([seed, server_round, _PHASES[phase]])
    return sorted(ordered[i] for i in rng.choice(len(ordered), size=size, replace=False))
