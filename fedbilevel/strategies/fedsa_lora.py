"""FedSA-LoRA: share the LoRA A matrices, keep the B matrices on each client.

Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning" (ICLR 2025).
A LoRA update of a frozen weight W is ΔW = B A (A: r×in, drawn at random; B: out×r, zero at
first). The paper finds that the A matrices learn what the clients have in common and the B
matrices what is specific to each, so client k trains both factors but the server aggregates
only A; each Bₖ stays with its client. In round t the clients Sₜ that train start from the
shared Aᵗ and their own Bₖ, train them into (Aₖ, Bₖ′), and

    Aᵗ⁺¹ = Σ_{k∈Sₜ} nₖ Aₖ / Σ_{k∈Sₜ} nₖ   (nₖ: as FedAvg's, ``aggregation-weights``),
    Bₖ ← Bₖ′                             (k ∈ Sₜ; never sent to another client).

Client k's personalized model, what it evaluates and what is saved, is (Aᵗ⁺¹, Bₖ).
"""

from __future__ import annotations

import re
from logging import INFO
from typing import Any

from flwr.supercore import log

from fedbilevel.mixing import weighted_average
from fedbilevel.strategies.base import Adapter, PersonalizedStrategy

# peft's saved names of A factors: "...q_proj.lora_A.weight", an embedding's "...embed_tokens.lora_embedding_A".
_LORA_A = re.compile(r"(?:^|\.)lora_(?:embedding_)?A(?:\.|$)")


def is_lora_a(name: str) -> bool:
    """Whether an adapter array is a LoRA A factor (``lora_A`` or ``lora_embedding_A``), by peft's name."""
    return _LORA_A.search(name) is not None


def lora_a_names(adapter: Adapter, *, strategy: str) -> frozenset[str]:
    """The names of the A factors of ``adapter``; an adapter without any is refused (one line naming ``strategy``)."""
    names = frozenset(name for name in adapter if is_lora_a(name))
    if not names:
        raise ValueError(
            f"initial_adapter: no lora_A array among {len(adapter)} (e.g. {next(iter(adapter))!r}); "
            f"strategy '{strategy}' needs LoRA adapters with peft's lora_A / lora_B names"
        )
    return names


class FedSaLora(PersonalizedStrategy):
    """The weighted mean of the trained A matrices is shared; everything else stays with its client.

    Besides the B matrices, every other array of the adapter is kept local too: an image
    classifier's head (peft ``modules_to_save``), which is as task-specific as B is, and which
    the paper's code keeps on the client as well (its ``personalization.local_param`` lists
    ``classifier``). So "shared" means exactly the A factors.

    The server keeps the shared A matrices once (store kind ``shared``) and each client's own
    arrays (store kind ``local``). A client that did not train this round keeps its own arrays
    unchanged and receives the current shared A with them when it is next messaged; one that
    never trained has θ⁰'s B (zero) and head.

    Parameters
    ----------
    **kwargs
        Passed to :class:`~fedbilevel.strategies.base.PersonalizedStrategy`; its
        ``initial_adapter`` must have LoRA A factors.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.shared_names = lora_a_names(self.initial_adapter, strategy="fedsa-lora")
        self.shared = self.store.table("shared")  # 0 -> the A matrices, once aggregated
        self.local = self.store.table("local")  # partition id -> its B matrices and head

    def summary(self) -> None:
        """Log which arrays are shared."""
        log(
            INFO,
            "\t├──> FedSA-LoRA: %d lora_A arrays shared, the other %d (lora_B, an image head) kept per client",
            len(self.shared_names),
            len(self.initial_adapter) - len(self.shared_names),
        )
        super().summary()

    def adapter_for(self, partition_id: int) -> Adapter:
        """The shared A matrices with the client's own other arrays (θ⁰'s where none exist yet)."""
        shared = self.shared.get(0, self.initial_adapter)
        own = self.local.get(partition_id, self.initial_adapter)
        return {name: (shared if name in self.shared_names else own)[name] for name in self.initial_adapter}

    def personalize(self, server_round: int, trained: dict[int, Adapter], weights: dict[int, float]) -> dict[str, Any]:
        """A ← Σₖ wₖ Aₖ / Σₖ wₖ over the clients that trained; each keeps the rest of what it trained."""
        partitions = sorted(trained)
        self.shared[0] = weighted_average(
            [
                {name: trained[p][name] for name in self.initial_adapter if name in self.shared_names}
                for p in partitions
            ],
            [weights[p] for p in partitions],
        )
        for p in partitions:
            self.local[p] = {name: trained[p][name] for name in self.initial_adapter if name not in self.shared_names}
        return {"participants": partitions}
