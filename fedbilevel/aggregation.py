"""FedBip task-vector aggregation: pure NumPy, no Flower or torch.

FedBip (bi-level personalization) keeps one adapter θ̄ᵢ per client. After client i
fine-tunes θ̄ᵢ into θᵢ, the server forms task vectors τᵢ, their cosine similarities
Sᵢₖ = cos(τᵢ, τₖ), row-normalised weights pᵢₖ = Sᵢₖ / Σⱼ Sᵢⱼ (self included), and the
new personalized adapter θ̄ᵢ ← θ̄ᵢ + Σₖ pᵢₖ τₖ. FedBip-L does the same per layer group.

Two choices the paper leaves open are options here:

``negative`` (how negative cosines enter the weights)
    ``"clip"`` (default) replaces Sᵢₖ < 0 by 0: a client whose update points away from
    yours contributes nothing rather than a negative multiple of its update. ``"keep"``
    applies the formula literally; its weights can be negative and, when the signed row
    sum is close to zero, arbitrarily large (S = [1, -0.99] gives p = [100, -99]), which
    is why it is not the default.
``task_vector`` (what τ is relative to)
    ``"round"`` (default, the paper's θ̄ᵢ ← θ̄ᵢ + Σ pτ): τᵢ = θᵢ − θ̄ᵢ, this round's update.
    ``"cumulative"``: τᵢ = θᵢ − θ⁰ relative to the common initial adapter θ⁰ (task
    arithmetic), and θ̄ᵢ ← θ⁰ + Σₖ pᵢₖ τₖ; since Σₖ pᵢₖ = 1 this is the similarity-weighted
    mean of the trained adapters, with similarity measured on everything learned so far.

A row whose weights cannot be normalised (all clipped to zero, a signed sum ≤ 0, or a
zero task vector) falls back to the client's own task vector: pᵢᵢ = 1. Nothing is NaN.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

NEGATIVE_COSINE_MODES = ("clip", "keep")
TASK_VECTOR_MODES = ("round", "cumulative")
LAYER_GROUPINGS = ("array", "block")

# Row sums at or below this cannot be normalised safely (see module docstring).
_MIN_ROW_SUM = 1e-8

# "model.layers.3.self_attn.q_proj..." -> block 3 (Llama, Mistral, Qwen, GPT-2 "h.3", ViT "layer.3").
_BLOCK_PATTERN = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")

Adapter = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class FedBipResult:
    """Output of :func:`fedbip_aggregate_detailed`.

    Attributes
    ----------
    adapters : list[dict[str, np.ndarray]]
        New personalized adapters, in input order, with the input keys, shapes and dtypes.
    similarity : np.ndarray
        N×N cosine similarity of task vectors (FedBip-L: mean over layer groups).
    weights : np.ndarray
        N×N aggregation weights, rows summing to 1 (FedBip-L: mean over layer groups).
    group_similarity : dict[str, np.ndarray]
        Per layer group similarity (FedBip-L only; empty for FedBip).
    group_weights : dict[str, np.ndarray]
        Per layer group weights (FedBip-L only; empty for FedBip).
    """

    adapters: list[dict[str, np.ndarray]]
    similarity: np.ndarray
    weights: np.ndarray
    group_similarity: dict[str, np.ndarray]
    group_weights: dict[str, np.ndarray]


def cosine_from_gram(gram: np.ndarray) -> np.ndarray:
    """Cosine similarity matrix from a Gram matrix G = V Vᵀ.

    Rows and columns of zero vectors are 0 (including the diagonal entry), so a zero
    task vector is similar to nothing and falls back to itself in :func:`weight_matrix`.
    """
    gram = np.asarray(gram, dtype=np.float64)
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    nonzero = norms > 0
    safe = np.where(nonzero, norms, 1.0)
    cosine = gram / np.outer(safe, safe)
    cosine[~nonzero, :] = 0.0
    cosine[:, ~nonzero] = 0.0
    # Rounding can push |cos| slightly above 1; the diagonal of a nonzero vector is 1.
    np.clip(cosine, -1.0, 1.0, out=cosine)
    cosine[nonzero, nonzero] = 1.0
    return cosine


def cosine_similarity_matrix(vectors: np.ndarray) -> np.ndarray:
    """Pairwise cosine similarity of the rows of an N×d array (one BLAS Gram product)."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise ValueError(f"vectors: expected a 2-D N×d array, got shape {vectors.shape}")
    return cosine_from_gram(vectors @ vectors.T)


