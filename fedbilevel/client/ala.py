"""FedALA's adaptive local aggregation (ALA), the client-side step of the ``fedala`` strategy.

Zhang et al., "FedALA: Adaptive Local Aggregation for Personalized Federated Learning"
(AAAI 2023), Eq. (4)–(6). Client i keeps its local model θᵢ (the adapter it trained last
round) and element-wise weights Wᵢ ∈ [0, 1]. On receiving the global model Θ it does not
overwrite θᵢ but forms

    θ̂ᵢ = θᵢ + (Θ − θᵢ) ⊙ Wᵢ          (lower layers: θ̂ᵢ = Θ),

learning Wᵢ on a random fraction s of its training data by
Wᵢ ← clip(Wᵢ − η ∇_θ̂ L(θ̂ᵢ) ⊙ (Θ − θᵢ), 0, 1), one update per batch. Wᵢ starts at 1
(θ̂ = Θ) and carries over between rounds; the first time it is learned for several
epochs (the paper: until the loss settles; here a fixed cap, ``start_epochs``), later
for one epoch. Without a local model yet (the first round) θ̂ = Θ. θ̂ᵢ is both the
client's personalized model (what it evaluates) and where local training starts.

The local model, Wᵢ and the last θ̂ᵢ live in the client's Flower ``context.state``
(persisted by the SuperNode for the run), so FedALA costs no extra communication. θ̂ᵢ
is keyed by a digest of Θ: the evaluate message of round t and the train message of
round t + 1 carry the same Θ, and Wᵢ is learned once for it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict

from fedbilevel import protocol
from fedbilevel.aggregation import layer_groups
from fedbilevel.client.train import Codec
from fedbilevel.models.adapter import (
    adapter_parameters,
    get_adapter_arrays,
    set_adapter_arrays,
)

# context.state records
LOCAL = "fedala-local"  # θᵢ, the adapter this client trained last
WEIGHTS = "fedala-weights"  # Wᵢ of the top arrays
MIXED = "fedala-mixed"  # θ̂ᵢ for the global model named in META
META = "fedala-meta"


def top_arrays(names: Sequence[str], top_fraction: float) -> list[str]:
    """Names of the arrays ALA mixes: the top ⌈fraction · blocks⌉ blocks, plus arrays in no block."""
    groups = layer_groups(names, "block")
    blocks = sorted(int(key.split(".")[1]) for key in groups if key.startswith("block."))
    keep = set(blocks[len(blocks) - math.ceil(top_fraction * len(blocks)) :]) if blocks else set()
    return [
        name
        for key, members in groups.items()
        if not key.startswith("block.") or int(key.split(".")[1]) in keep
        for name in members
    ]


def ala_weight_step(
    weights: torch.Tensor, gradient: torch.Tensor, global_minus_local: torch.Tensor, eta: float
) -> torch.Tensor:
    """One update W ← clip(W − η · ∇_θ̂ L ⊙ (Θ − θ), 0, 1) (FedALA Eq. 6)."""
    return torch.clamp(weights - eta * gradient * global_minus_local, 0.0, 1.0)


def adaptive_local_aggregation(
    model: torch.nn.Module,
    codec: Codec,
    examples: Sequence[Any],
    state: RecordDict,
    settings: protocol.AlaSettings,
    *,
    batch_size: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Replace the global adapter loaded in ``model`` by θ̂ᵢ, learning Wᵢ if this Θ is new.

    Reads and updates ``state`` (the client's ``context.state``). Returns what happened:
    ``ala-epochs`` (0 when θ̂ was reused or there is no local model yet) and, when W was
    learned, ``ala-loss`` (last batch) and ``ala-mean-weight``.
    """
    received = get_adapter_arrays(model)
    received_digest = protocol.adapter_digest(received)
    if META in state.config_records and state.config_records[META].get("global-digest") == received_digest:
        set_adapter_arrays(model, protocol.record_to_adapter(state.array_records[MIXED]))
        return {protocol.ALA_EPOCHS: 0}
    if LOCAL not in state.array_records:  # first round: nothing local to keep
        return {protocol.ALA_EPOCHS: 0}
    local = protocol.record_to_adapter(state.array_records[LOCAL])
    start = WEIGHTS not in state.array_records
    parameters = adapter_parameters(model)
    top = top_arrays(list(parameters), settings.top_fraction)
    weights = (
        {name: torch.ones_like(parameters[name]) for name in top}
        if start
        else {
            name: torch.as_tensor(array).to(device)
            for name, array in protocol.record_to_adapter(state.array_records[WEIGHTS]).items()
        }
    )
    local_t = {name: torch.as_tensor(local[name]).to(device) for name in top}
    delta = {name: parameters[name].detach().clone() - local_t[name] for name in top}  # Θ − θᵢ

    def mix() -> None:
        with torch.no_grad():
            for name in top:
                parameters[name].copy_(local_t[name] + delta[name] * weights[name])

    encoded = codec.encode(examples)
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randperm(len(encoded), generator=generator)[
        : max(1, round(settings.data_fraction * len(encoded)))
    ].tolist()
    epochs = settings.start_epochs if start else 1
    frozen = [p for name, p in parameters.items() if name not in weights]
    for p in frozen:  # gradients of the lower blocks are not needed
        p.requires_grad_(False)
    torch.manual_seed(seed)
    model.train()
    loss = torch.tensor(float("nan"))
    try:
        mix()
        for _ in range(epochs):
            for first in range(0, len(sample), batch_size):
                batch = codec.collate([encoded[i] for i in sample[first : first + batch_size]])
                model.zero_grad(set_to_none=True)
                loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
                loss.backward()
                for name in top:
                    weights[name] = ala_weight_step(weights[name], parameters[name].grad, delta[name], settings.eta)
                mix()
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.zero_grad(set_to_none=True)
        model.eval()
    state[WEIGHTS] = protocol.adapter_to_record({name: w.cpu().numpy() for name, w in weights.items()})
    state[MIXED] = protocol.adapter_to_record(get_adapter_arrays(model))
    state[META] = ConfigRecord({"global-digest": received_digest})
    total = sum(w.numel() for w in weights.values())
    return {
        protocol.ALA_EPOCHS: epochs,
        protocol.ALA_LOSS: loss.item(),
        protocol.ALA_MEAN_WEIGHT: float(sum(w.sum() for w in weights.values()) / total),
    }


def remember_local(state: RecordDict, adapter: Mapping[str, np.ndarray]) -> None:
    """Keep the adapter this client just trained as its local model θᵢ."""
    state[LOCAL] = protocol.adapter_to_record(adapter)
