"""Server state on disk: a per-client store and the checkpoint record a resumed run starts from.

A strategy keeps its per-client arrays (personalized adapters, FedAMP's own models, FedBip's
remembered task vectors and smoothed cosines) in a :class:`ClientStore`: one safetensors file
per client and kind, so that the server holds only the round's clients in memory and a round
writes only what changed in it.

Layout of a run folder::

    store/<kind>/<partition id>.r<round>.safetensors   one client's arrays of one kind
    checkpoint.json                                      the completed round, the clients' info,
                                                         the strategy's small state and the
                                                         manifest: kind -> partition id -> round

Copy on write: a client whose state changed in round t gets a new file ``…r<t>``, written to a
temporary name and renamed; ``checkpoint.json`` (also renamed into place) then names it, and
only after that are the files no record names any more deleted. A crash at any point leaves
the last ``checkpoint.json`` and every file it names intact. Nothing else needs saving: every
random choice (data, initial adapter, each client's training) is derived from the run seed,
the partition id and the round number.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

CHECKPOINT = "checkpoint.json"
STORE = "store"
_SUFFIX = ".safetensors"

Arrays = dict[str, np.ndarray]
Manifest = dict[str, dict[int, int]]  # kind -> partition id -> round of its file


class ClientTable(MutableMapping[int, Arrays]):
    """One kind of per-client arrays (e.g. ``adapters``): partition id -> named arrays.

    Writes stay in memory until the next :meth:`ClientStore.flush`; a read of anything else
    loads the client's file each time (not kept: a pass over every client, e.g. the final
    export, holds one client at a time). Without a folder everything stays in memory.
    """

    def __init__(self, store: ClientStore, kind: str) -> None:
        self._store = store
        self.kind = kind
        self._saved: dict[int, int] = {}  # partition id -> round of its file
        self._cache: dict[int, Arrays] = {}  # written since the last flush

    def __getitem__(self, partition_id: int) -> Arrays:
        if partition_id in self._cache:
            return self._cache[partition_id]
        if partition_id not in self._saved:
            raise KeyError(partition_id)
        return _read(self._store.path(self.kind, partition_id, self._saved[partition_id]))

    def __setitem__(self, partition_id: int, arrays: Mapping[str, np.ndarray]) -> None:
        self._cache[int(partition_id)] = dict(arrays)

    def __delitem__(self, partition_id: int) -> None:
        if partition_id not in self:
            raise KeyError(partition_id)
        self._cache.pop(partition_id, None)
        self._saved.pop(partition_id, None)

    def __contains__(self, partition_id: object) -> bool:
        return partition_id in self._cache or partition_id in self._saved

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(set(self._saved) | set(self._cache)))

    def __len__(self) -> int:
        return len(set(self._saved) | set(self._cache))

    def in_memory(self) -> int:
        """How many clients' arrays this table holds in memory now."""
        return len(self._cache)

    def _flush(self, version: int) -> None:
        folder = self._store.folder
        if folder is None:
            return
        (folder / self.kind).mkdir(parents=True, exist_ok=True)
        for partition_id, arrays in sorted(self._cache.items()):
            _write_atomically(self._store.path(self.kind, partition_id, version), arrays)
            self._saved[partition_id] = version
        self._cache.clear()


class ClientStore:
    """Per-client arrays of several kinds, on disk under ``folder`` (in memory only when it is None).

    Parameters
    ----------
    folder : Path, optional
        Where the files go (a run's ``store/``); :meth:`attach` sets it later.
    """

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self._tables: dict[str, ClientTable] = {}

    def table(self, kind: str) -> ClientTable:
        """The table of one kind (created empty the first time)."""
        if kind not in self._tables:
            self._tables[kind] = ClientTable(self, kind)
        return self._tables[kind]

    def attach(self, folder: Path) -> None:
        """Keep the arrays under ``folder`` from now on (what is in memory is written at the next flush)."""
        self.folder = Path(folder)

    def path(self, kind: str, partition_id: int, version: int) -> Path:
        """The file of one client's arrays of one kind, as written after round ``version``."""
        return self.folder / kind / f"{partition_id}.r{version}{_SUFFIX}"

    def flush(self, version: int) -> Manifest:
        """Write what changed since the last flush as round ``version``'s files; drop the arrays from
        memory. Returns the manifest a checkpoint record keeps (empty without a folder)."""
        for table in self._tables.values():
            table._flush(version)
        return self.manifest()

    def manifest(self) -> Manifest:
        """kind -> partition id -> round of its file, for the files written so far."""
        return {kind: dict(table._saved) for kind, table in self._tables.items() if table._saved}

    def load(self, manifest: Mapping[str, Mapping[str | int, int]]) -> None:
        """Continue from a checkpoint's manifest: its files, nothing in memory; every file must exist."""
        if self.folder is None:
            raise ValueError("ClientStore.load: attach a folder first")
        for table in self._tables.values():  # the strategy holds its tables: refill them, not replace them
            table._saved, table._cache = {}, {}
        for kind, saved in manifest.items():
            table = self.table(kind)
            table._saved = {int(partition_id): int(version) for partition_id, version in saved.items()}
            for partition_id, version in table._saved.items():
                if not self.path(kind, partition_id, version).is_file():
                    raise ValueError(
                        f"checkpoint: {self.path(kind, partition_id, version)} is missing; the store of this run "
                        "is incomplete (restore the folder or start a new run)"
                    )


def save_checkpoint(run_dir: Path, meta: Mapping[str, Any]) -> Path:
    """Write ``run_dir/checkpoint.json`` atomically, then delete the store files it no longer names.

    ``meta["store"]`` is the :meth:`ClientStore.flush` manifest of the round (written before).
    """
    path = Path(run_dir) / CHECKPOINT
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
        json.dump(meta, handle)
        temporary = handle.name
    os.replace(temporary, path)
    _collect(Path(run_dir) / STORE, meta.get("store", {}))
    return path


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """The record of ``run_dir/checkpoint.json`` (its store's manifest under ``store``)."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        older = " (its checkpoint.npz was written by fedbilevel 0.1: resume it with that version)"
        raise ValueError(
            f"run-config key 'resume-from': {str(run_dir)!r} has no {CHECKPOINT}; "
            "expected the folder of a run that finished a round"
            + (older if (Path(run_dir) / "checkpoint.npz").is_file() else "")
        )
    return json.loads(path.read_text())


def _write_atomically(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
        temporary = handle.name
    # safetensors sorts the names; the order (which digests and messages follow) goes in the metadata.
    order = json.dumps(list(arrays))
    save_file({name: np.ascontiguousarray(array) for name, array in arrays.items()}, temporary, {"order": order})
    os.replace(temporary, path)


def _read(path: Path) -> Arrays:
    with safe_open(path, framework="np") as handle:
        return {name: handle.get_tensor(name) for name in json.loads(handle.metadata()["order"])}


def _collect(folder: Path, manifest: Mapping[str, Mapping[str | int, int]]) -> None:
    """Delete the store files (and temporary files of a crashed write) that ``manifest`` does not name."""
    if not folder.is_dir():
        return
    for kind_folder in folder.iterdir():
        named = {f"{p}.r{v}{_SUFFIX}" for p, v in manifest.get(kind_folder.name, {}).items()}
        for file in kind_folder.iterdir():
            if file.name not in named:
                file.unlink()
