"""FedAMP: attentive message passing between similar clients.

Huang et al., "Personalized Cross-Silo Federated Learning on Non-IID Data" (AAAI 2021),
heuristic FedAMP for deep networks. Client i keeps a personalized model wᵢ. The server
forms its personalized cloud model

    uᵢ = Σⱼ ξᵢⱼ wⱼ,   ξᵢⱼ = (1 − ξᵢᵢ) exp(σ cos(wᵢ, wⱼ)) / Σ_{h≠i} exp(σ cos(wᵢ, w_h))  (j ≠ i),

with the self weight ξᵢᵢ a hyper-parameter (Eq. 7 with the heuristic attention), and
client i solves  min_w Fᵢ(w) + λ/2 ‖w − uᵢ‖²  (Eq. 8, λ/αₖ written as one λ) to get
its new wᵢ. Here the models are the LoRA adapters; the client starts from uᵢ (the centre
of the proximal term) and the shared training loop adds the term, declared through the
message's ``proximal-mu``. The personalized model that is evaluated and saved is wᵢ.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO
from typing import Any

import numpy as np
from flwr.supercore import log

from fedbilevel import protocol
from fedbilevel.mixing import fedamp_cloud_models
from fedbilevel.options import number, option, validate
from fedbilevel.strategies.base import Adapter, PersonalizedStrategy


class FedAmp(PersonalizedStrategy):
    """HeurFedAMP over the clients that replied in a round.

    Parameters
    ----------
    proximal_lambda : float
        λ ≥ 0 of the client's proximal term λ/2 ‖w − uᵢ‖².
    sigma : float
        σ ≥ 0 of the attention exp(σ cos(wᵢ, wⱼ)).
    self_weight : float
        ξᵢᵢ in [0, 1], the weight of a client's own model in its cloud model.
    **kwargs
        Passed to :class:`~fedbilevel.strategies.base.PersonalizedStrategy`.
    """

    def __init__(self, *, proximal_lambda: float, sigma: float, self_weight: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if proximal_lambda < 0:
            raise ValueError(f"proximal_lambda: {proximal_lambda} is not allowed; expected a number ≥ 0")
        self.proximal_lambda = proximal_lambda
        self.sigma = sigma
        self.self_weight = self_weight
        self.personal = self.store.table("personal")  # partition id -> wᵢ (self.adapters holds uᵢ)

    def summary(self) -> None:
        """Log the FedAMP hyper-parameters."""
        log(INFO, "\t├──> FedAMP: λ %g, σ %g, self weight %g", self.proximal_lambda, self.sigma, self.self_weight)
        super().summary()

    def client_config(self) -> dict[str, Any]:
        """Ask clients for the proximal term around the received cloud model."""
        return {protocol.PROXIMAL_MU: self.proximal_lambda}

    def personalized_adapter(self, partition_id: int) -> Adapter:
        """wᵢ, the client's own trained model (θ⁰ before it first trained)."""
        return self.personal.get(partition_id, self.initial_adapter)

    def personalize(self, server_round: int, trained: dict[int, Adapter], weights: dict[int, float]) -> dict[str, Any]:
        """wᵢ ← the trained adapter; uᵢ ← Σⱼ ξᵢⱼ wⱼ over the clients that replied."""
        partitions = sorted(trained)
        self.personal.update(trained)
        clouds, cosine, attention = fedamp_cloud_models(
            [trained[p] for p in partitions], sigma=self.sigma, self_weight=self.self_weight
        )
        self.adapters.update(zip(partitions, clouds))
        with np.printoptions(precision=2, suppress=True):
            log(INFO, "round %d: FedAMP attention (rows/cols = clients %s):\n%s", server_round, partitions, attention)
        return {
            "participants": partitions,
            "similarity": cosine.round(6).tolist(),
            "weights": attention.round(6).tolist(),
        }


@dataclass(frozen=True)
class FedAmpSettings:
    """FedAMP's run-config options (Huang et al., AAAI 2021)."""

    proximal_lambda: float = option(
        "fedamp-lambda", 0.01, number(0.0, low_open=False), "FedAMP: λ of the proximal term λ/2 ‖w − uᵢ‖²"
    )
    sigma: float = option(
        "fedamp-sigma",
        50.0,
        number(0.0, low_open=False),
        "FedAMP: attention scale σ. Large because LoRA adapters share their random lora_A start, so model cosines "
        "crowd near 1 (0.87–0.95 after 3 rounds on the synthetic federation)",
    )
    self_weight: float = option(
        "fedamp-self-weight", 0.5, number(0.0, low_open=False, high=1.0, high_open=False), "FedAMP: self weight ξᵢᵢ"
    )

    def __post_init__(self) -> None:
        validate(self)
