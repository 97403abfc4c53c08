"""FedBip task-vector aggregation: pure NumPy, no Flower or torch.

FedBip (bi-level personalization) keeps one adapter θ̄ᵢ per client. After client i
fine-tunes θ̄ᵢ into θᵢ, the server forms task vectors τᵢ, their cosine similarities
Sᵢₖ = cos(τᵢ, τₖ), row-normalised weights pᵢₖ = Sᵢₖ / Σⱼ Sᵢⱼ (self included), and the
new personalized adapter θ̄ᵢ ← θ̄ᵢ + Σₖ pᵢₖ τₖ. FedBip-L does the same per layer group.

Three choices the paper leaves open are options here:

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
``similarity`` (what the cosine is measured on)
    ``"flat"`` (default): the task vectors τ, all parameters flattened. ``"lora-product"``:
    the change of each LoRA module's effective weight ΔW = BA, which is what the model
    sees (the factors are not: BA = (BM)(M⁻¹A) for any invertible r×r M). A module is a
    pair of arrays named ``<m>.lora_A.<rest>`` (A, r×in) and ``<m>.lora_B.<rest>`` (B,
    out×r), as peft names them (also ``lora_embedding_A/B``; factors with more than two
    dimensions are read as r×(in·k…) and out×r). Client i's change is
    ΔWᵢ = BᵢAᵢ − B̄ᵢĀᵢ for ``task_vector="round"`` (the module's change this round) and
    ΔWᵢ = BᵢAᵢ − B⁰A⁰ for ``"cumulative"``. The similarity is the cosine of the
    concatenated ΔW of all modules (of a layer group with FedBip-L) together with τ of
    the arrays that are in no A/B pair (e.g. a classifier head). No ΔW is formed: with
    δA, δB the task vectors of the factors, ΔWᵢ = Bᵢ δAᵢ + δBᵢ Āᵢ = PᵢQᵢ for Pᵢ = [Bᵢ δBᵢ]
    (out×2r) and Qᵢ = [δAᵢ; Āᵢ] (2r×in), so ⟨ΔWᵢ, ΔWⱼ⟩_F = tr((PᵢᵀPⱼ)(QⱼQᵢᵀ)), from
    2r×2r blocks of two Gram products over all clients. This split avoids subtracting the
    large BA terms from each other, so small updates keep their precision; it costs about
    4r times the flops of the flat similarity. The weighted sums still act on the
    parameters (A and B separately). With FedBip-L a module is never split: its lora_B
    array joins the group of its lora_A array, so ``grouping="array"`` gives one group per
    module, keyed by the lora_A name.

A row whose weights cannot be normalised (all clipped to zero, a signed sum ≤ 0, or a
zero task vector) falls back to the client's own task vector: pᵢᵢ = 1. Nothing is NaN.

Other ways from similarities to weights (sharper rules, removal of the common direction,
a self-weight floor, smoothing across rounds) live in :mod:`fedbilevel.weighting` and
enter through the ``weighting`` and ``smooth`` arguments; the default is the paper's.

Cost: τ is written once, straight from the inputs, into one N×d float32 array (no stacked
copies of θ or θ̄). Each group's Gram matrix is one BLAS product over a column slice of
it (FedBip: the whole array), and the weighted sums are BLAS products over column
segments, added to the start and written straight into the returned arrays. Extra memory
is about twice that array: τ plus the returned adapters (one buffer per adapter, so an
adapter kept from an old round holds no other client's memory), and a segment buffer of
at most a quarter of it. The Gram diagonals double as the NaN/Inf check, being
finite exactly when every input entry that τ is formed from is (short of float32
overflow), so valid inputs are read once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from fedbilevel.options import choice, component, integer, not_allowed, number, option, validate
from fedbilevel.weighting import (
    NEGATIVE_COSINE_MODES,
    Weighting,
    centered_gram,
    check_choice,
    normalised_weights,
    staleness_discounted,
)

TASK_VECTOR_MODES = ("round", "cumulative")
LAYER_GROUPINGS = ("array", "block")
SIMILARITY_MODES = ("flat", "lora-product")
ABSENT_CLIENT_RULES = ("keep", "remember")
SERVER_STEPS = ("none", "fedexp")

# Largest N×width float32 temporary of one weighted-sum product: small enough to stay in
# cache for the additions that follow, large enough to keep the BLAS product efficient.
_SEGMENT_BYTES = 16 * 2**20

# "model.layers.3.self_attn.q_proj..." -> block 3 (Llama, Mistral, Qwen, GPT-2 "h.3", ViT "layer.3").
_BLOCK_PATTERN = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")

# "...q_proj.lora_A.weight" pairs with "...q_proj.lora_B.weight" (group 1 is the letter to swap).
_LORA_A_PATTERN = re.compile(r"(?:^|\.)lora_(?:embedding_)?(A)(?:\.|$)")

Adapter = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class FedBipSettings:
    """FedBip's options (the two choices the paper leaves open, FedBip-L's groups, the weighting).

    Attributes
    ----------
    task_vector : {"round", "cumulative"}
        τ relative to this round's start θ̄ᵢ (the paper), or to the initial adapter θ⁰.
    layer_grouping : {"array", "block"}
        FedBip-L's groups: each named adapter array, or each transformer block.
    similarity_space : {"flat", "lora-product"}
        Cosine of the raw adapter parameters, or of the effective LoRA updates ΔW = B·A.
    similarity_ema : float
        Decay in [0, 1) of a moving average of each client pair's cosines across rounds.
    weighting : Weighting
        Similarities -> weights (the paper's rule by default).
    """

    task_vector: str = option(
        "task-vector",
        "round",
        choice(TASK_VECTOR_MODES),
        '`round` (τᵢ = θᵢ − θ̄ᵢ, the paper) or `cumulative` (τᵢ = θᵢ − θ⁰); see "The two choices the paper leaves open"',
    )
    layer_grouping: str = option(
        "layer-grouping",
        "array",
        choice(LAYER_GROUPINGS),
        "FedBip-L groups: each adapter `array`, or each transformer `block`",
    )
    similarity_space: str = option(
        "similarity-space",
        "flat",
        choice(SIMILARITY_MODES),
        "cosine of the raw adapter parameters (`flat`, the paper) or of the effective updates ΔW = B·A "
        "(`lora-product`, via r×r products)",
    )
    similarity_ema: float = option(
        "similarity-ema",
        0.0,
        number(0.0, low_open=False, high=1.0),
        "decay of a moving average of each pair's cosine across rounds (0: off)",
    )
    absent_rule: str = option(
        "absent-client-rule",
        "keep",
        choice(ABSENT_CLIENT_RULES),
        "with a fraction of clients a round: `keep` (the round's clients are weighted among themselves; the others "
        "keep their adapters) or `remember` (the round's clients also weigh each absent client's last task vector, "
        'discounted by `staleness-decay` per round of age); see "Sampling clients"',
    )
    staleness_decay: float = option(
        "staleness-decay",
        0.5,
        number(0.0, low_open=False, high=1.0, high_open=False),
        "`remember`: a task vector a rounds old counts γᵃ times (γ = 1: MIFA's undiscounted memory; 0: `keep`)",
    )
    max_staleness: int = option(
        "max-staleness",
        5,
        integer(1),
        "`remember`: task vectors older than this many rounds are forgotten (the server keeps two adapters per "
        "client trained within it)",
    )
    server_step: str = option(
        "server-step",
        "none",
        choice(SERVER_STEPS),
        "`none` (θ̄ᵢ ← θ̄ᵢ + Σₖ pᵢₖ τₖ, the paper) or `fedexp`: that sum times FedExP's step "
        "ηᵢ = max(1, Σₖ pᵢₖ‖τₖ‖² / (2‖Σₖ pᵢₖ τₖ‖²)) (Jhunjhunwala et al., ICLR 2023), which gives back the length a "
        "weighted mean of weakly aligned task vectors loses; needs similarity-space `flat`",
    )
    weighting: Weighting = component(Weighting)

    def __post_init__(self) -> None:
        validate(self)
        if self.server_step != "none" and self.similarity_space != "flat":
            raise not_allowed(
                "server-step",
                self.server_step,
                f"it measures task-vector lengths in the adapter's own parameters; expected similarity-space 'flat' "
                f"(got {self.similarity_space!r})",
            )


def fedexp_steps(gram: np.ndarray, weights: np.ndarray, *, eps: float = 1e-12) -> np.ndarray:
    """FedExP's server step for each weighted mean of task vectors (Jhunjhunwala, Wang and Joshi, ICLR 2023).

    ηᵢ = max(1, Σₖ pᵢₖ‖τₖ‖² / (2 (‖Σₖ pᵢₖ τₖ‖² + ε))), FedExP's extrapolation with the row's
    weights in place of 1/M: 1 when the task vectors agree, up to M/2 for M orthogonal ones of
    equal length, so the step a client receives does not shrink only because its partners'
    updates point elsewhere.

    Parameters
    ----------
    gram : np.ndarray
        N×N, float: the task vectors' inner products ⟨τⱼ, τₖ⟩.
    weights : np.ndarray
        m×N, float: the rows pᵢ (each summing to 1).
    eps : float, default 1e-12
        Added to the squared norm of the mean (FedExP's ε).

    Returns
    -------
    np.ndarray
        m, float64: the steps ηᵢ ≥ 1.
    """
    gram, weights = np.asarray(gram, np.float64), np.asarray(weights, np.float64)
    mean_norms = weights @ np.diag(gram)
    norms_of_mean = np.einsum("ij,jk,ik->i", weights, gram, weights)
    return np.maximum(1.0, mean_norms / (2.0 * (np.maximum(norms_of_mean, 0.0) + eps)))


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
        m×N aggregation weights (m = ``outputs``, N by default), rows summing to 1 (FedBip-L: mean over
        layer groups).
    group_similarity : dict[str, np.ndarray]
        Per layer group similarity (FedBip-L only; empty for FedBip).
    group_weights : dict[str, np.ndarray]
        Per layer group weights (FedBip-L only; empty for FedBip).
    server_steps : np.ndarray or None
        m server steps ηᵢ (``server_step = "fedexp"``; FedBip-L: mean over layer groups), else None.
    step_lengths : np.ndarray or None
        m ratios ‖θ̄ᵢ(new) − θ̄ᵢ‖ / ‖τᵢ‖ (float64; NaN where τᵢ = 0): how long the step a client
        receives is against its own update (``similarity = "flat"``; None otherwise).
    """

    adapters: list[dict[str, np.ndarray]]
    similarity: np.ndarray
    weights: np.ndarray
    group_similarity: dict[str, np.ndarray]
    group_weights: dict[str, np.ndarray]
    server_steps: np.ndarray | None = None
    step_lengths: np.ndarray | None = None


def cosine_from_gram(gram: np.ndarray) -> np.ndarray:
    """Cosine similarity matrix from a Gram matrix G = V Vᵀ.

    Rows and columns of zero vectors are 0 (including the diagonal entry), so a zero
    task vector is similar to nothing and falls back to itself in :func:`weight_matrix`.
    """
    return _cosines_from_grams(np.asarray(gram, dtype=np.float64)[None])[0]


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
    check_choice("negative", negative, NEGATIVE_COSINE_MODES)
    similarity = np.asarray(similarity, dtype=np.float64)
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity: expected a square N×N matrix, got shape {similarity.shape}")
    return normalised_weights(similarity[None], negative)[0]


def layer_groups(names: Sequence[str], grouping: str = "array") -> dict[str, list[str]]:
    """Partition adapter array names into the layer groups FedBip-L weights separately.

    ``"array"``: every named array is its own group. ``"block"``: arrays of the same
    transformer block (``...layers.<k>...``) form one group; arrays outside any block
    (e.g. a classifier head) stay groups of their own. Groups keep first-seen order.
    """
    check_choice("grouping", grouping, LAYER_GROUPINGS)
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
        ``initial`` (θ⁰, required for "cumulative"), ``grouping`` ("array" | "block"),
        ``similarity`` ("flat" | "lora-product"); see the module docstring.

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
    similarity: str = "flat",
    weighting: Weighting | None = None,
    smooth: Callable[[np.ndarray], np.ndarray] | None = None,
    discount: Sequence[float] | None = None,
    outputs: int | None = None,
    server_step: str = "none",
) -> FedBipResult:
    """Like :func:`fedbip_aggregate`, also returning the similarity and weight matrices.

    ``weighting`` replaces the paper's rule (:class:`fedbilevel.weighting.Weighting`; its
    ``negative`` then applies, and the ``negative`` argument must stay "clip"). ``smooth``
    maps the G×N×N cosine stack to the one the weights are computed from (e.g. an
    exponential moving average across rounds); the result reports the cosines used.
    ``discount`` (N numbers in [0, 1]) scales each client's column of the weights, rows
    normalised again (:func:`fedbilevel.weighting.staleness_discounted`: remembered task
    vectors of absent clients). ``outputs`` = m computes new adapters, and reports weight
    rows, for the first m clients only (the others only lend their task vectors).
    ``server_step = "fedexp"`` multiplies each row's weighted sum by :func:`fedexp_steps` (per
    layer group for FedBip-L; needs ``similarity = "flat"``); the reported weights stay pᵢₖ.
    """
    check_choice("negative", negative, NEGATIVE_COSINE_MODES)
    if weighting is None:
        weighting = Weighting(negative=negative)
    elif negative != "clip":
        raise ValueError(
            f"negative: {negative!r} is not allowed together with weighting; set Weighting(negative=...) instead"
        )
    check_choice("task_vector", task_vector, TASK_VECTOR_MODES)
    check_choice("grouping", grouping, LAYER_GROUPINGS)
    check_choice("similarity", similarity, SIMILARITY_MODES)
    check_choice("server_step", server_step, SERVER_STEPS)
    if server_step != "none" and similarity != "flat":
        raise ValueError(f"server_step: {server_step!r} needs similarity='flat' (got {similarity!r})")
    names, personalized, trained = _check_adapters(personalized, trained)
    if task_vector == "cumulative":
        if initial is None:
            raise ValueError("initial: required when task_vector='cumulative' (τ is measured from it)")
        initial = _as_arrays("initial", initial, {name: array.shape for name, array in personalized[0].items()})
        # Neither enters τ, so the Gram diagonal below cannot vouch for them.
        for i, adapter in enumerate(personalized):
            _check_finite(f"personalized[{i}]", adapter)
        _check_finite("initial", initial)
        starts = [initial] * len(trained)
    else:
        starts = personalized

    modules = _lora_modules(names, personalized[0]) if similarity == "lora-product" else {}
    groups = layer_groups(names, grouping) if layerwise else {"all": list(names)}
    groups = _keep_modules_whole(groups, modules)
    layout = _Layout([name for members in groups.values() for name in members], personalized[0])
    tau = layout.task_vectors(trained, starts)

    # NaN, Inf or overflow is reported from the diagonals just below, with the array named.
    with np.errstate(invalid="ignore", over="ignore"):
        grams = np.stack([_gram(tau, layout, members, modules, trained, starts) for members in groups.values()])
    if not np.all(np.isfinite(np.diagonal(grams, axis1=1, axis2=2))):
        _raise_non_finite(personalized, trained)
    raw_grams = grams
    if weighting.centering == "mean":
        grams = centered_gram(grams)
    # All groups at once: many small groups must not cost many small NumPy calls each.
    cosines = _cosines_from_grams(grams)
    if smooth is not None:
        cosines = smooth(cosines)
    weights = weighting.weights(cosines)
    if discount is not None:
        weights = staleness_discounted(weights, np.asarray(discount))
    count = len(trained) if outputs is None else outputs
    if not 0 < count <= len(trained):
        raise ValueError(f"outputs: {outputs} is not allowed; expected 1 to {len(trained)}")
    weights = weights[:, :count]

    steps = (
        np.stack([fedexp_steps(gram, w) for gram, w in zip(raw_grams, weights)]) if server_step == "fedexp" else None
    )
    mixes = weights if steps is None else weights * steps[:, :, None]
    adapters = layout.empty_adapters(count, names)
    for members, mix in zip(groups.values(), mixes):
        layout.weighted_sums(tau, mix, members, starts, adapters)
    step_lengths = None
    if similarity == "flat":  # the Gram matrices are of τ itself: ‖Σₖ mᵢₖ τₖ‖² = Σ_g mᵢ G_g mᵢ
        received = np.einsum("gij,gjk,gik->i", mixes, raw_grams, mixes)
        own = np.diagonal(raw_grams, axis1=1, axis2=2).sum(axis=0)[:count]
        with np.errstate(divide="ignore", invalid="ignore"):
            step_lengths = np.where(own > 0, np.sqrt(np.maximum(received, 0.0) / own), np.nan)
    return FedBipResult(
        adapters=adapters,
        similarity=cosines.mean(axis=0) if layerwise else cosines[0],
        weights=weights.mean(axis=0) if layerwise else weights[0],
        group_similarity=dict(zip(groups, cosines)) if layerwise else {},
        group_weights=dict(zip(groups, weights)) if layerwise else {},
        server_steps=None if steps is None else steps.mean(axis=0),
        step_lengths=step_lengths,
    )


def _cosines_from_grams(grams: np.ndarray) -> np.ndarray:
    """:func:`cosine_from_gram` of every matrix in a G×N×N float64 stack."""
    norms = np.sqrt(np.clip(np.diagonal(grams, axis1=1, axis2=2), 0.0, None))
    nonzero = norms > 0
    safe = np.where(nonzero, norms, 1.0)
    cosine = grams / (safe[:, :, None] * safe[:, None, :])
    cosine = np.where(nonzero[:, :, None] & nonzero[:, None, :], cosine, 0.0)
    # Rounding can push |cos| slightly above 1; the diagonal of a nonzero vector is 1.
    np.clip(cosine, -1.0, 1.0, out=cosine)
    diagonal = np.arange(grams.shape[1])
    cosine[:, diagonal, diagonal] = nonzero
    return cosine


class _LoraModule(NamedTuple):
    """A lora_A/lora_B pair, its factors read as A: rank×fan_in and B: fan_out×rank."""

    a: str
    b: str
    rank: int
    fan_in: int
    fan_out: int


class _Layout:
    """Where each named array lives in the flattened float32 N×d task-vector matrix."""

    def __init__(self, ordered_names: Sequence[str], reference: Adapter):
        self.shapes = {name: np.shape(reference[name]) for name in ordered_names}
        self.dtypes = {name: np.asarray(reference[name]).dtype for name in ordered_names}
        self.slices: dict[str, slice] = {}
        offset = 0
        for name in ordered_names:
            size = math.prod(self.shapes[name])
            self.slices[name] = slice(offset, offset + size)
            offset += size
        self.size = offset

    def columns(self, members: Sequence[str]) -> slice:
        return slice(self.slices[members[0]].start, self.slices[members[-1]].stop)

    def empty_adapters(self, count: int, names: Sequence[str]) -> list[dict[str, np.ndarray]]:
        """``count`` adapters to fill, keys in ``names`` order, each array a view of its adapter's buffer.

        One buffer per adapter (and dtype) is faster to fill than one allocation per array
        (fewer page faults; NumPy gives large buffers huge pages), and each adapter still
        owns its memory alone.
        """
        places: dict[str, slice] = {}
        totals: dict[np.dtype, int] = {}
        for name, columns in self.slices.items():
            offset = totals.get(self.dtypes[name], 0)
            places[name] = slice(offset, offset + columns.stop - columns.start)
            totals[self.dtypes[name]] = places[name].stop
        adapters = []
        for _ in range(count):
            buffers = {dtype: np.empty(total, dtype) for dtype, total in totals.items()}
            adapters.append(
                {name: buffers[self.dtypes[name]][places[name]].reshape(self.shapes[name]) for name in names}
            )
        return adapters

    def task_vectors(self, trained: Sequence[Adapter], starts: Sequence[Adapter]) -> np.ndarray:
        """τ = θ − start as one N×d float32 array, written straight from the inputs."""
        tau = np.empty((len(trained), self.size), dtype=np.float32)
        for row, end, start in zip(tau, trained, starts):
            for name, columns in self.slices.items():
                # Both operands are rounded to float32 first, as aggregation always did.
                np.subtract(end[name], start[name], out=row[columns].reshape(self.shapes[name]), dtype=np.float32)
        return tau

    def weighted_sums(
        self,
        tau: np.ndarray,
        weights: np.ndarray,
        members: Sequence[str],
        starts: Sequence[Adapter],
        out: list[dict[str, np.ndarray]],
    ) -> None:
        """``out[i][name] = start_i[name] + Σₖ pᵢₖ τₖ[name]`` for the group's arrays (i over the rows of ``weights``).

        One BLAS product per segment of the group's columns, then one addition per client
        and array (part) in it.
        """
        mix = weights.astype(np.float32)
        # Also at most a quarter of τ, so that small adapters stay within ~2.25× τ's memory.
        width = max(1, min(_SEGMENT_BYTES // (4 * len(tau)), -(-self.size // 4)))
        group = self.columns(members)
        buffer = np.empty((len(mix), min(width, group.stop - group.start)), dtype=np.float32)
        for segment in self._segments(members, width):
            lo, hi = segment[0][1], segment[-1][2]
            mixed = np.matmul(mix, tau[:, lo:hi], out=buffer[:, : hi - lo])
            for name, first, last in segment:
                columns = self.slices[name]
                part = slice(first - columns.start, last - columns.start)
                whole = first == columns.start and last == columns.stop
                for row, start, adapter in zip(mixed, starts, out):
                    update = row[first - lo : last - lo]
                    if whole:  # the common case, without flat views (per-call overhead counts here)
                        np.add(start[name], update.reshape(self.shapes[name]), out=adapter[name], dtype=np.float32)
                    else:
                        target = adapter[name].reshape(-1)[part]
                        np.add(start[name].reshape(-1)[part], update, out=target, dtype=np.float32)

    def _segments(self, members: Sequence[str], width: int) -> Iterator[list[tuple[str, int, int]]]:
        """Runs of consecutive (array, first column, end column) pieces, at most ``width`` columns each.

        Arrays are only cut when larger than ``width``, so that most additions cover a whole array.
        """
        segment: list[tuple[str, int, int]] = []
        used = 0
        for name in members:
            columns = self.slices[name]
            for first in range(columns.start, columns.stop, width):
                last = min(first + width, columns.stop)
                if segment and used + last - first > width:
                    yield segment
                    segment, used = [], 0
                segment.append((name, first, last))
                used += last - first
        if segment:
            yield segment


def _gram(
    tau: np.ndarray,
    layout: _Layout,
    members: Sequence[str],
    modules: Mapping[str, _LoraModule],
    trained: Sequence[Adapter],
    starts: Sequence[Adapter],
) -> np.ndarray:
    """N×N float64 inner products of one group's task vectors (ΔW for its LoRA modules)."""
    paired = [modules[name] for name in members if name in modules]
    # _keep_modules_whole put the arrays in no pair first: one contiguous slice.
    plain = members[: len(members) - 2 * len(paired)]
    gram = np.zeros((len(tau), len(tau)))
    if plain:
        block = tau[:, layout.columns(plain)]
        gram += block @ block.T
    for module in paired:
        gram += _lora_gram(tau, layout, module, trained, starts)
    return gram


def _lora_gram(
    tau: np.ndarray,
    layout: _Layout,
    module: _LoraModule,
    trained: Sequence[Adapter],
    starts: Sequence[Adapter],
) -> np.ndarray:
    """⟨ΔWᵢ, ΔWⱼ⟩_F of one LoRA module from 2r×2r blocks, without forming ΔW (module docstring)."""
    n, r = len(tau), module.rank
    # p[i] holds Bᵢᵀ and δBᵢᵀ, q[i] holds δAᵢ and Āᵢ, so that ΔWᵢ = p[i]ᵀ q[i].
    p = np.empty((n, 2, r, module.fan_out), dtype=np.float32)
    q = np.empty((n, 2, r, module.fan_in), dtype=np.float32)
    p[:, 1] = tau[:, layout.slices[module.b]].reshape(n, module.fan_out, r).transpose(0, 2, 1)
    q[:, 0] = tau[:, layout.slices[module.a]].reshape(n, r, module.fan_in)
    for i in range(n):
        p[i, 0] = np.reshape(trained[i][module.b], (module.fan_out, r)).T
        q[i, 1] = np.reshape(starts[i][module.a], (r, module.fan_in))
    p = p.reshape(n * 2 * r, module.fan_out)
    q = q.reshape(n * 2 * r, module.fan_in)
    # Entry (i·2r + a, j·2r + b) is (PᵢᵀPⱼ)ₐᵦ resp. (QᵢQⱼᵀ)ₐᵦ; tr(XYᵀ) sums their product.
    products = (p @ p.T).astype(np.float64) * (q @ q.T)
    return products.reshape(n, 2 * r, n, 2 * r).sum(axis=(1, 3))


def _lora_modules(names: Sequence[str], reference: Adapter) -> dict[str, _LoraModule]:
    """LoRA modules keyed by their lora_A name; a lora_A or lora_B without its partner is no module."""
    present = set(names)
    modules: dict[str, _LoraModule] = {}
    for a_name in names:
        match = _LORA_A_PATTERN.search(a_name)
        if match is None:
            continue
        b_name = f"{a_name[: match.start(1)]}B{a_name[match.end(1) :]}"
        if b_name not in present:
            continue
        a_shape, b_shape = np.shape(reference[a_name]), np.shape(reference[b_name])
        if len(a_shape) < 2 or len(b_shape) < 2 or math.prod(b_shape[1:]) != a_shape[0]:
            raise ValueError(
                f"{b_name!r}: shape {b_shape} does not pair with {a_name!r} shape {a_shape}; "
                "similarity='lora-product' needs lora_A r×in and lora_B out×r"
            )
        fan_in = math.prod(a_shape[1:])
        modules[a_name] = _LoraModule(a_name, b_name, a_shape[0], fan_in, b_shape[0])
    return modules


def _keep_modules_whole(groups: Mapping[str, list[str]], modules: Mapping[str, _LoraModule]) -> dict[str, list[str]]:
    """Groups with each lora_B moved next to its lora_A (in lora_A's group), after the unpaired arrays."""
    partners = {module.b for module in modules.values()}
    result: dict[str, list[str]] = {}
    for key, members in groups.items():
        plain = [name for name in members if name not in modules and name not in partners]
        paired = [name for a_name in members if a_name in modules for name in (a_name, modules[a_name].b)]
        if plain or paired:
            result[key] = plain + paired
    return result


def _check_adapters(
    personalized: Sequence[Adapter], trained: Sequence[Adapter]
) -> tuple[list[str], list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """Same number of clients, keys, shapes and floating dtypes everywhere.

    Returns the key order and both sequences of adapters as dicts of arrays in that order.
    """
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
    shapes = {name: np.shape(personalized[0][name]) for name in names}
    pairs = [
        (_as_arrays(f"personalized[{i}]", start, shapes), _as_arrays(f"trained[{i}]", end, shapes))
        for i, (start, end) in enumerate(zip(personalized, trained))
    ]
    return names, [start for start, _ in pairs], [end for _, end in pairs]


def _as_arrays(label: str, adapter: Adapter, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The adapter as a dict of arrays in the order of ``shapes``, which it must match (floating dtypes)."""
    if set(adapter) != set(shapes):
        missing = sorted(set(shapes) - set(adapter))
        extra = sorted(set(adapter) - set(shapes))
        raise ValueError(f"{label}: keys differ from personalized[0] (missing {missing}, unexpected {extra})")
    arrays = {}
    for name, shape in shapes.items():
        array = np.asarray(adapter[name])
        if array.shape != shape:
            raise ValueError(f"{label}[{name!r}]: shape {array.shape} differs from personalized[0] shape {shape}")
        # dtype.kind rather than np.issubdtype: the same test, several times faster per array.
        if array.dtype.kind != "f":
            raise ValueError(f"{label}[{name!r}]: dtype {array.dtype} is not allowed; expected a floating dtype")
        arrays[name] = array
    return arrays


def _check_finite(label: str, adapter: Mapping[str, np.ndarray]) -> None:
    for name, array in adapter.items():
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{label}[{name!r}]: contains NaN or Inf; only finite values can be aggregated")


def _raise_non_finite(
    personalized: Sequence[Mapping[str, np.ndarray]], trained: Sequence[Mapping[str, np.ndarray]]
) -> None:
    """Name the first input array with NaN or Inf; a non-finite Gram diagonal without one is overflow."""
    for i, (start, end) in enumerate(zip(personalized, trained)):
        _check_finite(f"personalized[{i}]", start)
        _check_finite(f"trained[{i}]", end)
    raise ValueError("task vectors: squared norms overflow float32; values this large cannot be aggregated")
