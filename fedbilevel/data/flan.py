"""The FedDPA "flan-json" federation folder: ``client_K.json`` train files and one ``test.jsonl``.

Client K trains on ``client_K.json`` (a JSON list of records) and is evaluated on the lines of
``test.jsonl`` whose ``"category"`` is its own. Records have the keys ``instruction``, ``output``,
``task`` (the source FLAN dataset) and ``category`` (the task group a client holds); the category is
what the federation's personalisation is about, so it is the task label of the examples.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path

from fedbilevel.data.common import check_int, check_partition, seeded_subset
from fedbilevel.data.types import ClientData, Example

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
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
) -> ClientData:
    """Client ``partition_id``'s data from a flan-json folder.

    Parameters
    ----------
    folder : str or Path
        Folder with ``client_0.json`` .. ``client_<num_partitions-1>.json`` and ``test.jsonl``.
    partition_id : int
        The client, ``0 <= partition_id < num_partitions``; it trains on ``client_<partition_id>.json``.
    num_partitions : int
        Number of clients; must equal the number of client files.
    max_train, max_test : int or None, optional
        Keep at most this many train / test examples, chosen by :func:`seeded_subset` (the same
        items in every run with that seed); ``None`` keeps all.
    seed : int, optional
        Seed of the subsets.

    Returns
    -------
    ClientData
        ``task`` is the client's category, ``train`` its file's examples and ``test`` the
        ``test.jsonl`` examples of that category, both in file order.

    Raises
    ------
    ValueError
        One line naming what is wrong and what is allowed: missing folder or file, a number of
        client files other than ``num_partitions``, invalid JSON (file and line), an invalid
        record (file, record index or line, key), training records of several categories, no
        test lines of the client's category, or test lines of a category no client file holds.
    """
    partition_id, num_partitions = check_partition(partition_id, num_partitions)
    max_train = None if max_train is None else check_int("max-train-examples", max_train, 1)
    max_test = None if max_test is None else check_int("max-test-examples", max_test, 1)
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"data folder {folder}: not found; allowed: a folder with client_K.json files and {TEST_FILE}")
    files = _client_files(folder)
    ids = sorted(files)
    if len(ids) != num_partitions:
        raise ValueError(
            f"num-partitions {num_partitions} but folder {folder} has {_describe(ids)}; "
            "allowed: one client file per partition"
        )
    if partition_id not in files:
        raise ValueError(
            f"partition {partition_id}: folder {folder} has no client_{partition_id}.json (it has {_describe(ids)})"
        )
    test_path = folder / TEST_FILE
    if not test_path.is_file():
        raise ValueError(
            f"data folder {folder}: no {TEST_FILE}; allowed: a folder with client_K.json files and {TEST_FILE}"
        )

    train = read_client_file(files[partition_id])
    categories = sorted({example.task for example in train})
    if len(categories) != 1:
        raise ValueError(
            f"{files[partition_id]}: categories {categories}; allowed: exactly one category per client file"
        )
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
        raise ValueError(
            f"{test_path}: no lines with category {category!r} (the category of client_{partition_id}.json)"
        )
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
