"""Any instruction dataset as a federation, partitioned with flwr-datasets.

:func:`load_hub_client_data` downloads the splits through ``flwr_datasets.FederatedDataset``;
everything after loading (partitioning, rows -> :class:`Example`, the per-client train/test split,
subsets) is :func:`client_data_from_dataset`, which works on in-memory ``datasets.Dataset`` objects
so it is testable offline.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import datasets
import numpy as np
from flwr_datasets import FederatedDataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
)

from fedbilevel.data.common import check_int, check_partition, most_common, seeded_subset
from fedbilevel.data.settings import PARTITIONERS
from fedbilevel.data.types import ClientData, Example, ImageExample
from fedbilevel.options import not_allowed

# Task label of examples when neither a task column nor a partition-by column is given.
DEFAULT_TASK = "all"


def _check_columns(dataset: datasets.Dataset, split: str, columns: dict[str, str | None]) -> None:
    """Raise a one-line ``ValueError`` for the first named column that ``dataset`` lacks."""
    for key, column in columns.items():
        if column and column not in dataset.column_names:
            raise ValueError(
                f"{key}: {column!r} is not a column of split {split!r}; allowed: {', '.join(dataset.column_names)}"
            )


def _make_partitioner(
    partitioner: str, num_partitions: int, partition_by: str | None, alpha: float, seed: int
) -> Partitioner:
    if partitioner not in PARTITIONERS:
        raise ValueError(f"partitioner: {partitioner!r}; allowed: {', '.join(PARTITIONERS)}")
    if partitioner == "iid":
        return IidPartitioner(num_partitions)
    if not partition_by:
        raise ValueError(
            f"partition-by: {partition_by!r}; allowed: a column name (partitioner {partitioner!r} needs one)"
        )
    if partitioner == "natural":
        return NaturalIdPartitioner(partition_by=partition_by)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha: {alpha!r}; allowed: a number > 0")
    # min_partition_size=0: flwr-datasets then never re-draws the proportions, so a train and a
    # test split with the same classes and seed get the same per-class proportions per client;
    # empty partitions are reported by client_data_from_dataset instead.
    return DirichletPartitioner(num_partitions, partition_by, float(alpha), min_partition_size=0, seed=seed)


def partition_dataset(
    dataset: datasets.Dataset,
    partition_id: int,
    num_partitions: int,
    *,
    partitioner: str,
    partition_by: str | None,
    alpha: float,
    seed: int,
    clients_per_task: int = 1,
) -> datasets.Dataset:
    """One partition of ``dataset`` under a flwr-datasets partitioner.

    The rows are first shuffled with ``seed``, so IID shards (contiguous in flwr-datasets) and the
    row order inside a partition do not follow the dataset's storage order.

    Parameters
    ----------
    dataset : datasets.Dataset
        The split to partition.
    partition_id : int
        The partition, ``0 <= partition_id < num_partitions``.
    num_partitions : int
        Number of partitions.
    partitioner : {"natural", "dirichlet", "iid"}
        ``"natural"``: one partition per distinct ``partition_by`` value, partition K holding the
        K-th value in sorted order; with k times as many partitions as values, partitions
        K·k … K·k + k − 1 split the K-th value's rows into k IID shards (e.g. 2 clients a domain);
        ``"dirichlet"``: per-class proportions drawn from Dirichlet(``alpha``) over the
        ``partition_by`` classes; ``"iid"``: equal random shards (``partition_by`` unused).
    partition_by : str or None
        The natural-id / class column (needed by ``"natural"`` and ``"dirichlet"``).
    alpha : float
        Dirichlet concentration (> 0; only ``"dirichlet"``); smaller is more skewed.
    seed : int
        Seed of the shuffle and of the Dirichlet draw.
    clients_per_task : int, optional
        ``"natural"`` only: k > 1 states the clients per natural id, and ``num_partitions`` must
        then be k × the number of values; 1 (default) takes k = ``num_partitions`` / values.

    Returns
    -------
    datasets.Dataset
        The partition's rows (possibly empty for ``"dirichlet"`` and ``"iid"``).

    Raises
    ------
    ValueError
        One line for an unknown partitioner, a missing or unknown ``partition_by`` column, a bad
        ``alpha``, a number of natural ids that does not fit ``num_partitions`` and
        ``clients_per_task``, or a natural id with fewer rows than its clients (naming the id
        and the counts).
    """
    partition_id, num_partitions = check_partition(partition_id, num_partitions)
    seed = check_int("seed", seed, 0)
    clients_per_task = check_int("clients-per-task", clients_per_task, 1)
    chosen = _make_partitioner(partitioner, num_partitions, partition_by, alpha, seed)
    if partitioner != "iid":
        _check_columns(dataset, "dataset", {"partition-by": partition_by})
    chosen.dataset = dataset.shuffle(seed=seed)
    if partitioner == "natural":
        ids = chosen.num_partitions
        if clients_per_task > 1 and num_partitions != ids * clients_per_task:
            raise not_allowed(
                "clients-per-task",
                clients_per_task,
                f"partition-by {partition_by!r} has {ids} distinct values but num-partitions is {num_partitions}; "
                f"allowed: num-partitions = values × clients-per-task ({ids} × {clients_per_task})",
            )
        if num_partitions % ids:
            raise ValueError(
                f"partition-by {partition_by!r} has {ids} distinct values but num-partitions is {num_partitions}; "
                "allowed: a multiple of the number of distinct values (one natural id per client, or k clients an id)"
            )
        per_id = num_partitions // ids  # clients p·k … p·k + k − 1 share natural id p, IID shards of it
        rows = chosen.load_partition(partition_id // per_id)
        if per_id > len(rows):  # a shard would be empty
            raise not_allowed(
                "clients-per-task",
                per_id,
                f"natural id {chosen.partition_id_to_natural_id[partition_id // per_id]!r} of partition-by "
                f"{partition_by!r} has {len(rows)} rows; allowed: at most {len(rows)} clients for it",
            )
        return rows.shard(num_shards=per_id, index=partition_id % per_id, contiguous=True) if per_id > 1 else rows
    return chosen.load_partition(partition_id)


def _examples(
    rows: datasets.Dataset,
    where: str,
    instruction_column: str,
    input_column: str,
    output_column: str,
    label_column: str | None,
) -> list[Example]:
    """Rows as examples: instruction (+ "\\n\\n" + input when non-empty), output, task label."""
    instructions, outputs = rows[instruction_column], rows[output_column]
    inputs = rows[input_column] if input_column else [None] * len(rows)
    labels = rows[label_column] if label_column else [DEFAULT_TASK] * len(rows)
    examples = []
    for index, (instruction, extra, output, label) in enumerate(zip(instructions, inputs, outputs, labels)):
        for column, value in ((instruction_column, instruction), (output_column, output)):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(
                    f"{where} row {index}: column {column!r} is {str(value)[:40]!r} ({type(value).__name__}); "
                    "allowed: a non-empty string"
                )
        if extra is not None and not isinstance(extra, str):
            raise ValueError(
                f"{where} row {index}: column {input_column!r} is {type(extra).__name__}; allowed: a string or null"
            )
        text = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        examples.append(Example(instruction=text, output=output, task=str(label)))
    return examples


def _image_examples(
    rows: datasets.Dataset,
    where: str,
    image_column: str,
    label_column: str,
    task_column: str | None,
    preprocess: Callable,
) -> list[ImageExample]:
    """Image rows as examples: ``preprocess(image)`` pixels, an integer label, the task (e.g. domain)."""

    labels = rows[label_column]
    tasks = rows[task_column] if task_column else [DEFAULT_TASK] * len(rows)
    examples = []
    for index, (image, label, task) in enumerate(zip(rows[image_column], labels, tasks)):
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or label < 0:
            raise ValueError(f"{where} row {index}: column {label_column!r} is {label!r}; allowed: a class index >= 0")
        examples.append(ImageExample(preprocess(image), int(label), str(task)))
    return examples


def client_data_from_dataset(
    dataset_train: datasets.Dataset,
    dataset_test: datasets.Dataset | None,
    partition_id: int,
    num_partitions: int,
    *,
    partitioner: str,
    partition_by: str | None,
    alpha: float,
    clients_per_task: int = 1,
    instruction_column: str,
    input_column: str,
    output_column: str,
    task_column: str,
    test_fraction: float,
    max_train: int | None,
    max_test: int | None,
    seed: int,
    image_column: str = "",
    label_column: str = "label",
    preprocess: Callable | None = None,
) -> ClientData:
    """Client ``partition_id``'s train and test examples from loaded splits.

    Parameters
    ----------
    dataset_train : datasets.Dataset
        The training split, partitioned with :func:`partition_dataset`.
    dataset_test : datasets.Dataset or None
        A separate test split, partitioned the same way so that client K is tested on its own
        partition (``"natural"``: the same id; ``"dirichlet"``: the same per-class proportions);
        it must hold the same ``partition_by`` values as the training split. ``None``: each
        client's partition is split into train and test instead (``test_fraction``).
    partition_id, num_partitions : int
        The client and the number of clients.
    partitioner, partition_by, alpha, clients_per_task :
        See :func:`partition_dataset`. The k clients of a natural id split its test rows too:
        the test split's rows of that id, or each holds out ``test_fraction`` of its own shard.
    instruction_column, output_column : str
        Columns with the instruction and the reference output (non-empty strings).
    input_column : str
        Column appended to the instruction as ``instruction + "\\n\\n" + input`` where non-empty;
        ``""`` for none.
    task_column : str
        Column with the example's task label; ``""`` uses the ``partition_by`` value, or
        ``"all"`` without ``partition_by``.
    test_fraction : float
        Share of a client's rows held out for testing when ``dataset_test`` is None
        (``0 < test_fraction < 1``; chosen with ``default_rng([seed, partition_id])``).
    max_train, max_test : int or None
        Keep at most this many train / test examples (:func:`~fedbilevel.data.flan.seeded_subset`).
    seed : int
        Seed of the partitioning, the train/test split and the subsets.
    image_column, label_column, preprocess : str, str, callable
        An image dataset: with ``image_column`` set, rows become
        :class:`~fedbilevel.data.types.ImageExample` with ``preprocess(image)`` pixels and the
        integer class in ``label_column`` (the text columns are then unused).

    Returns
    -------
    ClientData
        ``task`` is the most common task label of the client's training examples (ties: the
        lexicographically smallest); with ``"natural"`` and no task column, its natural id.

    Raises
    ------
    ValueError
        One line for a missing column (listing the available ones), a bad option, natural ids or
        classes that differ between the splits, an empty train or test set, or a row whose
        instruction or output is not a non-empty string.
    """
    partition_id, num_partitions = check_partition(partition_id, num_partitions)
    max_train = None if max_train is None else check_int("max-train-examples", max_train, 1)
    max_test = None if max_test is None else check_int("max-test-examples", max_test, 1)
    text_columns = {
        "instruction-column": instruction_column,
        "input-column": input_column,
        "output-column": output_column,
    }
    image_columns = {"image-column": image_column, "label-column": label_column}
    columns = {
        **(image_columns if image_column else text_columns),
        "task-column": task_column,
        "partition-by": partition_by,
    }
    for split, dataset in (("train", dataset_train), ("test", dataset_test)):
        if dataset is not None:
            _check_columns(dataset, split, columns)
    options = {
        "partitioner": partitioner,
        "partition_by": partition_by,
        "alpha": alpha,
        "seed": seed,
        "clients_per_task": clients_per_task,
    }
    train_rows = partition_dataset(dataset_train, partition_id, num_partitions, **options)
    where = f"partition {partition_id} of {num_partitions} ({partitioner})"
    if len(train_rows) == 0:
        raise ValueError(f"{where}: no training rows; allowed: a larger alpha, fewer partitions or more data")

    if dataset_test is not None:
        if partitioner != "iid":
            # flwr-datasets numbers the sorted natural ids / classes, so with the same values in
            # both splits client K gets the same id (or the same Dirichlet proportions) in each.
            train_ids, test_ids = sorted(dataset_train.unique(partition_by)), sorted(dataset_test.unique(partition_by))
            if train_ids != test_ids:
                raise ValueError(
                    f"partition-by {partition_by!r}: the test split has values {test_ids} "
                    f"but the train split {train_ids}; allowed: the same values"
                )
        test_rows = partition_dataset(dataset_test, partition_id, num_partitions, **options)
    else:
        if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
            raise ValueError(
                f"test-fraction: {test_fraction!r}; "
                "allowed: a number with 0 < test-fraction < 1 (there is no test split)"
            )
        order = np.random.default_rng([seed, partition_id]).permutation(len(train_rows))
        num_test = round(test_fraction * len(train_rows))
        if not 0 < num_test < len(train_rows):
            raise ValueError(
                f"{where}: test-fraction {test_fraction} of {len(train_rows)} rows leaves an empty train or test set; "
                "allowed: more rows per client"
            )
        test_rows, train_rows = (
            train_rows.select(np.sort(order[:num_test])),
            train_rows.select(np.sort(order[num_test:])),
        )
    if len(test_rows) == 0:
        raise ValueError(f"{where}: no test rows; allowed: a larger alpha, fewer partitions or more test data")

    task_of_row = task_column or partition_by
    if image_column:
        if preprocess is None:
            raise ValueError(
                "preprocess: None; allowed: a function from an image to its pixel array (image datasets need one)"
            )
        train = _image_examples(train_rows, f"train {where}", image_column, label_column, task_of_row, preprocess)
        test = _image_examples(test_rows, f"test {where}", image_column, label_column, task_of_row, preprocess)
    else:
        train = _examples(train_rows, f"train {where}", instruction_column, input_column, output_column, task_of_row)
        test = _examples(test_rows, f"test {where}", instruction_column, input_column, output_column, task_of_row)
    task, _ = most_common(example.task for example in train)
    return ClientData(task, seeded_subset(train, max_train, seed), seeded_subset(test, max_test, seed))


def load_hub_client_data(
    name: str,
    partition_id: int,
    num_partitions: int,
    *,
    subset: str | None = None,
    split_train: str = "train",
    split_test: str | None,
    partitioner: str,
    partition_by: str | None,
    alpha: float,
    clients_per_task: int = 1,
    instruction_column: str,
    input_column: str,
    output_column: str,
    task_column: str,
    test_fraction: float,
    max_train: int | None,
    max_test: int | None,
    seed: int,
    image_column: str = "",
    label_column: str = "label",
    preprocess: Callable | None = None,
) -> ClientData:
    """Client ``partition_id``'s data from a Hugging Face hub dataset.

    Parameters
    ----------
    name : str
        Hub dataset name (e.g. ``"user/dataset"``).
    partition_id, num_partitions : int
        The client and the number of clients.
    subset : str or None, optional
        The dataset's configuration name, for datasets that have several.
    split_train : str, optional
        Split to partition for training.
    split_test : str or None
        Separate test split, or ``None`` to hold out ``test_fraction`` of each client's rows.
    partitioner, partition_by, alpha, clients_per_task, instruction_column, input_column, output_column,
    task_column, test_fraction, max_train, max_test, seed, image_column, label_column, preprocess :
        See :func:`client_data_from_dataset`.

    Returns
    -------
    ClientData
        As :func:`client_data_from_dataset`.
    """
    # FederatedDataset only downloads and selects the splits here; partition_dataset partitions
    # them (and shuffles with the run seed), so both splits get the same kind of partitioner.
    hub = FederatedDataset(dataset=name, subset=subset, partitioners={}, shuffle=False)
    train = hub.load_split(split_train)
    test = hub.load_split(split_test) if split_test else None
    return client_data_from_dataset(
        train,
        test,
        partition_id,
        num_partitions,
        partitioner=partitioner,
        partition_by=partition_by,
        alpha=alpha,
        clients_per_task=clients_per_task,
        instruction_column=instruction_column,
        input_column=input_column,
        output_column=output_column,
        task_column=task_column,
        test_fraction=test_fraction,
        max_train=max_train,
        max_test=max_test,
        seed=seed,
        image_column=image_column,
        label_column=label_column,
        preprocess=preprocess,
    )
