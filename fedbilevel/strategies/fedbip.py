"""FedBip and FedBip-L: personalization by task-vector similarity.

Implements the aggregation of "Bi-level Personalization for Federated Foundation Models:
A Task-vector Aggregation Approach" (AAAI 2026): with τᵢ = θᵢ − θ̄ᵢ,

    pᵢₖ = cos(τᵢ, τₖ) / Σⱼ cos(τᵢ, τⱼ),        θ̄ᵢ ← θ̄ᵢ + Σₖ pᵢₖ τₖ,

over the flattened adapter (FedBip) or per layer group (FedBip-L). The math lives in
:mod:`fedbilevel.aggregation`; this class only feeds it the clients that replied.
"""

from __future__ import annotations

from logging import INFO
from typing import Any

import numpy as np
from flwr.supercore import log

from fedbilevel.aggregation import fedbip_aggregate_detailed
from fedbilevel.strategies.personalized import Adapter, PersonalizedStrategy


class FedBip(PersonalizedStrategy):
    """FedBip (``layerwise=False``) or FedBip-L (``layerwise=True``).

    Parameters
    ----------
    layerwise : bool (default: False)
        Weight each layer group separately (FedBip-L).
    negative_cosine : {"clip", "keep"} (default: "clip")
        How negative cosines enter the weights (see :mod:`fedbilevel.aggregation`).
    task_vector : {"round", "cumulative"} (default: "round")
        τ relative to this round's start θ̄ᵢ, or to the initial adapter θ⁰.
    layer_grouping : {"array", "block"} (default: "array")
        FedBip-L groups: each named adapter array, or each transformer block.
    similarity_space : {"flat", "lora-product"} (default: "flat")
        Cosine of the raw adapter parameters, or of the effective LoRA updates ΔW = B·A
        (computed through r×r products, never forming ΔW).
    **kwargs
        Passed to :class:`PersonalizedStrategy` (``initial_adapter``, ``min_nodes``, ...).
    """

    def __init__(
        self,
        *,
        layerwise: bool = False,
        negative_cosine: str = "clip",
        task_vector: str = "round",
        layer_grouping: str = "array",
        similarity_space: str = "flat",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.layerwise = layerwise
        self.negative_cosine = negative_cosine
        self.task_vector = task_vector
        self.layer_grouping = layer_grouping
        self.similarity_space = similarity_space

    def summary(self) -> None:
        """Log the FedBip options."""
        log(
            INFO,
            "\t├──> FedBip%s: similarity '%s', negative cosines '%s', task vector '%s'%s",
            "-L" if self.layerwise else "",
            self.similarity_space,
            self.negative_cosine,
            self.task_vector,
            f", layer groups '{self.layer_grouping}'" if self.layerwise else "",
        )
        super().summary()

    def personalize(self, server_round: int, trained: dict[int, Adapter], num_examples: dict[int, int]) -> dict[str, Any]:
        """θ̄ᵢ ← θ̄ᵢ + Σₖ pᵢₖ τₖ over the clients that replied (ascending partition id)."""
        partitions = sorted(trained)
        result = fedbip_aggregate_detailed(
            [self.adapter_for(p) for p in partitions],
            [trained[p] for p in partitions],
            layerwise=self.layerwise,
            negative=self.negative_cosine,
            task_vector=self.task_vector,
            initial=self.initial_adapter,
            grouping=self.layer_grouping,
            similarity=self.similarity_space,
        )
        for partition_id, adapter in zip(partitions, result.adapters):
            self.adapters[partition_id] = adapter
        with np.printoptions(precision=2, suppress=True):
            log(INFO, "round %d: FedBip weights (rows/cols = clients %s):\n%s", server_round, partitions, result.weights)
        return {
            "participants": partitions,
            "similarity": result.similarity.round(6).tolist(),
            "weights": result.weights.round(6).tolist(),
        }
