"""Federations: run-config ``data`` name -> per-client train/test examples."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedbilevel.data.prompts import Example

if TYPE_CHECKING:
    from fedbilevel.config import RunConfig


@dataclass(frozen=True)
class ClientData:
    """One client's partition: its task label and its own train and test examples."""

    task: str
    train: list[Example]
    test: list[Example]


def _synthetic(config: RunConfig, partition_id: int, num_partitions: int) -> ClientData:
    from fedbilevel.data.synthetic import make_client_data, task_of_client

    train, test = make_client_data(
        partition_id,
        num_partitions,
        seed=config.seed,
        num_train=config.synthetic_train_examples,
        num_test=config.synthetic_test_examples,
        tasks=config.synthetic_tasks,
        instruction=config.synthetic_instruction,
    )
    return ClientData(task_of_client(partition_id, num_partitions, config.synthetic_tasks), train, test)


DATA_LOADERS: dict[str, Callable[[RunConfig, int, int], ClientData]] = {"synthetic": _synthetic}


def load_client_data(config: RunConfig, partition_id: int, num_partitions: int) -> ClientData:
    """The partition ``partition_id`` of ``num_partitions`` of the federation ``config.data``."""
    return DATA_LOADERS[config.data](config, partition_id, num_partitions)
