"""Federations: run-config ``data`` name -> each client's train, test and validation examples.

One loader per format (:mod:`.synthetic`, :mod:`.flan`, :mod:`.hub`, :mod:`.digits`), the
records they produce (:mod:`.types`), the helpers they share (:mod:`.common`) and their
run-config options (:mod:`.settings`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedbilevel.data.common import hold_out_validation
from fedbilevel.data.digits import make_digits_client_data
from fedbilevel.data.flan import load_flan_json
from fedbilevel.data.hub import load_hub_client_data
from fedbilevel.data.settings import DataSettings
from fedbilevel.data.synthetic import make_client_data, task_of_client
from fedbilevel.data.types import ClientData
from fedbilevel.options import resolve_user_path

# Turns one raw image of a hub dataset into the model's pixel values (the client passes the
# model's image processor; the data package knows no models).
Preprocess = Callable[[Any], Any]


def _synthetic(
    data: DataSettings, partition_id: int, num_partitions: int, seed: int, _: Preprocess | None
) -> ClientData:
    train, test = make_client_data(
        partition_id,
        num_partitions,
        seed=seed,
        num_train=data.synthetic_train_examples,
        num_test=data.synthetic_test_examples,
        tasks=data.synthetic_tasks,
        instruction=data.synthetic_instruction,
        split=data.synthetic_split,
    )
    task = (
        task_of_client(partition_id, num_partitions, data.synthetic_tasks)
        if data.synthetic_split == "task"
        else "mixed"
    )
    return ClientData(task, train, test)


def _flan_json(
    data: DataSettings, partition_id: int, num_partitions: int, seed: int, _: Preprocess | None
) -> ClientData:
    return load_flan_json(
        resolve_user_path(data.data_path),
        partition_id,
        num_partitions,
        clients_per_task=data.clients_per_task,
        max_train=data.max_train_examples or None,
        max_test=data.max_test_examples or None,
        seed=seed,
    )


def _hub(
    data: DataSettings, partition_id: int, num_partitions: int, seed: int, preprocess: Preprocess | None
) -> ClientData:
    return load_hub_client_data(
        data.hub_dataset,
        partition_id,
        num_partitions,
        subset=data.hub_subset or None,
        split_train=data.hub_train_split,
        split_test=data.hub_test_split or None,
        partitioner=data.partitioner,
        partition_by=data.partition_by or None,
        alpha=data.dirichlet_alpha,
        clients_per_task=data.clients_per_task,
        instruction_column=data.instruction_column,
        input_column=data.input_column,
        output_column=data.output_column,
        task_column=data.task_column,
        image_column=data.image_column,
        label_column=data.label_column,
        preprocess=preprocess,
        test_fraction=data.test_fraction,
        max_train=data.max_train_examples or None,
        max_test=data.max_test_examples or None,
        seed=seed,
    )


def _digits(data: DataSettings, partition_id: int, num_partitions: int, seed: int, _: Preprocess | None) -> ClientData:
    return make_digits_client_data(partition_id, num_partitions, seed=seed, test_fraction=data.test_fraction)


# run-config ``data`` -> loader (the keys are fedbilevel.data.settings.DATA_SOURCES).
DATA_LOADERS: dict[str, Callable[[DataSettings, int, int, int, Preprocess | None], ClientData]] = {
    "synthetic": _synthetic,
    "flan-json": _flan_json,
    "hub": _hub,
    "digits": _digits,
}


def load_client_data(
    data: DataSettings, partition_id: int, num_partitions: int, *, seed: int, preprocess: Preprocess | None = None
) -> ClientData:
    """The partition ``partition_id`` of ``num_partitions`` of the federation ``data.source``.

    ``seed`` (the run seed) fixes every draw of the split; ``preprocess`` prepares hub images
    for the model (:func:`fedbilevel.models.zoo.image_preprocessor`). ``val-fraction`` of the
    loader's training examples become the validation split, here for every format alike.
    """
    loaded = DATA_LOADERS[data.source](data, partition_id, num_partitions, seed, preprocess)
    return hold_out_validation(loaded, data.val_fraction, seed=seed, partition_id=partition_id)
