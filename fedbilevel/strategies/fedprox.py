"""FedProx: FedAvg on the server, a proximal term in every client's loss.

Li et al., "Federated Optimization in Heterogeneous Networks" (MLSys 2020), Eq. (2): client
k minimises Fₖ(θ) + μ/2 ‖θ − θᵗ‖², with θᵗ the global adapter it received. The server
aggregates like FedAvg; the term is declared to clients through the train message's
``proximal-mu`` config value and added by the shared training loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedbilevel import protocol
from fedbilevel.options import number, option, validate
from fedbilevel.strategies.fedavg import FedAvg


class FedProx(FedAvg):
    """FedAvg whose train messages ask clients for the proximal term μ/2 ‖θ − θ_received‖².

    Parameters
    ----------
    proximal_mu : float
        μ ≥ 0; 0 makes this FedAvg.
    **kwargs
        Passed to :class:`~fedbilevel.strategies.base.PersonalizedStrategy`.
    """

    def __init__(self, *, proximal_mu: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if proximal_mu < 0:
            raise ValueError(f"proximal_mu: {proximal_mu} is not allowed; expected a number ≥ 0")
        self.proximal_mu = proximal_mu

    def client_config(self) -> dict[str, Any]:
        """Ask clients for the proximal term."""
        return {protocol.PROXIMAL_MU: self.proximal_mu}


@dataclass(frozen=True)
class FedProxSettings:
    """FedProx's run-config option."""

    mu: float = option(
        "proximal-mu", 0.01, number(0.0, low_open=False), "μ of FedProx's proximal term (`fedprox` only)"
    )

    def __post_init__(self) -> None:
        validate(self)
