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

from fedbilevel.aggregation import FedBipSettings, fedbip_aggregate_detailed
from fedbilevel.strategies.base import Adapter, PersonalizedStrategy
from fedbilevel.weighting import ema_similarity


class FedBip(PersonalizedStrategy):
    """FedBip (``layerwise=False``) or FedBip-L (``layerwise=True``).

    Parameters
    ----------
    layerwise : bool (default: False)
        Weight each layer group separately (FedBip-L).
    settings : FedBipSettings (default: the paper's choices)
        The task vector (round or cumulative), FedBip-L's layer groups, the similarity space,
        the cosine moving average and the weighting rule with its handling of negative
        cosines (:class:`fedbilevel.aggregation.FedBipSettings`, validated there).
    **kwargs
        Passed to :class:`PersonalizedStrategy` (``initial_adapter``, ``min_nodes``, ...).
    """

    def __init__(self, *, layerwise: bool = False, settings: FedBipSettings | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.layerwise = layerwise
        self.settings = settings or FedBipSettings()
        self._smoothed: dict[tuple[int, int], np.ndarray] = {}  # (partition i, partition k) -> cosine per group

    def summary(self) -> None:
        """Log the FedBip options."""
        log(
            INFO,
            "\t├──> FedBip%s: similarity '%s', negative cosines '%s', task vector '%s'%s",
            "-L" if self.layerwise else "",
            self.settings.similarity_space,
            self.settings.weighting.negative,
            self.settings.task_vector,
            f", layer groups '{self.settings.layer_grouping}'" if self.layerwise else "",
        )
        if not self.settings.weighting.is_paper or self.settings.similarity_ema:
            log(
                INFO,
                "\t├──> weights: %s, similarity EMA decay %g",
                self.settings.weighting,
                self.settings.similarity_ema,
            )
        super().summary()

    def personalize(
        self, server_round: int, trained: dict[int, Adapter], num_examples: dict[int, int]
    ) -> dict[str, Any]:
        """θ̄ᵢ ← θ̄ᵢ + Σₖ pᵢₖ τₖ over the clients that replied (ascending partition id)."""
        partitions = sorted(trained)
        result = fedbip_aggregate_detailed(
            [self.adapter_for(p) for p in partitions],
            [trained[p] for p in partitions],
            layerwise=self.layerwise,
            task_vector=self.settings.task_vector,
            initial=self.initial_adapter,
            grouping=self.settings.layer_grouping,
            similarity=self.settings.similarity_space,
            weighting=self.settings.weighting,
            smooth=self._smoother(partitions) if self.settings.similarity_ema else None,
        )
        for partition_id, adapter in zip(partitions, result.adapters):
            self.adapters[partition_id] = adapter
        with np.printoptions(precision=2, suppress=True):
            log(
                INFO, "round %d: FedBip weights (rows/cols = clients %s):\n%s", server_round, partitions, result.weights
            )
        return {
            "participants": partitions,
            "similarity": result.similarity.round(6).tolist(),
            "weights": result.weights.round(6).tolist(),
        }

    def checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Also the smoothed cosine of every client pair (``ema/<i>-<k>``)."""
        arrays, meta = super().checkpoint()
        arrays.update({f"ema/{i}-{k}": values for (i, k), values in self._smoothed.items()})
        return arrays, meta

    def restore(self, arrays, meta) -> None:
        """Also the smoothed cosines."""
        super().restore(arrays, meta)
        pairs = (key.removeprefix("ema/").split("-") for key in arrays if key.startswith("ema/"))
        self._smoothed = {(int(i), int(k)): arrays[f"ema/{i}-{k}"] for i, k in pairs}

    def _smoother(self, partitions: list[int]):
        """EMA of each client pair's cosines over the rounds both took part in (keyed by partition ids)."""

        def smooth(cosines: np.ndarray) -> np.ndarray:
            previous = cosines.copy()  # a pair seen for the first time starts from its current cosine
            pairs = [(a, b, (i, k)) for a, i in enumerate(partitions) for b, k in enumerate(partitions)]
            for a, b, pair in pairs:
                if pair in self._smoothed:
                    previous[:, a, b] = self._smoothed[pair]
            smoothed = ema_similarity(previous, cosines, self.settings.similarity_ema)
            for a, b, pair in pairs:
                self._smoothed[pair] = smoothed[:, a, b]
            return smoothed

        return smooth
