"""The tiny end-to-end simulation the test_simulation*.py files share: 4 clients, 2 synthetic tasks."""

from __future__ import annotations

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
