"""FedALA: FedAvg on the server, adaptive local aggregation on every client.

Zhang et al., "FedALA: Adaptive Local Aggregation for Personalized Federated Learning"
(AAAI 2023). The server aggregates like FedAvg (Eq. 1) and sends every client the global
adapter Θ; client i replaces the usual "overwrite with Θ" by the ALA step
θ̂ᵢ = θᵢ + (Θ − θᵢ) ⊙ Wᵢ with learned element-wise weights Wᵢ (Eq. 4–6), implemented in
:mod:`fedbilevel.client.ala` and switched on by the ``fedala-*`` values this strategy
puts in every train and evaluate message. θ̂ᵢ, the personalized model, lives on the
client; the server only ever holds Θ, which is what it saves for each client.
"""

from __future__ import annotations

from logging import INFO
from typing import Any

from flwr.supercore import log

from fedbilevel.protocol import AlaSettings
from fedbilevel.strategies.fedavg import FedAvg


class FedAla(FedAvg):
    """FedAvg whose messages ask clients for adaptive local aggregation.

    Parameters
    ----------
    ala : AlaSettings
        η, the data fraction s, the fraction of top blocks mixed, and the epochs of the
        first weight learning.
    **kwargs
        Passed to :class:`~fedbilevel.strategies.base.PersonalizedStrategy`.
    """

    def __init__(self, *, ala: AlaSettings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ala = ala

    def summary(self) -> None:
        """Log the ALA settings."""
        log(INFO, "\t├──> FedALA: %s", ", ".join(f"{k} {v}" for k, v in self.ala.to_config().items()))
        super().summary()

    def client_config(self) -> dict[str, Any]:
        """Switch on ALA at the clients."""
        return self.ala.to_config()
