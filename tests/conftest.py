"""Shared fixtures."""

import pytest


@pytest.fixture
def server_identity(monkeypatch):
    # Messages read the sender's identity, which Flower's runtime sets in a real ServerApp.
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in {"_run_id": 1, "_node_id": 0, "_task_id": 1}.items():
        monkeypatch.setattr(TaskIdentity, name, value)
