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
from fedbilevel.strategies.base import Adapter, PersonalizedStrategy
from fedbilevel.weighting import Weighting, check_ema_decay, ema_similarity


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
    weighting : Weighting, optional
        A weighting rule other than the paper's (:class:`fedbilevel.weighting.Weighting`);
        then ``negative_cosine`` must be left at "clip" and set inside it.
    similarity_ema : float (default: 0.0)
        Decay in [0, 1) of an exponential moving average of each client pair's cosines
        across rounds (0: this round's cosines only).
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
        weighting: Weighting | None = None,
        similarity_ema: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.layerwise = layerwise
        self.task_vector = task_vector
        self.layer_grouping = layer_grouping
        self.similarity_space = similarity_space
        if weighting is not None and negative_cosine != "clip":
            raise ValueError(f"negative_cosine: {negative_cosine!r} is not allowed together with weighting; set Weighting(negative=...)")
        self.weighting = weighting or Weighting(negative=negative_cosine)
        check_ema_decay(similarity_ema)
        self.similarity_ema = similarity_ema
        self._smoothed: dict[tuple[int, int], np.ndarray] = {}  # (partition i, partition k) -> cosine per group

    def summary(self) -> None:
        """Log the FedBip options."""
        log(
            INFO,
            "\t├──> FedBip%s: similarity '%s', negative cosines '%s', task vector '%s'%s",
            "-L" if self.layerwise else "",
            self.similarity_space,
            self.weighting.negative,
            self.task_vector,
            f", layer groups '{self.layer_grouping}'" if self.layerwise else "",
        )
        if not self.weighting.is_paper or self.similarity_ema:
            log(INFO, "\t├──> weights: %s, similarity EMA decay %g", self.weighting, self.similarity_ema)
        super().summary()

    def personalize(self, server_round: int, trained: dict[int, Adapter], num_examples: dict[int, int]) -> dict[str, Any]:
        """θ̄ᵢ ← θ̄ᵢ + Σₖ pᵢₖ τₖ over the clients that replied (ascending partition id)."""
        partitions = sorted(trained)
        result = fedbip_aggregate_detailed(
            [self.adapter_for(p) for p in partitions],
            [trained[p] for p in partitions],
            layerwise=self.layerwise,
            task_vector=self.task_vector,
            initial=self.initial_adapter,
            grouping=self.layer_grouping,
            similarity=self.similarity_space,
            weighting=self.weighting,
            smooth=self._smoother(partitions) if self.similarity_ema else None,
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
            smoothed = ema_similarity(previous, cosines, self.similarity_ema)
            for a, b, pair in pairs:
                self._smoothed[pair] = smoothed[:, a, b]
            return smoothed

        return smooth
