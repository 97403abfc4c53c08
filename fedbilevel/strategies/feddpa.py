"""FedDPA: a global adapter trained federatedly and a local adapter per client, mixed per test input.

Yang et al., "Dual-Personalizing Adapter for Federated Foundation Models" (NeurIPS 2024; code:
github.com/Lydia-yang/FedDPA). Client i holds the frozen base model W₀, the global adapter
ΔW_g = B_g A_g, shared by every client, and its local adapter ΔW_l = B_l A_l, its own. The paper
learns the local adapter in one of two ways; this module implements **FedDPA-T**, the one the
official training script runs (``main.py --local_model True``), whose adapters both change every
round. In round t each client i of Sₜ starts from the global adapter θ_gᵗ it receives and its own θ_lⁱ:

1. local phase (from round 2 on, as ``epoch > 0`` in the official script): θ_lⁱ trains on
   ``h = W₀x + (1 − a)·ΔW_g x + a·ΔW_l x`` with the global adapter frozen (a: ``feddpa-local-weight``);
2. global phase: θ_g trains from θ_gᵗ alone, ``h = W₀x + ΔW_g x`` (FedIT's step), into θ_gⁱ;

each for ``local-steps`` steps (the official script trains each for its local epochs). The server
averages the global adapters and keeps each local one:

    θ_gᵗ⁺¹ = Σ_{i∈Sₜ} nᵢ θ_gⁱ / Σ_{i∈Sₜ} nᵢ,   θ_lⁱ ← the trained θ_lⁱ (i ∈ Sₜ; sent to no other client),

with nᵢ client i's training examples, or 1 for every client with ``aggregation-weights =
"uniform"`` (the official code's plain mean).

At inference the two are mixed per test input x (the instance-wise dynamic weighting): with E(·)
the last hidden state at the position the prediction reads (a causal LM's last prompt token, the
official ``emb_type='last'``; a ViT's [CLS] token), computed with the local adapter alone, and
x₁, …, x_N training inputs of the client drawn at random,

    α(x) = β · (1/N) Σⱼ cos(E(x), E(xⱼ)),   h = W₀x + α(x)·ΔW_g x + (1 − α(x))·ΔW_l x,

N = ``feddpa-instances`` (the script's ``instance_num``, 5) and β = ``feddpa-max-weight`` (its
``max_weight``, 0.5). α weighs the *global* adapter as the official script does
(``GlobalModel_generated.py``: ``get_weight`` returns β·mean cos, then ``set_local(['local'],
[weight, 1 - weight])`` with the global adapter active, whose LoRA layer scales the active adapter
by the first weight). The client side is :mod:`fedbilevel.client.feddpa`.

Where this differs from the official code: the global mean is example-weighted by default (the
script's is uniform, as ``aggregation-weights = "uniform"`` gives; its Flan clients hold 300 examples
each, where the two agree); the N training inputs are
drawn once per evaluation, not anew for each test input (the same expected α, N forward passes
instead of N per test item); a client's local adapter starts as θ⁰ (B zero, so a zero update, as
the script's freshly drawn one); and the server stores each client's local adapter between rounds,
as this framework keeps all per-client state (FedSA-LoRA's B matrices likewise), where the paper's
client keeps it.

The other variant, **FedDPA-F** (not implemented), learns the global adapter by FedIT for all
rounds, then each client fine-tunes a copy of it on its own data as its local adapter (the
maintainer's recipe, github.com/Lydia-yang/FedDPA/issues/2: train one more round and take a client's
locally trained global adapter); inference is the same.

An image classifier's head (peft ``modules_to_save``) belongs to both adapters, as peft gives every
adapter its own copy: the global head is averaged with the global LoRA arrays, the local head stays
with its client, and the two are mixed with the same weights, logits = α·H_g(z) + (1 − α)·H_l(z):
for a linear head the interpolation α·W_g + (1 − α)·W_l that the LoRA mixing is for every adapted
weight (W₀ + α·ΔW_g + (1 − α)·ΔW_l).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from logging import INFO
from typing import Any

import numpy as np
from flwr.supercore import log

from fedbilevel import protocol
from fedbilevel.mixing import weighted_average
from fedbilevel.options import integer, number, option, validate
from fedbilevel.strategies.base import Adapter, PersonalizedStrategy

# A client's adapter as it travels: the global adapter under peft's names, the local one prefixed.
LOCAL_PREFIX = "local/"


def dual_adapter(global_adapter: Mapping[str, np.ndarray], local_adapter: Mapping[str, np.ndarray]) -> Adapter:
    """The one adapter a FedDPA message carries: the global arrays, then the local ones under ``local/<name>``.

    Parameters
    ----------
    global_adapter, local_adapter : mapping of str to numpy.ndarray
        Arrays under peft's saved names (:func:`~fedbilevel.models.adapter.get_adapter_arrays`), the
        same names in both.

    Returns
    -------
    dict of str to numpy.ndarray
        Twice as many arrays, the global ones first, in their order; the arrays are not copied.

    Raises
    ------
    ValueError
        If the two adapters' names differ.
    """
    if list(global_adapter) != list(local_adapter):
        raise ValueError(
            f"local adapter: its {len(local_adapter)} arrays are not named as the global adapter's "
            f"{len(global_adapter)}; expected the same peft names"
        )
    return {**global_adapter, **{LOCAL_PREFIX + name: array for name, array in local_adapter.items()}}


def split_adapter(adapter: Mapping[str, np.ndarray]) -> tuple[Adapter, Adapter]:
    """(global adapter, local adapter) of a :func:`dual_adapter`, both under peft's names.

    Raises
    ------
    ValueError
        If ``adapter`` is not a dual adapter (its local arrays missing or named otherwise).
    """
    global_part = {name: array for name, array in adapter.items() if not name.startswith(LOCAL_PREFIX)}
    local_part = {name[len(LOCAL_PREFIX) :]: array for name, array in adapter.items() if name.startswith(LOCAL_PREFIX)}
    if list(local_part) != list(global_part):
        raise ValueError(
            f"adapter: {len(global_part)} global and {len(local_part)} local arrays; expected a FedDPA adapter, "
            f"every global array with its '{LOCAL_PREFIX}' twin"
        )
    return global_part, local_part


@dataclass(frozen=True)
class DpaSettings:
    """FedDPA's client hyper-parameters: run-config options the strategy declares in each message.

    Attributes
    ----------
    local_weight : float
        a, the local adapter's weight while it trains (the frozen global adapter's is 1 − a).
    instances : int
        N, the training inputs drawn per evaluation whose mean cosine similarity to a test input
        gives its weight (all of them when the client has fewer).
    max_weight : float
        β, the global adapter's weight at cosine similarity 1: α = β · mean cos.
    """

    local_weight: float = option(
        "feddpa-local-weight",
        0.5,
        number(0.0, low_open=True, high=1.0, high_open=False),
        "FedDPA: weight a of the local adapter while it trains, the frozen global adapter's being 1 − a "
        "(the official `local_weight`; the paper tries 0.3, 0.5, 0.7)",
    )
    instances: int = option(
        "feddpa-instances",
        5,
        integer(1),
        "FedDPA: training inputs drawn per evaluation; a test input's weight α is `feddpa-max-weight` times its "
        "mean cosine similarity to them (the official `instance_num`)",
    )
    max_weight: float = option(
        "feddpa-max-weight",
        0.5,
        number(0.0, low_open=False, high=1.0, high_open=False),
        "FedDPA: β in α = β · mean cosine similarity, the global adapter's weight at inference (the local one's "
        "is 1 − α; the official `max_weight`)",
    )

    def __post_init__(self) -> None:
        validate(self)

    def to_config(self) -> dict[str, float | int]:
        """The message config entries that make a client train and evaluate as FedDPA."""
        return {key: getattr(self, field) for field, key in _MESSAGE_KEYS.items()}

    @classmethod
    def from_config(cls, config: Mapping) -> DpaSettings | None:
        """The settings a message declares, or None when the strategy is not FedDPA."""
        if _MESSAGE_KEYS["local_weight"] not in config:
            return None
        return cls(**{field: config[key] for field, key in _MESSAGE_KEYS.items()})


# DpaSettings field -> message config key: the run-config keys of the same names.
_MESSAGE_KEYS = {declared.name: declared.metadata["key"] for declared in fields(DpaSettings)}


class FedDpa(PersonalizedStrategy):
    """The weighted mean of the trained global adapters is shared; each local adapter stays its client's.

    A client's adapter is a :func:`dual_adapter`: the global arrays under peft's names and its
    local arrays under ``local/<name>`` (an image head in both). The server keeps the global adapter
    once (store kind ``global``) and each client's local adapter (store kind ``local``). A client
    that did not train this round keeps its local adapter and receives the current global one with
    it; one that never trained has θ⁰'s local adapter (a zero update). The clients derive the
    ordinary θ⁰ at start, so the first message to each carries its dual adapter in full.

    Parameters
    ----------
    settings : DpaSettings
        a, N and β, declared to the clients in every train and evaluate message.
    initial_adapter : dict[str, np.ndarray]
        θ⁰, one adapter under peft's names: both adapters start from it.
    **kwargs
        Passed to :class:`~fedbilevel.strategies.base.PersonalizedStrategy`.
    """

    def __init__(self, *, settings: DpaSettings, initial_adapter: Mapping[str, np.ndarray], **kwargs: Any) -> None:
        initial = {name: np.asarray(array) for name, array in initial_adapter.items()}
        super().__init__(initial_adapter=dual_adapter(initial, initial), **kwargs)
        self._initial_digest = protocol.adapter_digest(initial)  # what a client holds after the partition query
        self.settings = settings
        self.initial_global, self.initial_local = split_adapter(self.initial_adapter)
        self._initial_local_digest = protocol.adapter_digest(self.initial_local)
        self.shared = self.store.table("global")  # 0 -> the global adapter, once aggregated
        self.local = self.store.table("local")  # partition id -> its local adapter (peft names)

    def summary(self) -> None:
        """Log the adapters and the settings."""
        log(
            INFO,
            "\t├──> FedDPA-T: a global adapter (%d arrays) averaged, a local one per client; %s",
            len(self.initial_global),
            ", ".join(f"{k} {v}" for k, v in self.settings.to_config().items()),
        )
        super().summary()

    def client_config(self) -> dict[str, Any]:
        """Ask clients to train and evaluate the two adapters as FedDPA."""
        return self.settings.to_config()

    def partition_config(self, phase: str, partition_id: int) -> dict[str, Any]:
        """Evaluate messages also say whether the client's local adapter has trained (:meth:`local_trained`)."""
        config = super().partition_config(phase, partition_id)
        if phase == "evaluate":
            config[protocol.DPA_LOCAL_TRAINED] = self.local_trained(partition_id)
        return config

    def local_trained(self, partition_id: int) -> bool:
        """Whether the client's local adapter differs from θ⁰'s: it trains when sampled from server round 2 on.

        Until then the client scores the global adapter alone (α = 1, FedIT's model): the official
        code only evaluates at the end, when every client has trained its local adapter, and α(x)
        ≤ β would otherwise scale the global update down next to a zero local one.
        """
        local = self.local.get(partition_id)
        return local is not None and protocol.adapter_digest(local) != self._initial_local_digest

    def adapter_for(self, partition_id: int) -> Adapter:
        """The current global adapter with the client's local one (θ⁰'s until it has trained)."""
        return dual_adapter(self.shared.get(0, self.initial_global), self.local.get(partition_id, self.initial_local))

    def global_adapter(self) -> Adapter:
        """The global adapter alone (what ``eval-global`` scores): FedDPA's shared model, FedIT's."""
        return self.shared.get(0, self.initial_global)

    def saved_adapters(self, partition_id: int) -> dict[str, Adapter]:
        """The client's two adapters, in ``global/`` and ``local/``: mixed per input, they are its model."""
        return dict(zip(("global", "local"), split_adapter(self.adapter_for(partition_id))))

    def personalize(self, server_round: int, trained: dict[int, Adapter], weights: dict[int, float]) -> dict[str, Any]:
        """θ_g ← Σᵢ wᵢ θ_gⁱ / Σᵢ wᵢ over the clients that trained; each keeps its trained θ_lⁱ."""
        partitions = sorted(trained)
        parts = {p: split_adapter(trained[p]) for p in partitions}
        self.shared[0] = weighted_average([parts[p][0] for p in partitions], [weights[p] for p in partitions])
        for p in partitions:
            self.local[p] = parts[p][1]
        return {"participants": partitions}
