"""Tests for flwr-datasets partitioning of in-memory datasets into client data."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from fedbilevel.data.hub import (
    client_data_from_dataset,
    load_hub_client_data,
    partition_dataset,
)
from fedbilevel.data.types import Example

TASKS = ("uppercase", "count", "reverse")  # deliberately not sorted


def _dataset(rows_per_task=10, tasks=TASKS, prefix="q"):
    """``rows_per_task`` rows per task, grouped by task; input is empty on every third row."""
    rows = [(task, i) for task in tasks for i in range(rows_per_task)]
    return datasets.Dataset.from_dict(
        {
            "instruction": [f"{prefix} {task} {i}" for task, i in rows],
            "input": ["" if i % 3 == 0 else f"in {i}" for _, i in rows],
            "output": [f"{task}-{i}" for task, i in rows],
            "task": [task for task, _ in rows],
        }
    )


OPTIONS = {
    "partitioner": "natural",
    "partition_by": "task",
    "alpha": 1.0,
    "instruction_column": "instruction",
    "input_column": "input",
    "output_column": "output",
    "task_column": "",
    "test_fraction": 0.2,
    "max_train": None,
    "max_test": None,
    "seed": 0,
}


def _client(train, test, partition_id, num_partitions=3, **changes):
    return client_data_from_dataset(train, test, partition_id, num_partitions, **{**OPTIONS, **changes})


def _task_of(example):
    return example.output.split("-")[0]


def test_natural_one_sorted_task_per_client():
    data = _dataset()
    parts = [
        partition_dataset(data, k, 3, partitioner="natural", partition_by="task", alpha=1.0, seed=0) for k in range(3)
    ]
    # flwr-datasets numbers the sorted natural ids
    assert [set(p["task"]) for p in parts] == [{"count"}, {"reverse"}, {"uppercase"}]
    assert [len(p) for p in parts] == [10, 10, 10]


def test_natural_train_test_alignment_with_test_split():
    train = _dataset()
    # test split with other rows, the tasks in another storage order and other sizes
    test = _dataset(rows_per_task=4, tasks=("reverse", "uppercase", "count"), prefix="t")
    for k, task in enumerate(sorted(TASKS)):
        client = _client(train, test, k)
        assert client.task == task
        assert (len(client.train), len(client.test)) == (10, 4)
        assert {_task_of(e) for e in client.train} == {_task_of(e) for e in client.test} == {task}
        assert all(e.task == task and e.instruction.startswith(f"t {task}") for e in client.test)


def test_instruction_input_join():
    client = _client(_dataset(), None, 0, test_fraction=0.5)
    by_output = {e.output: e for e in client.train + client.test}
    assert by_output["count-1"] == Example("q count 1\n\nin 1", "count-1", "count")
    assert by_output["count-3"] == Example("q count 3", "count-3", "count")  # empty input: no join
    no_input = _client(_dataset(), None, 0, test_fraction=0.5, input_column="")
    assert {e.instruction for e in no_input.train + no_input.test} == {f"q count {i}" for i in range(10)}


def test_test_fraction_split_is_seeded_and_disjoint():
    client = _client(_dataset(), None, 2, test_fraction=0.3)
    assert (len(client.train), len(client.test)) == (7, 3)
    outputs = [e.output for e in client.train + client.test]
    assert sorted(outputs) == sorted(f"uppercase-{i}" for i in range(10))
    assert _client(_dataset(), None, 2, test_fraction=0.3) == client
    assert {
        tuple(e.output for e in _client(_dataset(), None, 2, test_fraction=0.3, seed=s).test) for s in range(1, 6)
    } != {tuple(e.output for e in client.test)}


def test_max_train_and_max_test():
    full = _client(_dataset(), None, 0, test_fraction=0.5)
    small = _client(_dataset(), None, 0, test_fraction=0.5, max_train=2, max_test=3)
    assert (len(small.train), len(small.test)) == (2, 3)
    assert set(small.train) <= set(full.train) and set(small.test) <= set(full.test)


def test_task_column_overrides_partition_value():
    data = _dataset().add_column("label", [f"L{i % 2}" for i in range(30)])
    client = _client(data, None, 0, task_column="label", test_fraction=0.5)
    assert {e.task for e in client.train + client.test} <= {"L0", "L1"}
    assert client.task in {"L0", "L1"}


def test_dirichlet_sizes_sum_to_total_and_are_seeded():
    data = _dataset(rows_per_task=20)

    def sizes(seed, alpha=0.5, num=4):
        parts = [
            partition_dataset(data, k, num, partitioner="dirichlet", partition_by="task", alpha=alpha, seed=seed)
            for k in range(num)
        ]
        return [sorted(p["output"]) for p in parts]

    first = sizes(0)
    assert sum(len(p) for p in first) == 60
    assert sorted(o for p in first for o in p) == sorted(data["output"])  # every row exactly once
    assert sizes(0) == first
    assert any(sizes(s) != first for s in range(1, 4))


def test_dirichlet_client_task_is_dominant_label():
    client = _client(
        _dataset(rows_per_task=20), None, 1, num_partitions=2, partitioner="dirichlet", alpha=0.3, test_fraction=0.25
    )
    counts = {t: sum(e.task == t for e in client.train) for t in TASKS}
    assert client.task == min(counts, key=lambda t: (-counts[t], t))
    assert all(e.task == _task_of(e) for e in client.train + client.test)


def test_dirichlet_test_split_gets_same_proportions():
    # same seed and classes: each class of the (twice as large) test split is divided like in train
    train, test = _dataset(rows_per_task=20), _dataset(rows_per_task=40, prefix="t")
    for k in range(3):
        client = _client(train, test, k, partitioner="dirichlet", alpha=0.5)
        for task in TASKS:
            in_train = sum(_task_of(e) == task for e in client.train)
            in_test = sum(_task_of(e) == task for e in client.test)
            assert abs(in_test - 2 * in_train) <= 1, (k, task, in_train, in_test)


def test_dirichlet_empty_partition_is_an_error():
    data = _dataset()
    sizes = [
        len(partition_dataset(data, k, 10, partitioner="dirichlet", partition_by="task", alpha=0.01, seed=0))
        for k in range(10)
    ]
    empty = [k for k, size in enumerate(sizes) if size == 0]
    assert sum(sizes) == 30 and empty  # alpha=0.01: each class goes (almost) wholly to one or two clients
    for k in empty:
        with pytest.raises(ValueError, match=f"partition {k} of 10 \\(dirichlet\\): no training rows"):
            _client(data, None, k, num_partitions=10, partitioner="dirichlet", alpha=0.01)


def test_iid_equal_shards_cover_the_data():
    data = _dataset()
    parts = [partition_dataset(data, k, 3, partitioner="iid", partition_by=None, alpha=1.0, seed=0) for k in range(3)]
    assert [len(p) for p in parts] == [10, 10, 10]
    assert sorted(o for p in parts for o in p["output"]) == sorted(data["output"])
    # shuffled before sharding: a shard is not one task of the task-grouped data
    assert all(len(set(p["task"])) > 1 for p in parts)
    client = _client(data, None, 0, partitioner="iid", partition_by=None, test_fraction=0.2)
    assert (len(client.train), len(client.test)) == (8, 2)
    assert {e.task for e in client.train} == {"all"}


def test_error_unknown_partitioner():
    with pytest.raises(ValueError, match="partitioner: 'shards'; allowed: natural, dirichlet, iid"):
        _client(_dataset(), None, 0, partitioner="shards")


def test_error_missing_partition_by_and_bad_alpha():
    with pytest.raises(ValueError, match="partition-by: None; allowed: a column name"):
        partition_dataset(_dataset(), 0, 3, partitioner="dirichlet", partition_by=None, alpha=1.0, seed=0)
    with pytest.raises(ValueError, match="alpha: 0; allowed: a number > 0"):
        partition_dataset(_dataset(), 0, 3, partitioner="dirichlet", partition_by="task", alpha=0, seed=0)


@pytest.mark.parametrize("key", ["instruction_column", "input_column", "output_column", "task_column", "partition_by"])
def test_error_missing_column(key):
    name = key.replace("_", "-")
    with pytest.raises(
        ValueError, match=f"{name}: 'nope' is not a column of split 'train'; allowed: instruction, input, output, task$"
    ):
        _client(_dataset(), None, 0, **{key: "nope"})


def test_error_missing_column_in_test_split():
    test = _dataset().rename_column("output", "answer")
    with pytest.raises(
        ValueError,
        match="output-column: 'output' is not a column of split 'test'; allowed: instruction, input, answer, task",
    ):
        _client(_dataset(), test, 0)


def test_error_wrong_number_of_natural_ids():
    with pytest.raises(ValueError, match="partition-by 'task' has 3 distinct values but num-partitions is 4"):
        _client(_dataset(), None, 0, num_partitions=4)


def test_error_test_split_with_other_ids():
    test = _dataset(tasks=("count", "reverse", "other"))
    with pytest.raises(ValueError, match=r"test split has values \['count', 'other', 'reverse'\] but the train split"):
        _client(_dataset(), test, 0)


def test_error_empty_output_and_bad_test_fraction():
    data = _dataset()
    bad = data.map(lambda row: {"output": "" if row["output"] == "count-4" else row["output"]})
    with pytest.raises(ValueError, match=r"column 'output' is '' \(str\); allowed: a non-empty string"):
        _client(bad, None, 0, test_fraction=0.5)
    with pytest.raises(ValueError, match=r"test-fraction: 1\.0; allowed"):
        _client(data, None, 0, test_fraction=1.0)
    with pytest.raises(ValueError, match=r"test-fraction 0\.01 of 10 rows leaves an empty train or test set"):
        _client(data, None, 0, test_fraction=0.01)


def test_load_hub_client_data_through_federated_dataset(monkeypatch):
    # The real FederatedDataset code runs; only the hub download is replaced (no network here).
    from flwr_datasets import federated_dataset

    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append(path)
        return datasets.DatasetDict({"train": _dataset(), "validation": _dataset(rows_per_task=2, prefix="v")})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(federated_dataset, "event", lambda *args, **kwargs: None)
    client = load_hub_client_data("user/tasks", 1, 3, split_test="validation", **OPTIONS)
    assert calls == ["user/tasks"]
    assert client.task == "reverse"
    assert (len(client.train), len(client.test)) == (10, 2)
    assert all(e.instruction.startswith("v reverse") for e in client.test)


def test_natural_with_k_clients_an_id_splits_each_id_iid():
    data = _dataset(rows_per_task=10)
    parts = [
        partition_dataset(data, k, 6, partitioner="natural", partition_by="task", alpha=1.0, seed=0) for k in range(6)
    ]
    assert [sorted(set(p["task"])) for p in parts] == [["count"]] * 2 + [["reverse"]] * 2 + [["uppercase"]] * 2
    assert [len(p) for p in parts] == [5] * 6
    assert not set(parts[0]["instruction"]) & set(parts[1]["instruction"])  # the two shards of an id are disjoint


def _image_dataset(per_domain=6):
    """Tiny RGB images in two domains (dark, bright) with labels 0..2."""
    from PIL import Image

    rows = [(domain, i) for domain in ("dark", "bright") for i in range(per_domain)]
    images = [Image.new("RGB", (4, 4), color=(10 * i, 10, 10) if d == "dark" else (200, 200, 10 * i)) for d, i in rows]
    return datasets.Dataset.from_dict(
        {"image": images, "label": [i % 3 for _, i in rows], "domain": [d for d, _ in rows]}
    )


def test_image_rows_become_preprocessed_image_examples_two_clients_a_domain():
    from fedbilevel.data.types import ImageExample
    from fedbilevel.models.zoo import image_preprocessor

    preprocess = image_preprocessor("digits-vit")  # no image processor: resized to 8×8 grey in [0, 1]
    options = {**OPTIONS, "partition_by": "domain", "test_fraction": 0.34}
    clients = [
        client_data_from_dataset(
            _image_dataset(), None, k, 4, **options, image_column="image", label_column="label", preprocess=preprocess
        )
        for k in range(4)
    ]
    assert [c.task for c in clients] == ["bright", "bright", "dark", "dark"]
    example = clients[2].train[0]
    assert (
        isinstance(example, ImageExample)
        and example.pixels.shape == (1, 8, 8)
        and example.pixels.dtype.name == "float32"
    )
    assert example.pixels.max() < 0.2 and clients[0].train[0].pixels.min() > 0.4  # dark and bright stay so
    assert all(len(c.train) == 2 and len(c.test) == 1 for c in clients) and {
        e.label for c in clients for e in c.train
    } <= {0, 1, 2}
    with pytest.raises(ValueError, match="image-column: 'picture' is not a column of split 'train'"):
        client_data_from_dataset(_image_dataset(), None, 0, 4, **options, image_column="picture", preprocess=preprocess)
    with pytest.raises(ValueError, match="preprocess: None"):
        client_data_from_dataset(_image_dataset(), None, 0, 4, **options, image_column="image")


def test_a_model_with_an_image_processor_gets_its_preprocessing(tmp_path):
    import shutil

    from PIL import Image
    from transformers import ViTImageProcessor

    from fedbilevel.models.zoo import image_preprocessor, resolve_model_source

    folder = tmp_path / "vit-with-processor"
    shutil.copytree(resolve_model_source("digits-vit"), folder)
    ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=[0.5], image_std=[0.5]).save_pretrained(folder)
    pixels = image_preprocessor(str(folder))(Image.new("RGB", (16, 16), color=(204, 204, 204)))
    # Resized to 8×8, one channel, normalised as the processor says: (0.8 − 0.5) / 0.5 = 0.6.
    assert pixels.shape == (1, 8, 8) and pixels.dtype.name == "float32"
    np.testing.assert_allclose(pixels, 0.6, atol=0.01)
