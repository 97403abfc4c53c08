"""FedBip and FedBip-L: personalization by task-vector similarity.

Implements the aggregation of "Bi-level Personalization for Federated Foundation Models:
A Task-vector Aggregation Approach" (AAAI 2026): with τᵢ = θᵢ − θ̄ᵢ,

    pᵢₖ = cos(τᵢ, τₖ) / Σⱼ cos(τᵢ, τⱼ),        θ̄ᵢ ← θ̄ᵢ + Σₖ pᵢₖ τₖ,

over the flattened adapter (FedBip) or per layer group (FedBip-L). The math lives in
:mod:`fedbilevel.aggregation`; this class only feeds it the clients that replied.
"""

from __future__ import annotations

from collections.abc import Mapping
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
        self._smoothed = self.store.table("similarity-ema")  # partition i -> {str(k): cosine per group}
        # absent-client-rule = "remember": each client's last (start, trained) adapters and the round it trained in
        self._memory = self.store.table("task-vector-memory")
        self._trained_in: dict[int, int] = {}

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

    def personalize(self, server_round: int, trained: dict[int, Adapter], weights: dict[int, float]) -> dict[str, Any]:
        """θ̄ᵢ ← θ̄ᵢ + Σₖ pᵢₖ τₖ for the clients that replied (ascending partition id); k also runs over
        the remembered task vectors of absent clients with ``absent-client-rule = "remember"``."""
        partitions = sorted(trained)
        remembered = self._remembered(server_round, partitions)
        starts = [self.adapter_for(p) for p in partitions]
        ends = [trained[p] for p in partitions]
        for partition_id in remembered:
            memory = self._memory[partition_id]
            starts.append({name: memory[f"start/{name}"] for name in self.initial_adapter})
            ends.append({name: memory[f"trained/{name}"] for name in self.initial_adapter})
        columns = partitions + list(remembered)
        decay = self.settings.staleness_decay
        result = fedbip_aggregate_detailed(
            starts,
            ends,
            layerwise=self.layerwise,
            task_vector=self.settings.task_vector,
            initial=self.initial_adapter,
            grouping=self.settings.layer_grouping,
            similarity=self.settings.similarity_space,
            weighting=self.settings.weighting,
            smooth=self._smoother(columns, len(partitions)) if self.settings.similarity_ema else None,
            discount=[1.0] * len(partitions) + [decay**age for age in remembered.values()] if remembered else None,
            outputs=len(partitions),
            server_step=self.settings.server_step,
        )
        for partition_id, adapter in zip(partitions, result.adapters):
            self.adapters[partition_id] = adapter
        if self.settings.absent_rule == "remember":
            for partition_id, start, end in zip(partitions, starts, ends):
                self._memory[partition_id] = {
                    **{f"start/{name}": array for name, array in start.items()},
                    **{f"trained/{name}": array for name, array in end.items()},
                }
                self._trained_in[partition_id] = server_round
        with np.printoptions(precision=2, suppress=True):
            log(
                INFO,
                "round %d: FedBip weights (rows = clients %s, columns = clients %s%s):\n%s",
                server_round,
                partitions,
                columns,
                f", of which {list(remembered)} remembered" if remembered else "",
                result.weights,
            )
        fields = {
            "participants": partitions,
            "similarity": result.similarity[: len(partitions)].round(6).tolist(),
            "weights": result.weights.round(6).tolist(),
        }
        if result.server_steps is not None:
            fields["server_steps"] = result.server_steps.round(6).tolist()
        if result.step_lengths is not None:  # NaN (a zero update) becomes null
            fields["step_lengths"] = [None if np.isnan(v) else round(float(v), 6) for v in result.step_lengths]
        if remembered:
            fields["columns"] = columns
            fields["remembered"] = {str(p): age for p, age in remembered.items()}
        return fields

    def _remembered(self, server_round: int, partitions: list[int]) -> dict[int, int]:
        """Absent clients whose last task vector is still remembered -> its age in rounds (ascending id).

        Forgets (deletes from the store) the task vectors older than ``max-staleness``.
        """
        if self.settings.absent_rule != "remember":
            return {}
        ages = {p: server_round - trained_in for p, trained_in in self._trained_in.items() if p not in partitions}
        for partition_id in [p for p, age in ages.items() if age > self.settings.max_staleness]:
            del self._memory[partition_id], self._trained_in[partition_id]
        return {p: age for p, age in sorted(ages.items()) if age <= self.settings.max_staleness}

    def checkpoint(self) -> dict[str, Any]:
        """Also the round each remembered task vector was trained in."""
        return {**super().checkpoint(), "trained_in": {str(p): r for p, r in self._trained_in.items()}}

    def restore(self, meta: Mapping[str, Any]) -> None:
        """Also the rounds of the remembered task vectors."""
        super().restore(meta)
        self._trained_in = {int(p): int(r) for p, r in meta.get("trained_in", {}).items()}

    def _smoother(self, partitions: list[int], rows: int):
        """EMA of each client pair's cosines over the rounds both took part in (store kind
        ``similarity-ema``: client i -> its partner k's smoothed cosines under the name ``k``). Only the
        first ``rows`` clients (this round's) have their rows updated; the others lend their columns."""

        def smooth(cosines: np.ndarray) -> np.ndarray:
            previous = cosines.copy()  # a pair seen for the first time starts from its current cosine
            known = {i: dict(self._smoothed.get(i, {})) for i in partitions}
            for a, i in enumerate(partitions):
                for b, k in enumerate(partitions):
                    if str(k) in known[i]:
                        previous[:, a, b] = known[i][str(k)]
            smoothed = ema_similarity(previous, cosines, self.settings.similarity_ema)
            for a, i in enumerate(partitions[:rows]):
                known[i].update({str(k): smoothed[:, a, b] for b, k in enumerate(partitions)})
                self._smoothed[i] = known[i]
            return smoothed

        return smooth
