"""Pure NumPy mixing of client adapters for the baselines (no Flower or torch).

Every baseline's server step is a weighted sum of the clients' adapters with some N×N
(or 1×N) weight matrix: FedAvg's example weights, FedAMP's attention weights. FedBip's
task-vector aggregation has its own optimised path in :mod:`fedbilevel.aggregation`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedbilevel.aggregation import cosine_similarity_matrix

Adapter = Mapping[str, np.ndarray]


def mix_adapters(adapters: Sequence[Adapter], weights: np.ndarray) -> list[dict[str, np.ndarray]]:
    """``out[i] = Σₖ weights[i, k] · adapters[k]`` per named array.

    Sums run in float64 and are cast back to each array's dtype.

    Parameters
    ----------
    adapters : sequence of dict[str, np.ndarray]
        N adapters with the same names and shapes.
    weights : np.ndarray
        M×N weights (rows need not sum to 1).

    Returns
    -------
    list[dict[str, np.ndarray]]
        M mixed adapters.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[1] != len(adapters) or not len(adapters):
        raise ValueError(
            f"weights: shape {weights.shape} is not allowed; expected M×{len(adapters)} for {len(adapters)} adapters"
        )
    names = list(adapters[0])
    for k, adapter in enumerate(adapters[1:], start=1):
        if list(adapter) != names or any(adapter[n].shape != adapters[0][n].shape for n in names):
            raise ValueError(f"adapters[{k}]: names or shapes differ from adapters[0]")
    mixed: list[dict[str, np.ndarray]] = [{} for _ in range(weights.shape[0])]
    for name in names:
        reference = adapters[0][name]
        stacked = np.stack([np.asarray(a[name], np.float64).ravel() for a in adapters])
        for row, values in zip(mixed, weights @ stacked):
            row[name] = values.reshape(reference.shape).astype(reference.dtype)
    return mixed


def weighted_average(adapters: Sequence[Adapter], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Σₖ wₖ θₖ / Σₖ wₖ (FedAvg with wₖ = number of examples of client k)."""
    weights = np.asarray(weights, dtype=np.float64)
    total = float(weights.sum())
    if not total > 0 or np.any(weights < 0):
        raise ValueError(
            f"weights: {weights.tolist()} is not allowed; expected non-negative numbers with a positive sum"
        )
    return mix_adapters(adapters, (weights / total)[None])[0]


def flatten(adapters: Sequence[Adapter]) -> np.ndarray:
    """N×d float32 array: each adapter's arrays raveled and concatenated in name order."""
    names = list(adapters[0])
    return np.stack([np.concatenate([np.asarray(a[n], np.float32).ravel() for n in names]) for a in adapters])


def group_weights(labels: Sequence[object]) -> np.ndarray:
    """N×N weights averaging within groups: wᵢₖ = 1/|gᵢ| if labels i and k are equal, else 0."""
    labels = list(labels)
    same = np.array([[a == b for b in labels] for a in labels], dtype=np.float64)
    return same / same.sum(axis=1, keepdims=True)


def fedamp_attention(cosine: np.ndarray, *, sigma: float, self_weight: float) -> np.ndarray:
    """HeurFedAMP's attention weights ξ from the clients' model cosine similarities.

    Huang et al., "Personalized Cross-Silo Federated Learning on Non-IID Data" (AAAI 2021),
    heuristic FedAMP for deep networks: ξᵢᵢ is a hyper-parameter (the self weight) and, for
    j ≠ i,

        ξᵢⱼ = (1 − ξᵢᵢ) · exp(σ cos(wᵢ, wⱼ)) / Σ_{h≠i} exp(σ cos(wᵢ, w_h)),

    so each row sums to 1. A single client keeps its own model (ξ = [[1]]).

    Parameters
    ----------
    cosine : np.ndarray
        N×N cosine similarities of the clients' models (the diagonal is not used).
    sigma : float
        σ ≥ 0: how sharply attention favours similar clients (0: uniform over the others).
    self_weight : float
        ξᵢᵢ in [0, 1].

    Returns
    -------
    np.ndarray
        N×N float64 weights ξ.
    """
    cosine = np.asarray(cosine, dtype=np.float64)
    if cosine.ndim != 2 or cosine.shape[0] != cosine.shape[1]:
        raise ValueError(f"cosine: shape {cosine.shape} is not allowed; expected a square N×N matrix")
    if not (np.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma: value {sigma!r} is not allowed; expected a finite number ≥ 0")
    if not 0 <= self_weight <= 1:
        raise ValueError(f"self_weight: value {self_weight!r} is not allowed; expected a number in [0, 1]")
    n = cosine.shape[0]
    if n == 1:
        return np.ones((1, 1))
    others = ~np.eye(n, dtype=bool)
    # Subtracting each row's largest off-diagonal logit keeps exp() finite for any σ.
    logits = np.where(others, sigma * cosine, -np.inf)
    scores = np.exp(logits - logits.max(axis=1, keepdims=True))
    attention = (1 - self_weight) * scores / scores.sum(axis=1, keepdims=True)
    attention[np.diag_indices(n)] = self_weight
    return attention


def fedamp_cloud_models(
    models: Sequence[Adapter], *, sigma: float, self_weight: float
) -> tuple[list[dict[str, np.ndarray]], np.ndarray, np.ndarray]:
    """FedAMP's personalized cloud models uᵢ = Σⱼ ξᵢⱼ wⱼ.

    Returns
    -------
    (list of uᵢ, N×N cosine of the models, N×N attention weights ξ)
    """
    cosine = cosine_similarity_matrix(flatten(models))
    attention = fedamp_attention(cosine, sigma=sigma, self_weight=self_weight)
    return mix_adapters(models, attention), cosine, attention
