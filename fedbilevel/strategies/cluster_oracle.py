"""Cluster oracle: FedAvg inside the true task groups (an upper reference, not a method).

Uses the task label each client reports, which a real federation would not reveal: client
i gets θ̄ᵢ ← θ̄ᵢ + (1/|gᵢ|) Σ_{k∈gᵢ} τₖ over the clients gᵢ of its task that replied this
round (τₖ = θₖ − θ̄ₖ), i.e. FedBip with the similarity weights replaced by perfect task
clustering. A personalization rule that finds the clusters itself can at best match it.
"""

from __future__ import annotations

from typing import Any

from fedbilevel import protocol
from fedbilevel.mixing import group_weights, mix_adapters
from fedbilevel.strategies.base import Adapter, PersonalizedStrategy


class ClusterOracle(PersonalizedStrategy):
    """Average the round's task vectors within each true task group."""

    def personalize(self, server_round: int, trained: dict[int, Adapter], weights: dict[int, float]) -> dict[str, Any]:
        """θ̄ᵢ ← θ̄ᵢ + mean of τₖ over the replying clients with client i's task."""
        partitions = sorted(trained)
        labels = [self.clients.get(p, {}).get(protocol.TASK) for p in partitions]
        unlabelled = [p for p, label in zip(partitions, labels) if label is None]
        if unlabelled:
            raise ValueError(
                f"strategy 'cluster-oracle': client {unlabelled[0]} reported no task label; it needs data with tasks"
            )
        starts = [self.adapter_for(p) for p in partitions]
        task_vectors = [
            {name: trained[p][name] - start[name] for name in start} for p, start in zip(partitions, starts)
        ]
        weights = group_weights(labels)
        for partition_id, start, update in zip(partitions, starts, mix_adapters(task_vectors, weights)):
            self.adapters[partition_id] = {
                name: (start[name] + update[name]).astype(start[name].dtype) for name in start
            }
        return {"participants": partitions, "weights": weights.round(6).tolist()}
