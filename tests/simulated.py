"""The tiny end-to-end simulation the test_simulation*.py files share: 4 clients, 2 synthetic tasks."""

from __future__ import annotations

import json
from pathlib import Path

from fedbilevel.config import load_app_config
from fedbilevel.models.zoo import TINY_MODEL
from fedbilevel.simulation import simulate as run_in_simulation

ROOT = Path(__file__).resolve().parents[1]
FLAN8 = ROOT.parent / "shared" / "data" / "flan8"
NUM_CLIENTS = 4
ROUNDS = 2


def simulate(tmp_path: Path, harness: dict | None = None, **overrides) -> tuple[dict, Path]:
    """Run the tiny federation through flwr run in ``tmp_path/e2e``; return its run config and folder."""
    config = {
        **load_app_config(ROOT / "pyproject.toml"),
        "model-name": TINY_MODEL,
        "precision": "fp32",
        "num-server-rounds": ROUNDS,
        "synthetic-tasks": "reverse,uppercase",  # clients 0,1 reverse; 2,3 uppercase
        "synthetic-train-examples": 16,
        "synthetic-test-examples": 6,
        "local-steps": 4,
        "learning-rate": 0.01,
        "eval-max-new-tokens": 6,
        "output-dir": str(tmp_path),
        "run-name": "e2e",
        **overrides,
    }
    run_in_simulation(config, num_supernodes=NUM_CLIENTS, **(harness or {}))
    return config, tmp_path / "e2e"


def flan_without_test_lines_for_client_2(folder: Path) -> Path:
    """A 3-client flan-json folder (categories alpha, beta, gamma; 4 training examples each) whose
    test.jsonl has one line for alpha and one for beta, none for client 2's gamma."""
    folder.mkdir()
    for k, category in enumerate(["alpha", "beta", "gamma"]):
        records = [
            {"instruction": f"Say {category} {i}", "output": category, "task": "t", "category": category}
            for i in range(4)
        ]
        (folder / f"client_{k}.json").write_text(json.dumps(records))
    lines = [{"instruction": f"Say {c}", "output": c, "task": "t", "category": c} for c in ("alpha", "beta")]
    (folder / "test.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return folder
