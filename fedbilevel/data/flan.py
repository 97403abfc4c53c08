"""The FedDPA "flan-json" federation folder: ``client_K.json`` train files and one ``test.jsonl``.

Each ``client_K.json`` holds one task: a JSON list of records with the keys ``instruction``,
``output``, ``task`` (the source FLAN dataset) and ``category`` (the task group the file holds);
``test.jsonl`` holds the test lines of every category. The category is what the federation's
personalisation is about, so it is the task label of the examples.

With ``clients-per-task = k`` the F files make F·k clients, each task's clients adjacent:
partition p holds task ``client_<p // k>.json`` as member ``p % k``, so partitions 0..k−1 hold
client_0's task, k..2k−1 client_1's, and a heatmap ordered by partition id is ordered by task.
The member gets the ``(p % k)``-th of k disjoint, near-equal IID shares of the file's training
examples and of its category's test lines, drawn from the run seed and the file
(:func:`~fedbilevel.data.common.seeded_share`); ``max-train-examples`` / ``max-test-examples``
then cap each client's share. Test lines are split, not shared: as with k = 1 each test item
belongs to one client, so at a given per-client evaluation cost
(``max-test-examples``) the k clients of a task cover k times as many distinct items and the
federation's mean score is tighter; each client holds its own test data as in a real
federation; and since the split depends on the seed only, every strategy scores a client on
the same items. Every client of a task reports the category as its task label, which only the
cluster oracle (:mod:`fedbilevel.strategies.cluster_oracle`) acts on. k = 1 is one client per
file with all of its category's test lines, as before.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path

from fedbilevel.data.common import check_int, check_partition, seeded_share, seeded_subset
from fedbilevel.data.types import ClientData, Example
from fedbilevel.options import not_allowed

KEYS = ("instruction", "output", "task", "category")
TEST_FILE = "test.jsonl"
_CLIENT_FILE = re.compile(r"client_(\d+)\.json")
# Flan option lists: an "OPTIONS:" line followed by "- option" lines (the only format in flan8).
_OPTIONS_HEADING = re.compile(r"^[ \t]*options:[ \t]*$", re.IGNORECASE | re.MULTILINE)


def _check_record(record: object, where: str) -> Example:
    """The record as an :class:`Example` (task = its category), or a one-line ``ValueError``."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with keys {', '.join(KEYS)}, got {type(record).__name__}")
    for key in KEYS:
        if key not in record:
            raise ValueError(f"{where}: missing key {key!r}; allowed: records with keys {', '.join(KEYS)}")
        value = record[key]
        if not isinstance(value, str) or not value.strip():
            raise ValueError(
                f"{where}: key {key!r} is {str(value)[:40]!r} ({type(value).__name__}); allowed: a non-empty string"
            )
    return Example(instruction=record["instruction"], output=record["output"], task=record["category"])


def _client_files(folder: Path) -> dict[int, Path]:
    """Client id -> ``client_K.json`` path for the client files in ``folder``."""
    return {int(m.group(1)): p for p in folder.iterdir() if (m := _CLIENT_FILE.fullmatch(p.name))}


def _describe(ids: Sequence[int]) -> str:
    """``"client_0..client_7.json"`` for contiguous ids from 0, else the file names."""
    if not ids:
        return "no client_K.json files"
    if list(ids) == list(range(len(ids))):
        return f"client_0..client_{len(ids) - 1}.json" if len(ids) > 1 else "client_0.json"
    return ", ".join(f"client_{i}.json" for i in ids)


def read_client_file(path: Path) -> list[Example]:
    """Parse and validate one ``client_K.json`` (a JSON list of records).

    Parameters
    ----------
    path : Path
        The file.

    Returns
    -------
    list of Example
        One example per record, in file order, with ``task`` set to the record's category.

    Raises
    ------
    ValueError
        One line naming the file and the record index for invalid JSON, a non-list, a non-object
        record, a missing key or a key whose value is not a non-empty string. A UTF-8 byte-order
        mark is read, not refused.
    """
    try:
        # utf-8-sig: Windows editors start UTF-8 files with a byte-order mark, which json.loads refuses.
        records = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return [_check_record(record, f"{path} record {index}") for index, record in enumerate(records)]


@functools.cache
def _categories(path: Path) -> frozenset[str]:
    """The categories of a client file (each client's process reads every file once)."""
    return frozenset(example.task for example in read_client_file(path))


@functools.cache
def _read_test_file(path: Path) -> tuple[Example, ...]:
    """Parse ``test.jsonl`` once per resolved path (all clients of a process share it)."""
    examples = []
    with path.open(encoding="utf-8-sig") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():  # a blank line (e.g. a trailing one) holds no record
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {number}: invalid JSON at column {error.colno}: {error.msg}") from None
            examples.append(_check_record(record, f"{path} line {number}"))
    return tuple(examples)


