"""FedAvg of the LoRA adapters (FedIT when the base model is an instruction-tuned LLM).

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data" (AISTATS 2017), Eq. θ ← Σₖ (nₖ / n) θₖ; FedIT (Zhang et al., ICASSP 2024) applies it
to LoRA adapters of an instruction-tuned LLM. Every client receives the same global
adapter, so this is the non-personalized reference. nₖ is client k's training examples, or 1
for every client with ``aggregation-weights = "uniform"``.
"""

from __future__ import annotations

from typing import Any

from fedbilevel.mixing import weighted_average
from fedbilevel.strategies.base import Adapter, PersonalizedStrategy


class FedAvg(PersonalizedStrategy):
    """Weighted mean of the trained adapters (``aggregation-weights``), sent to every known client.

    The server keeps the one global adapter (store kind ``global``), not a copy per client.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.global_model = self.store.table("global")  # 0 -> θ, once aggregated

    def adapter_for(self, partition_id: int) -> Adapter:
        """θ, the same for every client (θ⁰ before the first aggregation)."""
        return self.global_model.get(0, self.initial_adapter)

    def personalize(self, server_round: int, trained: dict[int, Adapter], weights: dict[int, float]) -> dict[str, Any]:
        """θ ← Σₖ wₖ θₖ / Σₖ wₖ over the clients that replied (wₖ: ``weights``); every client gets θ."""
        partitions = sorted(trained)
        self.global_model[0] = weighted_average([trained[p] for p in partitions], [weights[p] for p in partitions])
        return {"participants": partitions}
