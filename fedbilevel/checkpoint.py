"""Server checkpoints: everything a run needs to continue after a crash, in one atomic file.

``<run>/checkpoint.npz`` holds the strategy's per-client state (personalized adapters and
whatever else the strategy keeps, e.g. FedAMP's own models, FedBip's smoothed
similarities) as named arrays, plus a JSON record of the completed round and the
clients' info. It is written to a temporary file in the same folder and renamed, so a
crash leaves either the previous checkpoint or the new one, never a mix. Nothing else
needs saving: every random choice (data, initial adapter, each client's training) is
derived from the run seed, the partition id and the round number.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

CHECKPOINT = "checkpoint.npz"
_META = "__meta__"


def save_checkpoint(run_dir: Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Path:
    """Write ``run_dir/checkpoint.npz`` atomically (temporary file, then rename)."""
    if _META in arrays:
        raise ValueError(f"arrays: the name {_META!r} is reserved")
    path = Path(run_dir) / CHECKPOINT
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
        np.savez(handle, **arrays, **{_META: np.array(json.dumps(dict(meta)))})
        temporary = handle.name
    os.replace(temporary, path)
    return path


def load_checkpoint(run_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and the JSON record of ``run_dir/checkpoint.npz``."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise ValueError(
            f"run-config key 'resume-from': {str(run_dir)!r} has no {CHECKPOINT}; "
            "expected the folder of a run that finished a round"
        )
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files if name != _META}
        meta = json.loads(str(data[_META]))
    return arrays, meta
