"""FFA-LoRA: federated freeze-A LoRA, the A matrices fixed at θ⁰, only B trained and averaged.

Sun et al., "Improving LoRA in Privacy-preserving Federated Learning" (ICLR 2024). A LoRA update
of a frozen weight W is ΔW = B A. Averaging both factors is inexact, mean(Bₖ Aₖ) ≠ mean(Bₖ)
mean(Aₖ), and the product amplifies differential-privacy noise. FFA-LoRA keeps every client's A
at its common random initialisation A⁰ (θ⁰'s, drawn from the run seed) and trains only the
zero-initialised B, so the server's FedAvg is the exact mean of the clients' updates:

    Bᵗ⁺¹ = Σ_{k∈Sₜ} nₖ Bₖ / Σ_{k∈Sₜ} nₖ,   A = A⁰ always,   Σₖ (nₖ/n) Bₖ A⁰ = Bᵗ⁺¹ A⁰,

over the clients Sₜ that trained in round t, which trained from (A⁰, Bᵗ) (nₖ: as FedAvg's,
``aggregation-weights``). The clients are told
to leave A untouched through the message's ``freeze-lora-a`` (the shared training loop then
trains with the lora_A parameters frozen). Every client receives the same adapter, as with FedAvg.
"""

from __future__ import annotations

from logging import INFO
from typing import Any

from flwr.supercore import log

from fedbilevel import protocol
from fedbilevel.mixing import weighted_average
from fedbilevel.strategies.base import Adapter
from fedbilevel.strategies.fedavg import FedAvg
from fedbilevel.strategies.fedsa_lora import lora_a_names


class FfaLora(FedAvg):
    """FedAvg of everything but the A matrices, which stay θ⁰'s; clients train with A frozen.

    An image classifier's head (peft ``modules_to_save``) is trained and averaged like the B
    matrices: the paper freezes A only, and a full weight's mean is exact, as B's is with A
    fixed. The aggregate's A arrays are θ⁰'s whatever a reply carries, so a client that moved
    A anyway cannot move the shared one.

    Parameters
    ----------
    **kwargs
        Passed to :class:`~fedbilevel.strategies.base.PersonalizedStrategy`; its
        ``initial_adapter`` must have LoRA A factors.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.frozen_names = lora_a_names(self.initial_adapter, strategy="ffa-lora")

    def summary(self) -> None:
        """Log which arrays are frozen."""
        log(
            INFO,
            "\t├──> FFA-LoRA: %d lora_A arrays frozen at θ⁰, the other %d (lora_B, an image head) trained and averaged",
            len(self.frozen_names),
            len(self.initial_adapter) - len(self.frozen_names),
        )
        super().summary()

    def client_config(self) -> dict[str, Any]:
        """Ask clients to train with the lora_A parameters frozen."""
        return {protocol.FREEZE_LORA_A: True}

    def personalize(self, server_round: int, trained: dict[int, Adapter], weights: dict[int, float]) -> dict[str, Any]:
        """B (and head) ← Σₖ wₖ Bₖ / Σₖ wₖ over the clients that trained; A ← A⁰."""
        partitions = sorted(trained)
        averaged = [name for name in self.initial_adapter if name not in self.frozen_names]
        mean = weighted_average(
            [{name: trained[p][name] for name in averaged} for p in partitions], [weights[p] for p in partitions]
        )
        self.global_model[0] = {
            name: self.initial_adapter[name] if name in self.frozen_names else mean[name]
            for name in self.initial_adapter
        }
        return {"participants": partitions}