def weight_matrix(similarity: np.ndarray, *, negative: str = "clip") -> np.ndarray:
    """FedBip weights pᵢₖ = Sᵢₖ / Σⱼ Sᵢⱼ, with the fallback pᵢᵢ = 1 for rows that cannot be normalised.

    Parameters
    ----------
    similarity : np.ndarray
        N×N similarity matrix S (self included on the diagonal).
    negative : {"clip", "keep"}
        ``"clip"`` sets negative similarities to 0 before normalising; ``"keep"`` uses them
        as they are (weights may then be negative).

    Returns
    -------
    np.ndarray
        N×N float64 weights whose rows sum to 1.
    """
    _check_choice("negative", negative, NEGATIVE_COSINE_MODES)
    similarity = np.asarray(similarity, dtype=np.float64)
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity: expected a square N×N matrix, got shape {similarity.shape}")
    scores = np.clip(similarity, 0.0, None) if negative == "clip" else similarity.copy()
    row_sums = scores.sum(axis=1)
    normalisable = row_sums > _MIN_ROW_SUM
    weights = np.zeros_like(scores)
    weights[normalisable] = scores[normalisable] / row_sums[normalisable, None]
    fallback = np.flatnonzero(~normalisable)
    weights[fallback, fallback] = 1.0
    return weights


def layer_groups(names: Sequence[str], grouping: str = "array") -> dict[str, list[str]]:
    """Partition adapter array names into the layer groups FedBip-L weights separately.

    ``"array"``: every named array is its own group. ``"block"``: arrays of the same
    transformer block (``...layers.<k>...``) form one group; arrays outside any block
    (e.g. a classifier head) stay groups of their own. Groups keep first-seen order.
    """
    _check_choice("grouping", grouping, LAYER_GROUPINGS)
    groups: dict[str, list[str]] = {}
    for name in names:
        match = _BLOCK_PATTERN.search(name) if grouping == "block" else None
        key = f"block.{match.group(1)}" if match else name
        groups.setdefault(key, []).append(name)
    return groups


def fedbip_aggregate(
    personalized: Sequence[Adapter],
    trained: Sequence[Adapter],
    *,
    layerwise: bool = False,
    **options,
) -> list[dict[str, np.ndarray]]:
    """New personalized adapters by FedBip (``layerwise=False``) or FedBip-L.

    Parameters
    ----------
    personalized : sequence of dict[str, np.ndarray]
        θ̄ᵢ: the adapter each client started this round from.
    trained : sequence of dict[str, np.ndarray]
        θᵢ: the adapter each client sent back, same keys and shapes as ``personalized[i]``.
    layerwise : bool
        Compute similarities and weights per layer group (FedBip-L).
    **options
        ``negative`` ("clip" | "keep"), ``task_vector`` ("round" | "cumulative"),
        ``initial`` (θ⁰, required for "cumulative"), ``grouping`` ("array" | "block").

    Returns
    -------
    list[dict[str, np.ndarray]]
        θ̄ᵢ for the next round, in input order.
    """
    return fedbip_aggregate_detailed(personalized, trained, layerwise=layerwise, **options).adapters


