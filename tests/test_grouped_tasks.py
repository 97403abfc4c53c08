"""k clients per task (`clients-per-task`): the seeded split of a one-task-per-client federation."""

from __future__ import annotations

import ast
import json
import tomllib
from pathlib import Path

import datasets
import pytest

from fedbilevel.config import RunConfig
from fedbilevel.data import load_client_data
from fedbilevel.data.common import seeded_share
from fedbilevel.data.flan import load_flan_json
from fedbilevel.data.hub import partition_dataset
from fedbilevel.data.settings import DataSettings
from fedbilevel.options import ConfigError, defaults

ROOT = Path(__file__).resolve().parents[1]
FLAN8 = ROOT.parent / "shared" / "data" / "flan8"
needs_flan8 = pytest.mark.skipif(not FLAN8.is_dir(), reason=f"flan8 reference data not found at {FLAN8}")


def _record(i, category):
    return {"instruction": f"{category} question {i}", "output": f"answer {i}", "task": "src", "category": category}


def _folder(tmp_path, train_sizes=(10, 7), test_sizes=(6, 5)):
    """A flan-json folder: client_K.json holds ``train_sizes[K]`` records of category ``cat_K``."""
    test_lines = []
    for k, (num_train, num_test) in enumerate(zip(train_sizes, test_sizes)):
        (tmp_path / f"client_{k}.json").write_text(json.dumps([_record(i, f"cat_{k}") for i in range(num_train)]))
        test_lines += [json.dumps(_record(100 + i, f"cat_{k}")) for i in range(num_test)]
    (tmp_path / "test.jsonl").write_text("\n".join(test_lines) + "\n")
    return tmp_path


def _clients(folder, num_files, k, **options):
    return [load_flan_json(folder, p, num_files * k, clients_per_task=k, **options) for p in range(num_files * k)]


def test_seeded_share_is_a_disjoint_near_equal_cover_in_original_order():
    items = list(range(11))
    shares = [seeded_share(items, 3, j, (0, 5)) for j in range(3)]
    assert sorted(len(s) for s in shares) == [3, 4, 4]
    assert sorted(x for s in shares for x in s) == items
    assert all(s == sorted(s) for s in shares)
    assert shares == [seeded_share(items, 3, j, (0, 5)) for j in range(3)]
    assert shares != [seeded_share(items, 3, j, (1, 5)) for j in range(3)]
    assert seeded_share(items, 1, 0, (7, 0)) == items


def test_partition_p_holds_the_task_of_file_p_over_k(tmp_path):
    clients = _clients(_folder(tmp_path), 2, 3)
    assert [c.task for c in clients] == ["cat_0"] * 3 + ["cat_1"] * 3
    assert {e.task for c in clients for e in c.train + c.test} == {"cat_0", "cat_1"}
    assert all({e.task for e in c.train + c.test} == {c.task} for c in clients)


def test_each_tasks_training_and_test_items_are_split_disjointly_and_completely(tmp_path):
    folder = _folder(tmp_path)
    clients = _clients(folder, 2, 3)
    whole = [load_flan_json(folder, k, 2) for k in range(2)]
    for task, group in ((0, clients[:3]), (1, clients[3:])):
        for split in ("train", "test"):
            shares = [getattr(c, split) for c in group]
            items = [e for share in shares for e in share]
            assert len(items) == len(set(items))  # no example in two clients
            assert sorted(items, key=repr) == sorted(getattr(whole[task], split), key=repr)
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
            assert all(share == [e for e in getattr(whole[task], split) if e in share] for share in shares)
    assert [len(c.train) for c in clients] == [4, 3, 3, 3, 2, 2]


def test_the_split_is_determined_by_the_seed(tmp_path):
    folder = _folder(tmp_path)
    first = _clients(folder, 2, 3, seed=4)
    assert first == _clients(folder, 2, 3, seed=4)
    other = _clients(folder, 2, 3, seed=5)
    assert [c.train for c in other] != [c.train for c in first]
    assert [c.test for c in other] != [c.test for c in first]


def test_one_client_per_task_is_the_whole_file_as_before(tmp_path):
    folder = _folder(tmp_path)
    assert load_flan_json(folder, 1, 2, clients_per_task=1, seed=3) == load_flan_json(folder, 1, 2, seed=3)
    assert [e.instruction for e in load_flan_json(folder, 0, 2).train] == [f"cat_0 question {i}" for i in range(10)]


def test_caps_apply_to_each_clients_share(tmp_path):
    clients = _clients(_folder(tmp_path, (30, 30), (12, 12)), 2, 3, max_train=4, max_test=2, seed=1)
    assert [(len(c.train), len(c.test)) for c in clients] == [(4, 2)] * 6
    items = [e for c in clients for e in c.train]
    assert len(items) == len(set(items))


def test_the_loader_dispatch_passes_the_key(tmp_path):
    data = DataSettings(source="flan-json", data_path=str(_folder(tmp_path)), clients_per_task=2)
    assert [load_client_data(data, p, 4, seed=0).task for p in range(4)] == ["cat_0", "cat_0", "cat_1", "cat_1"]