def load_flan_json(
    folder: str | Path,
    partition_id: int,
    num_partitions: int,
    *,
    clients_per_task: int = 1,
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
) -> ClientData:
    """Client ``partition_id``'s data from a flan-json folder.

    Parameters
    ----------
    folder : str or Path
        Folder with ``client_0.json`` .. ``client_<F-1>.json`` and ``test.jsonl``.
    partition_id : int
        The client, ``0 <= partition_id < num_partitions``; it holds the task of
        ``client_<partition_id // clients_per_task>.json``.
    num_partitions : int
        Number of clients; must equal the number of client files times ``clients_per_task``.
    clients_per_task : int, optional
        k: each file's training examples and its category's test lines are split into k seeded,
        disjoint IID shares, one a client (see the module docstring); 1 (default): the whole
        file and all its category's test lines.
    max_train, max_test : int or None, optional
        Keep at most this many of the client's train / test examples, chosen by
        :func:`seeded_subset` (the same items in every run with that seed); ``None`` keeps all.
    seed : int, optional
        Seed of the shares and the subsets (the run seed).

    Returns
    -------
    ClientData
        ``task`` is the client's category, ``train`` its share of its file's examples and
        ``test`` its share of the ``test.jsonl`` examples of that category, both in file order.

    Raises
    ------
    ValueError
        One line naming what is wrong and what is allowed: missing folder or file, a number of
        partitions other than client files × ``clients_per_task``, invalid JSON (file and line),
        an invalid record (file, record index or line, key), training records of several
        categories, no test lines of the client's category, test lines of a category no client
        file holds, or a ``clients_per_task`` above the task's training examples or test lines
        (the key, the task and the counts).
    """
    partition_id, num_partitions = check_partition(partition_id, num_partitions)
    clients_per_task = check_int("clients-per-task", clients_per_task, 1)
    max_train = None if max_train is None else check_int("max-train-examples", max_train, 1)
    max_test = None if max_test is None else check_int("max-test-examples", max_test, 1)
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"data folder {folder}: not found; allowed: a folder with client_K.json files and {TEST_FILE}")
    files = _client_files(folder)
    ids = sorted(files)
    if len(ids) * clients_per_task != num_partitions:
        raise ValueError(
            f"num-partitions {num_partitions} but folder {folder} has {_describe(ids)} and clients-per-task is "
            f"{clients_per_task}; allowed: num-partitions = client files × clients-per-task "
            f"({len(ids)} × {clients_per_task} = {len(ids) * clients_per_task})"
        )
    file_id, member = divmod(partition_id, clients_per_task)
    if file_id not in files:
        raise ValueError(
            f"partition {partition_id}: folder {folder} has no client_{file_id}.json (it has {_describe(ids)})"
        )
    test_path = folder / TEST_FILE
    if not test_path.is_file():
        raise ValueError(
            f"data folder {folder}: no {TEST_FILE}; allowed: a folder with client_K.json files and {TEST_FILE}"
        )

    train = read_client_file(files[file_id])
    categories = sorted({example.task for example in train})
    if len(categories) != 1:
        raise ValueError(f"{files[file_id]}: categories {categories}; allowed: exactly one category per client file")
    category = categories[0]
    test_rows = _read_test_file(test_path.resolve())
    held = {other for path in files.values() for other in _categories(path.resolve())}
    orphans = sorted({example.task for example in test_rows} - held)
    if orphans:  # those lines would be evaluated by nobody: refuse rather than drop them
        count = sum(example.task == orphans[0] for example in test_rows)
        raise ValueError(
            f"{test_path}: {count} lines of category {orphans[0]!r}, which no client file holds; "
            f"allowed: the categories of the client files ({', '.join(sorted(held))})"
        )
    test = [example for example in test_rows if example.task == category]
    if not test:
        raise ValueError(f"{test_path}: no lines with category {category!r} (the category of client_{file_id}.json)")
    if clients_per_task > min(len(train), len(test)):  # a share would be empty
        raise not_allowed(
            "clients-per-task",
            clients_per_task,
            f"task {category!r} (client_{file_id}.json) has {len(train)} training examples and {len(test)} test "
            f"lines; allowed: at most {min(len(train), len(test))} clients for it",
        )
    # Every client of the task draws the same permutations (run seed, file), so the shares are disjoint.
    train = seeded_share(train, clients_per_task, member, (seed, file_id, 0))
    test = seeded_share(test, clients_per_task, member, (seed, file_id, 1))
    return ClientData(category, seeded_subset(train, max_train, seed), seeded_subset(test, max_test, seed))


def answer_options(instruction: str) -> list[str] | None:
    """The answer options a Flan instruction lists, or ``None``.

    Reads the last ``OPTIONS:`` line (any case, alone on its line) and the ``- option`` lines that
    directly follow it, e.g. ``"...\\nOPTIONS:\\n- yes\\n- it is not possible to tell\\n- no"``.

    Parameters
    ----------
    instruction : str
        The instruction text.

    Returns
    -------
    list of str or None
        The option strings in order (stripped), or ``None`` when there is no such list.
    """
    headings = list(_OPTIONS_HEADING.finditer(instruction))
    if not headings:
        return None
    options = []
    for line in instruction[headings[-1].end() :].split("\n")[1:]:
        text = line.strip()
        if not text.startswith("- ") or not text[2:].strip():
            break
        options.append(text[2:].strip())
    return options or None