def fedbip_aggregate_detailed(
    personalized: Sequence[Adapter],
    trained: Sequence[Adapter],
    *,
    layerwise: bool = False,
    negative: str = "clip",
    task_vector: str = "round",
    initial: Adapter | None = None,
    grouping: str = "array",
) -> FedBipResult:
    """Like :func:`fedbip_aggregate`, also returning the similarity and weight matrices."""
    _check_choice("negative", negative, NEGATIVE_COSINE_MODES)
    _check_choice("task_vector", task_vector, TASK_VECTOR_MODES)
    _check_choice("grouping", grouping, LAYER_GROUPINGS)
    names = _check_adapters(personalized, trained)
    if task_vector == "cumulative":
        if initial is None:
            raise ValueError("initial: required when task_vector='cumulative' (τ is measured from it)")
        _check_same_layout("initial", initial, "personalized[0]", personalized[0], names)

    groups = layer_groups(names, grouping) if layerwise else {"all": list(names)}
    # Columns ordered group by group, so that every group is one contiguous slice.
    ordered = [name for members in groups.values() for name in members]
    layout = _Layout(ordered, personalized[0])

    # Two N×d float32 buffers: `new` starts as the reference point and is updated in place.
    if task_vector == "round":
        new = layout.stack(personalized)
    else:
        new = np.repeat(layout.stack([initial]), len(trained), axis=0)
    tau = layout.stack(trained)
    tau -= new

    group_similarity: dict[str, np.ndarray] = {}
    group_weights: dict[str, np.ndarray] = {}
    for key, members in groups.items():
        columns = layout.columns(members)
        similarity = cosine_similarity_matrix(tau[:, columns])
        weights = weight_matrix(similarity, negative=negative)
        new[:, columns] += (weights.astype(np.float32) @ tau[:, columns])
        group_similarity[key] = similarity
        group_weights[key] = weights

    if layerwise:
        similarity = np.mean(list(group_similarity.values()), axis=0)
        weights = np.mean(list(group_weights.values()), axis=0)
    else:
        similarity, weights = group_similarity.pop("all"), group_weights.pop("all")
    return FedBipResult(
        adapters=layout.unstack(new, names),
        similarity=similarity,
        weights=weights,
        group_similarity=group_similarity,
        group_weights=group_weights,
    )


class _Layout:
    """Where each named array lives in the flattened float32 N×d matrix."""

    def __init__(self, ordered_names: Sequence[str], reference: Adapter):
        self.shapes = {name: np.shape(reference[name]) for name in ordered_names}
        self.dtypes = {name: np.asarray(reference[name]).dtype for name in ordered_names}
        self.slices: dict[str, slice] = {}
        offset = 0
        for name in ordered_names:
            size = int(np.prod(self.shapes[name], dtype=np.int64))
            self.slices[name] = slice(offset, offset + size)
            offset += size
        self.size = offset

    def stack(self, adapters: Sequence[Adapter]) -> np.ndarray:
        matrix = np.empty((len(adapters), self.size), dtype=np.float32)
        for row, adapter in zip(matrix, adapters):
            for name, columns in self.slices.items():
                row[columns] = np.asarray(adapter[name]).reshape(-1)
        return matrix

    def columns(self, members: Sequence[str]) -> slice:
        return slice(self.slices[members[0]].start, self.slices[members[-1]].stop)

    def unstack(self, matrix: np.ndarray, names: Sequence[str]) -> list[dict[str, np.ndarray]]:
        return [
            {
                name: row[self.slices[name]].reshape(self.shapes[name]).astype(self.dtypes[name])
                for name in names
            }
            for row in matrix
        ]


def _check_choice(key: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{key}: {value!r} is not allowed; choose one of {', '.join(allowed)}")


def _check_adapters(personalized: Sequence[Adapter], trained: Sequence[Adapter]) -> list[str]:
    """Same number of clients, keys and shapes everywhere, finite values; returns the key order."""
    if len(personalized) == 0:
        raise ValueError("personalized: at least one client adapter is required, got 0")
    if len(personalized) != len(trained):
        raise ValueError(
            f"trained: {len(trained)} adapters for {len(personalized)} personalized adapters; "
            "they must pair up one per client"
        )
    names = list(personalized[0])
    if not names:
        raise ValueError("personalized[0]: adapter has no arrays")
    for i in range(len(personalized)):
        _check_same_layout(f"personalized[{i}]", personalized[i], "personalized[0]", personalized[0], names)
        _check_same_layout(f"trained[{i}]", trained[i], "personalized[0]", personalized[0], names)
    return names


def _check_same_layout(label: str, adapter: Adapter, ref_label: str, reference: Adapter, names: list[str]) -> None:
    if set(adapter) != set(names):
        missing = sorted(set(names) - set(adapter))
        extra = sorted(set(adapter) - set(names))
        raise ValueError(f"{label}: keys differ from {ref_label} (missing {missing}, unexpected {extra})")
    for name in names:
        array = np.asarray(adapter[name])
        if array.shape != np.shape(reference[name]):
            raise ValueError(
                f"{label}[{name!r}]: shape {array.shape} differs from {ref_label} shape {np.shape(reference[name])}"
            )
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{label}[{name!r}]: dtype {array.dtype} is not allowed; expected a floating dtype")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{label}[{name!r}]: contains NaN or Inf; only finite values can be aggregated")
