"""Federations: run-config ``data`` name -> per-client train/test examples."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedbilevel.data.prompts import Example

if TYPE_CHECKING:
    from fedbilevel.config import RunConfig
    from fedbilevel.data.digits import ImageExample


@dataclass(frozen=True)
class ClientData:
    """One client's partition: its task label and its own train and test examples.

    Examples are :class:`~fedbilevel.data.prompts.Example` (text) or
    :class:`~fedbilevel.data.digits.ImageExample` (images), one kind per federation.
    """

    task: str
    train: list[Example] | list[ImageExample]
    test: list[Example] | list[ImageExample]


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
        split=config.synthetic_split,
    )
    task = task_of_client(partition_id, num_partitions, config.synthetic_tasks) if config.synthetic_split == "task" else "mixed"
    return ClientData(task, train, test)


def _flan_json(config: RunConfig, partition_id: int, num_partitions: int) -> ClientData:
    from fedbilevel.config import resolve_user_path
    from fedbilevel.data.flan import load_flan_json

    return load_flan_json(
        resolve_user_path(config.data_path),
        partition_id,
        num_partitions,
        max_train=config.max_train_examples or None,
        max_test=config.max_test_examples or None,
        seed=config.seed,
    )


def _hub(config: RunConfig, partition_id: int, num_partitions: int) -> ClientData:
    from fedbilevel.data.hub import load_hub_client_data

    preprocess = None
    if config.image_column:  # images, prepared as the model expects them
        from fedbilevel.models.zoo import image_preprocessor

        preprocess = image_preprocessor(config.model_name)
    return load_hub_client_data(
        config.hub_dataset,
        partition_id,
        num_partitions,
        subset=config.hub_subset or None,
        split_train=config.hub_train_split,
        split_test=config.hub_test_split or None,
        partitioner=config.partitioner,
        partition_by=config.partition_by or None,
        alpha=config.dirichlet_alpha,
        instruction_column=config.instruction_column,
        input_column=config.input_column,
        output_column=config.output_column,
        task_column=config.task_column,
        image_column=config.image_column,
        label_column=config.label_column,
        preprocess=preprocess,
        test_fraction=config.test_fraction,
        max_train=config.max_train_examples or None,
        max_test=config.max_test_examples or None,
        seed=config.seed,
    )


def _digits(config: RunConfig, partition_id: int, num_partitions: int) -> ClientData:
    from fedbilevel.data.digits import make_digits_client_data

    return make_digits_client_data(partition_id, num_partitions, seed=config.seed, test_fraction=config.test_fraction)


# run-config ``data`` -> loader; the client app caches each client's data per process.
DATA_LOADERS: dict[str, Callable[[RunConfig, int, int], ClientData]] = {
    "synthetic": _synthetic,
    "flan-json": _flan_json,
    "hub": _hub,
    "digits": _digits,
}
# Federations of images (scored by accuracy and macro F1); the others hold text, except
# ``hub`` with an ``image-column`` (see is_image_data).
IMAGE_DATA = frozenset({"digits"})


def is_image_data(config: RunConfig) -> bool:
    """Whether the federation ``config`` names holds images."""
    return config.data in IMAGE_DATA or (config.data == "hub" and bool(config.image_column))


def load_client_data(config: RunConfig, partition_id: int, num_partitions: int) -> ClientData:
    """The partition ``partition_id`` of ``num_partitions`` of the federation ``config.data``."""
    return DATA_LOADERS[config.data](config, partition_id, num_partitions)
