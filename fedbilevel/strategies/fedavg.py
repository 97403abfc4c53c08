"""FedAvg of the LoRA adapters (FedIT when the base model is an instruction-tuned LLM).

McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data" (AISTATS 2017), Eq. θ ← Σₖ (nₖ / n) θₖ; FedIT (Zhang et al., ICASSP 2024) applies it
to LoRA adapters of an instruction-tuned LLM. Every client receives the same global
adapter, so this is the non-personalized reference.
"""

from __future__ import annotations

from typing import Any

from fedbilevel.mixing import weighted_average
from fedbilevel.strategies.base import Adapter, PersonalizedStrategy


class FedAvg(PersonalizedStrategy):
    """Example-weighted mean of the trained adapters, sent to every known client."""

    def personalize(
        self, server_round: int, trained: dict[int, Adapter], num_examples: dict[int, int]
    ) -> dict[str, Any]:
        """θ ← Σₖ (nₖ / n) θₖ over the clients that replied; every client gets θ."""
        partitions = sorted(trained)
        global_adapter = weighted_average([trained[p] for p in partitions], [num_examples[p] for p in partitions])
        for partition_id in set(self.clients) | set(partitions):
            self.adapters[partition_id] = global_adapter
        return {"participants": partitions}