def test_error_partitions_other_than_files_times_k(tmp_path):
    folder = _folder(tmp_path)
    with pytest.raises(
        ValueError, match=r"num-partitions 4 .* clients-per-task is 3; allowed: .* \(2 × 3 = 6\)"
    ) as error:
        load_flan_json(folder, 0, 4, clients_per_task=3)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("train_sizes", "test_sizes", "counts"),
    [((10, 2), (6, 5), "2 training examples and 5 test lines"), ((10, 7), (6, 2), "7 training examples and 2 test")],
)
def test_error_more_clients_than_a_tasks_items(tmp_path, train_sizes, test_sizes, counts):
    folder = _folder(tmp_path, train_sizes, test_sizes)
    with pytest.raises(
        ConfigError, match=rf"'clients-per-task': value 3 .* task 'cat_1' \(client_1\.json\) has {counts}"
    ):
        load_flan_json(folder, 4, 6, clients_per_task=3)
    load_flan_json(folder, 0, 6, clients_per_task=3)  # cat_0 has enough


def test_the_key_is_refused_where_it_splits_nothing():
    with pytest.raises(ConfigError, match=r"'clients-per-task': value 2 .* with data='synthetic' use 1"):
        DataSettings(clients_per_task=2)
    with pytest.raises(ConfigError, match=r"with partitioner='iid' use 1"):
        DataSettings(source="hub", hub_dataset="a/b", partitioner="iid", clients_per_task=2)
    with pytest.raises(ConfigError, match=r"'clients-per-task': value 0 "):
        DataSettings(source="flan-json", data_path="x", clients_per_task=0)
    DataSettings(source="hub", hub_dataset="a/b", partition_by="task", clients_per_task=2)


def _hub_rows(rows_per_task):
    tasks = [task for task in ("b", "a", "c") for _ in range(rows_per_task)]
    return datasets.Dataset.from_dict(
        {"instruction": [f"q {i}" for i in range(len(tasks))], "output": ["x"] * len(tasks), "task": tasks}
    )


def test_hub_natural_ids_with_k_clients_each():
    rows = _hub_rows(8)
    parts = [
        partition_dataset(rows, p, 6, partitioner="natural", partition_by="task", alpha=1.0, seed=0, clients_per_task=2)
        for p in range(6)
    ]
    assert [set(part["task"]) for part in parts] == [{"a"}, {"a"}, {"b"}, {"b"}, {"c"}, {"c"}]
    assert [len(part) for part in parts] == [4] * 6
    assert len({q for part in parts for q in part["instruction"]}) == 24  # disjoint, complete
    with pytest.raises(ConfigError, match=r"'clients-per-task': value 2 .* 3 distinct values but num-partitions is 9"):
        partition_dataset(rows, 0, 9, partitioner="natural", partition_by="task", alpha=1.0, seed=0, clients_per_task=2)


def test_hub_natural_id_with_fewer_rows_than_clients():
    with pytest.raises(
        ConfigError, match=r"'clients-per-task': value 4 .* natural id 'b' of partition-by 'task' has 3 rows"
    ):
        partition_dataset(
            _hub_rows(3), 5, 12, partitioner="natural", partition_by="task", alpha=1.0, seed=0, clients_per_task=4
        )


def _task_label_reads(path):
    """(line, inside a ``log(...)`` call) for every ``protocol.TASK`` in a module."""
    tree = ast.parse(path.read_text())
    logged = {
        id(node)
        for call in ast.walk(tree)
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "log"
        for node in ast.walk(call)
    }
    return [
        (node.lineno, id(node) in logged)
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr == "TASK" and getattr(node.value, "id", "") == "protocol"
    ]


def test_only_the_cluster_oracle_acts_on_the_task_label():
    """The true groups travel as each client's task label: the oracle reads them, the others at most log them.
    eval-cross's report (cross_task.py) reads them for its columns; it weighs no update."""
    reads = {path.name: _task_label_reads(path) for path in (ROOT / "fedbilevel" / "strategies").glob("*.py")}
    assert reads.pop("cluster_oracle.py")
    reads.pop("cross_task.py")
    assert [(name, line) for name, found in reads.items() for line, in_log in found if not in_log] == []


def test_shipped_groups_config():
    written = tomllib.loads((ROOT / "conf" / "flan8-groups.toml").read_text())
    config = RunConfig.from_run_config(defaults(RunConfig), written)
    assert config.data.clients_per_task == 4 and config.data.source == "flan-json"


@needs_flan8
def test_flan8_as_32_clients():
    written = tomllib.loads((ROOT / "conf" / "flan8-groups.toml").read_text())
    k, max_train, max_test = written["clients-per-task"], written["max-train-examples"], written["max-test-examples"]
    clients = _clients(FLAN8, 8, k, max_train=max_train, max_test=max_test, seed=0)
    whole = [load_flan_json(FLAN8, t, 8) for t in range(8)]
    assert [c.task for c in clients] == [w.task for w in whole for _ in range(k)]
    assert all((len(c.train), len(c.test)) == (max_train, max_test) for c in clients)
    for t in range(8):
        group = clients[t * k : (t + 1) * k]
        for split in ("train", "test"):
            items = [e for c in group for e in getattr(c, split)]
            assert len(items) == len(set(items)) and set(items) <= set(getattr(whole[t], split))
    uncapped = _clients(FLAN8, 8, k, seed=0)
    assert [(len(c.train), len(c.test)) for c in uncapped] == [(75, 50)] * 32
    assert uncapped == _clients(FLAN8, 8, k, seed=0)
    assert uncapped != _clients(FLAN8, 8, k, seed=1)
