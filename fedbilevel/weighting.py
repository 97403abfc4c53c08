"""Alternative FedBip weighting rules: pure NumPy, no Flower or torch.

The paper's rule (:func:`fedbilevel.aggregation.weight_matrix`) turns the cosine
similarity S of the client task vectors into weights pᵢₖ = max(Sᵢₖ, 0) / Σⱼ max(Sᵢⱼ, 0).
When every update shares a large common direction (e.g. learning the answer format),
all cosines are high and close together, so the weights are nearly uniform: measured,
same-task clients got only ~38% of the weight in round 1. The functions here make the
weights sharper or better targeted, and compose:

* :func:`centered_gram` removes the common direction before the cosine is taken;
* :func:`similarity_weights` turns similarities into weights by one of
  :data:`WEIGHTING_RULES`;
* :func:`self_weight_floor` guarantees each client a minimum weight on its own update;
* :func:`ema_similarity` smooths similarities across rounds.

Every function takes one N×N matrix or a G×N×N stack of them (one per layer group, for
FedBip-L) and returns float64 of the same number of dimensions. Weight rows sum to 1
and are never NaN. As in aggregation.py, a row whose weights cannot be normalised falls
back to the client's own update, pᵢᵢ = 1, and so does a zero task vector
(:func:`fedbilevel.aggregation.cosine_from_gram` gives it an all-zero row and column),
which gets no weight in any other row either: the softmax rules recognise it by its
diagonal (≤ 0), the others by its zero similarities.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fedbilevel.options import choice, integer, not_allowed, number, option, validate

NEGATIVE_COSINE_MODES = ("clip", "keep")
WEIGHTING_RULES = ("paper", "softmax", "power", "top-k", "threshold", "zscore-softmax", "zscore-cosine")

SIMILARITY_CENTERINGS = ("none", "mean")

# Row sums at or below this cannot be normalised safely (see fedbilevel.aggregation).
_MIN_ROW_SUM = 1e-8


@dataclass(frozen=True)
class Weighting:
    """How FedBip turns task-vector similarities into aggregation weights.

    The default is the paper's rule (with negative cosines clipped). The options compose
    in this order: the Gram matrix is centred (``centering="mean"``, :func:`centered_gram`),
    cosines are taken, the caller may smooth them across rounds (:func:`ema_similarity`),
    the rule turns them into weights (:func:`similarity_weights`), and self-weights are
    raised to ``self_floor`` (:func:`self_weight_floor`). Each field is a run-config key;
    a bad value raises :class:`~fedbilevel.options.ConfigError` naming it.

    Attributes
    ----------
    rule : str
        One of :data:`WEIGHTING_RULES`.
    negative : {"clip", "keep"}
        ``"keep"`` only with ``rule="paper"``.
    temperature, power, top_k, threshold, z_temperature : float, float, int, float, float
        The rules' hyper-parameters (see :func:`similarity_weights`).
    centering : {"none", "mean"}
        Remove the direction common to all task vectors before the cosine.
    self_floor : float
        Smallest self-weight, in [0, 1].
    """

    negative: str = option(
        "negative-cosine",
        "clip",
        choice(NEGATIVE_COSINE_MODES),
        "`clip` (negative cosines count as 0) or `keep` (the paper's formula literally; only with weighting `paper`); "
        'see "The two choices the paper leaves open"',
    )
    rule: str = option(
        "weighting",
        "paper",
        choice(WEIGHTING_RULES),
        'FedBip\'s weighting rule ("Beyond the paper"): '
        "`paper`, `softmax`, `power`, `top-k`, `threshold`, `zscore-softmax`, `zscore-cosine`",
    )
    temperature: float = option(
        "weighting-temperature", 0.1, number(0.0, low_open=True), "`softmax`: temperature, in cosine units"
    )
    power: float = option("weighting-power", 2.0, number(1.0, low_open=False), "`power`: exponent γ of max(S, 0)^γ")
    top_k: int = option("weighting-top-k", 1, integer(1), "`top-k`: peers kept besides self")
    threshold: float = option(
        "weighting-threshold",
        0.5,
        number(-1.0, low_open=False, high=1.0, high_open=False),
        "`threshold`: smallest cosine kept (self always kept)",
    )
    z_temperature: float = option(
        "weighting-z-temperature",
        1.0,
        number(0.0, low_open=True),
        "`zscore-softmax` and `zscore-cosine`: temperature, in standard deviations",
    )
    centering: str = option(
        "similarity-centering",
        "none",
        choice(SIMILARITY_CENTERINGS),
        "`mean`: cosines of τᵢ − mean τ (the direction common to all updates removed)",
    )
    self_floor: float = option(
        "self-weight-floor",
        0.0,
        number(0.0, low_open=False, high=1.0, high_open=False),
        "every client keeps at least this weight on its own update",
    )

    def __post_init__(self) -> None:
        validate(self)
        if self.negative == "keep" and self.rule != "paper":
            raise not_allowed(
                "negative-cosine", "keep", f"with weighting={self.rule!r} only weighting='paper' keeps negative cosines"
            )

    @property
    def is_paper(self) -> bool:
        """Whether this is exactly the paper's rule (no centring, no floor)."""
        return self.rule == "paper" and self.centering == "none" and self.self_floor == 0.0

    def weights(self, similarity: np.ndarray) -> np.ndarray:
        """Weights from (possibly smoothed) similarities, N×N or G×N×N."""
        weights = similarity_weights(
            similarity,
            rule=self.rule,
            negative=self.negative,
            temperature=self.temperature,
            power=self.power,
            top_k=self.top_k,
            threshold=self.threshold,
            z_temperature=self.z_temperature,
        )
        return self_weight_floor(weights, self.self_floor) if self.self_floor > 0 else weights


def centered_gram(gram: np.ndarray) -> np.ndarray:
    """Gram matrix of the task vectors minus their mean, from the Gram matrix of the task vectors.

    With cᵢ = τᵢ − (1/N) Σⱼ τⱼ, the result is ⟨cᵢ, cⱼ⟩ = ((I − 11ᵀ/N) G (I − 11ᵀ/N))ᵢⱼ,
    computed as G minus row means minus column means plus the grand mean. Its cosines
    (:func:`fedbilevel.aggregation.cosine_from_gram`) compare what is specific to each
    client, with the direction common to all updates removed.

    Since Σᵢ cᵢ = 0, centred cosines are relative: in each row the off-diagonal cosines,
    weighted by ‖cⱼ‖, sum to −‖cᵢ‖, so with equal norms they average −1/(N − 1). For
    N = 2, c₁ = −c₂ and the centred cosine is −1 (0 if τ₁ = τ₂): rules that clip negatives
    then give local training, and "zscore-softmax" (one peer, no spread) plain averaging;
    centring only separates clients for N ≥ 3. A zero task vector becomes −mean, so it is
    no longer recognised as "no update". The subtraction cancels the common part, so the
    Gram matrix should be accurate to well below the size of the centred entries (a
    float32 Gram product loses about 1e-7 × ‖τ‖² absolute).

    Parameters
    ----------
    gram : np.ndarray
        N×N Gram matrix G = τ τᵀ, or a G×N×N stack of them.

    Returns
    -------
    np.ndarray
        float64 centred Gram matrix (matrices), same shape as ``gram``.
    """
    grams, single = _as_stack("gram", gram)
    centered = (
        grams
        - grams.mean(axis=2, keepdims=True)
        - grams.mean(axis=1, keepdims=True)
        + grams.mean(axis=(1, 2), keepdims=True)
    )
    return centered[0] if single else centered


def check_ema_decay(decay: float) -> None:
    """Raise ValueError unless ``decay`` is a valid :func:`ema_similarity` decay, in [0, 1)."""
    _check_real("decay", decay, lambda v: 0 <= v < 1, "a number in [0, 1)")


def similarity_weights(
    similarity: np.ndarray,
    *,
    rule: str = "paper",
    negative: str = "clip",
    temperature: float = 0.1,
    power: float = 2.0,
    top_k: int = 1,
    threshold: float = 0.5,
    z_temperature: float = 1.0,
    std_floor: float = 0.05,
) -> np.ndarray:
    """Aggregation weights from a similarity matrix by one of :data:`WEIGHTING_RULES`.

    Rules (S the similarity, self on the diagonal; "paper-normalised" means
    p = max(x, 0) / Σ max(x, 0) per row, with the pᵢᵢ = 1 fallback):

    ``"paper"``
        FedBip: S paper-normalised (``negative="keep"``: S / ΣS, weights may be negative);
        bit-for-bit :func:`fedbilevel.aggregation.weight_matrix`.
    ``"softmax"``
        pᵢₖ = exp(Sᵢₖ / T) / Σⱼ exp(Sᵢⱼ / T), T = ``temperature`` in cosine units. Sharp
        for small T, but a T tuned on one federation can give local training (self, at
        cosine 1, dominating) on another whose cosines are lower.
    ``"power"``
        max(S, 0)^γ paper-normalised, γ = ``power`` ≥ 1; γ = 1 is ``"paper"`` (clip).
    ``"top-k"``
        Self and the ``top_k`` most similar others (ties: the lower client index first),
        paper-normalised; the rest get 0. ``top_k`` ≥ N − 1 is ``"paper"`` (clip).
    ``"threshold"``
        Similarities below ``threshold`` set to 0 (self always kept), paper-normalised.
    ``"zscore-softmax"`` (adaptive)
        Per row i, the similarities to the other clients are standardised,
        zᵢₖ = (Sᵢₖ − μᵢ) / max(σᵢ, ``std_floor``) with μᵢ, σᵢ their mean and (population)
        standard deviation; self is given the largest of them, zᵢᵢ = maxₖ zᵢₖ; then
        pᵢₖ = softmax(zᵢ / ``z_temperature``)ₖ. Standardising makes the weights depend on
        how the peers rank relative to the spread of the row, not on the cosines' level,
        so one ``z_temperature`` (in standard deviations) transfers between federations
        (a row a·S + b, a > 0, gets the same weights while aσᵢ ≥ ``std_floor``). Self is
        tied to the closest peer rather than standardised itself: its cosine is 1 by
        construction, and its own z-score (1 − μᵢ) / σᵢ grows without bound exactly when
        the peers are uniformly similar, which would turn an IID federation into local
        training. Tied, all-equal peers give z = 0 everywhere, i.e. plain averaging
        (FedAvg); differences well under ``std_floor`` count as noise and stay close to
        it; a clear cluster gets most of the weight (self and its cluster-mates equally).
        An outlier with no close peer is mixed like an IID client; combine with
        :func:`self_weight_floor` to limit that. With one peer (N = 2) there is no spread
        and the result is averaging.
    ``"zscore-cosine"`` (adaptive, level-aware)
        ``"zscore-softmax"``'s weights multiplied by max(Sᵢₖ, 0) (self by Sᵢᵢ, 1 for cosines)
        and paper-normalised: the z-scores choose whom to trust, the cosines how much.
        ``"zscore-softmax"`` is blind to the level, so a row whose cosines are all near 0
        (updates that share no direction, as once each client memorises its few examples)
        is averaged as if the clients were IID; here such a row stays near local training
        (peers at cosine c ≪ 1 keep weights of order c), while a clear cluster at a useful
        level keeps most of its weight and an IID row at cosine c averages with self
        weighted 1/c against each peer. Measured on grouped Flan-8 (docs/BENCHMARKS.md).

    Parameters
    ----------
    similarity : np.ndarray
        N×N similarity matrix (e.g. cosines), or a G×N×N stack (FedBip-L).
    rule : str
        One of :data:`WEIGHTING_RULES`.
    negative : {"clip", "keep"}
        Only ``rule="paper"`` may keep negative similarities; the other rules clip them
        (softmax rules need no clipping: a negative similarity just gets a small weight).
    temperature : float
        Softmax temperature T > 0 of ``"softmax"``, in cosine units.
    power : float
        Exponent γ ≥ 1 of ``"power"``.
    top_k : int
        Number of peers ≥ 1 kept by ``"top-k"``.
    threshold : float
        Smallest similarity (finite) kept by ``"threshold"``.
    z_temperature : float
        Softmax temperature > 0 of ``"zscore-softmax"`` and ``"zscore-cosine"``, in standard deviations.
    std_floor : float
        Lower bound > 0 on the per-row standard deviation of ``"zscore-softmax"``, in
        similarity units: differences much smaller than it are treated as noise.

    Every hyper-parameter is validated whichever rule is chosen (as a :class:`Weighting`).

    Returns
    -------
    np.ndarray
        float64 weights, same shape as ``similarity``, rows summing to 1.
    """
    Weighting(
        rule=rule,
        negative=negative,
        temperature=temperature,
        power=power,
        top_k=top_k,
        threshold=threshold,
        z_temperature=z_temperature,
    )
    _check_real("std_floor", std_floor, lambda v: v > 0, "a number > 0")
    scores, single = _as_stack("similarity", similarity)

    n = scores.shape[1]
    eye = np.eye(n, dtype=bool)
    if rule == "paper":
        weights = normalised_weights(scores, negative)
    elif rule == "power":
        weights = normalised_weights(np.clip(scores, 0.0, None) ** power, "clip")
    elif rule == "threshold":
        weights = normalised_weights(np.where((scores >= threshold) | eye, scores, 0.0), "clip")
    elif rule == "top-k":
        # Stable sort of −S (self last): equal similarities keep index order, lower index first.
        order = np.argsort(np.where(eye, np.inf, -scores), axis=2, kind="stable")
        ranks = np.empty_like(order)
        np.put_along_axis(ranks, order, np.arange(n), axis=2)
        weights = normalised_weights(np.where((ranks < top_k) | eye, scores, 0.0), "clip")
    elif rule == "softmax":
        weights = _softmax_rows(scores / temperature, _present(scores))
    else:
        weights = _softmax_rows(_zscores(scores, std_floor) / z_temperature, _present(scores))
        if rule == "zscore-cosine":
            weights = normalised_weights(weights * np.clip(scores, 0.0, None), "clip")
    return weights[0] if single else weights


def self_weight_floor(weights: np.ndarray, floor: float) -> np.ndarray:
    """Weights with every self-weight raised to at least ``floor``, the others scaled down.

    In a row with pᵢᵢ < floor, pᵢᵢ becomes ``floor`` and every other weight is multiplied
    by (1 − floor) / (1 − pᵢᵢ), so the row sum is kept; rows with pᵢᵢ ≥ floor are returned
    unchanged. ``floor=0`` changes nothing, ``floor=1`` gives local training.

    Parameters
    ----------
    weights : np.ndarray
        N×N weights (rows summing to 1), or a G×N×N stack.
    floor : float
        Smallest self-weight, 0 ≤ floor ≤ 1.

    Returns
    -------
    np.ndarray
        float64 weights, same shape as ``weights``.
    """
    _check_real("floor", floor, lambda v: 0 <= v <= 1, "a number in [0, 1]")
    stack, single = _as_stack("weights", weights)
    diagonal = np.arange(stack.shape[1])
    own = stack[:, diagonal, diagonal]
    low = own < floor
    # In raised rows 1 − pᵢᵢ > 1 − floor ≥ 0, so the division is safe.
    scale = np.where(low, (1.0 - floor) / np.where(low, 1.0 - own, 1.0), 1.0)
    result = stack * scale[:, :, None]
    result[:, diagonal, diagonal] = np.where(low, floor, own)
    return result[0] if single else result


def ema_similarity(previous: np.ndarray | None, current: np.ndarray, decay: float) -> np.ndarray:
    """Exponential moving average of similarity matrices across rounds.

    S' = decay · previous + (1 − decay) · current, or ``current`` when ``previous`` is
    None (first round). Row/column k of both must belong to the same client: the caller
    aligns them by partition id, and for a client new this round copies its current row
    and column into ``previous`` (so its similarity starts unsmoothed).

    Parameters
    ----------
    previous : np.ndarray or None
        Smoothed similarity of the previous round (N×N or G×N×N), or None.
    current : np.ndarray
        This round's similarity, same shape as ``previous``.
    decay : float
        Weight of the past, 0 ≤ decay < 1 (0: no smoothing).

    Returns
    -------
    np.ndarray
        float64 smoothed similarity, same shape as ``current``.
    """
    check_ema_decay(decay)
    stack, single = _as_stack("current", current)
    if previous is not None:
        past, _ = _as_stack("previous", previous)
        if past.shape != stack.shape:
            raise ValueError(
                f"previous: shape {np.shape(previous)} differs from current shape {np.shape(current)}; "
                "align clients by partition id first"
            )
        stack = decay * past + (1.0 - decay) * stack
    else:
        stack = stack.copy()  # never hand back (a view of) the caller's array
    return stack[0] if single else stack


def _present(scores: np.ndarray) -> np.ndarray:
    """G×N mask of clients with a positive self-similarity (a zero task vector has 0)."""
    diagonal = np.arange(scores.shape[1])
    return scores[:, diagonal, diagonal] > 0


def _zscores(scores: np.ndarray, std_floor: float) -> np.ndarray:
    """Per-row standardised similarities to the present peers; self tied to the row maximum, absent peers −inf."""
    n = scores.shape[1]
    diagonal = np.arange(n)
    peers = _present(scores)[:, None, :] & ~np.eye(n, dtype=bool)
    count = np.maximum(peers.sum(axis=2, keepdims=True), 1)
    mean = np.where(peers, scores, 0.0).sum(axis=2, keepdims=True) / count
    std = np.sqrt(np.where(peers, (scores - mean) ** 2, 0.0).sum(axis=2, keepdims=True) / count)
    z = np.where(peers, (scores - mean) / np.maximum(std, std_floor), -np.inf)
    # A row without peers keeps only itself (z = 0 against −inf); see the rule's docstring for the tie.
    top = z.max(axis=2)
    z[:, diagonal, diagonal] = np.where(np.isfinite(top), top, 0.0)
    return z


def _softmax_rows(logits: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Row softmax over the present clients; an absent client's row is its self-weight 1."""
    diagonal = np.arange(logits.shape[1])
    logits = np.where(present[:, :, None] & present[:, None, :], logits, -np.inf)
    logits[:, diagonal, diagonal] = np.where(present, logits[:, diagonal, diagonal], 0.0)
    # Subtracting the row maximum keeps exp() from overflowing; every row has a finite entry.
    weights = np.exp(logits - logits.max(axis=2, keepdims=True))
    return weights / weights.sum(axis=2, keepdims=True)


def _check_real(name: str, value: object, allowed: Callable[[float], bool], expected: str) -> None:
    """Raise ``name: value … is not allowed; expected …`` unless ``value`` is a finite real number
    passing ``allowed``.
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and allowed(value)
    if not ok:
        raise ValueError(f"{name}: value {value!r} is not allowed; expected {expected}")


def _as_stack(name: str, matrix: np.ndarray) -> tuple[np.ndarray, bool]:
    """A finite float64 G×N×N stack and whether the input was a single N×N matrix."""
    stack = np.asarray(matrix, dtype=np.float64)
    if stack.ndim not in (2, 3) or stack.shape[-1] != stack.shape[-2]:
        raise ValueError(f"{name}: expected a square N×N matrix or a G×N×N stack, got shape {stack.shape}")
    if not np.all(np.isfinite(stack)):
        raise ValueError(f"{name}: contains NaN or Inf; only finite values are allowed")
    return (stack[None], True) if stack.ndim == 2 else (stack, False)


def normalised_weights(similarity: np.ndarray, negative: str) -> np.ndarray:
    """The paper's pᵢₖ = Sᵢₖ / Σⱼ Sᵢⱼ (negatives clipped to 0 unless ``negative="keep"``) of every
    matrix in a G×N×N float64 stack, with the pᵢᵢ = 1 fallback for rows that cannot be normalised
    (:func:`fedbilevel.aggregation.weight_matrix` of one matrix)."""
    scores = np.clip(similarity, 0.0, None) if negative == "clip" else similarity
    row_sums = scores.sum(axis=2)
    normalisable = row_sums > _MIN_ROW_SUM
    weights = np.where(normalisable[:, :, None], scores / np.where(normalisable, row_sums, 1.0)[:, :, None], 0.0)
    diagonal = np.arange(similarity.shape[1])
    weights[:, diagonal, diagonal] = np.where(normalisable, weights[:, diagonal, diagonal], 1.0)
    return weights


def staleness_discounted(weights: np.ndarray, discount: np.ndarray) -> np.ndarray:
    """Weights with column k scaled by its discount dₖ, rows normalised again: p̃ᵢₖ = dₖ pᵢₖ / Σⱼ dⱼ pᵢⱼ.

    FedBip's ``absent-client-rule = "remember"`` rule: a column k that is an absent client's last
    task vector has dₖ = γ^aₖ for its age aₖ in rounds (a fresh one: d = 1), so stale updates
    count less the older they are, as asynchronous FL discounts stale updates (FedAsync, Xie et
    al. 2019, uses a polynomial s(a); MIFA, Gu et al., NeurIPS 2021, reuses every client's
    latest update undiscounted). With the paper's rule this is pᵢₖ ∝ dₖ Sᵢₖ. A row that cannot
    be normalised (its discounted sum ≤ 1e-8) falls back to pᵢᵢ = 1.

    Parameters
    ----------
    weights : np.ndarray
        G×N×N (or N×N) weights, rows summing to 1; column k belongs to client k.
    discount : np.ndarray
        N discounts in [0, 1].

    Returns
    -------
    np.ndarray
        float64 weights of the same shape, rows summing to 1.
    """
    stack, squeeze = _as_stack("weights", weights)
    discount = np.asarray(discount, dtype=np.float64)
    if discount.shape != (stack.shape[-1],) or np.any(discount < 0) or np.any(discount > 1):
        raise ValueError(f"discount: expected {stack.shape[-1]} numbers in [0, 1], got {discount.tolist()}")
    scaled = stack * discount[None, None, :]
    row_sums = scaled.sum(axis=2)
    normalisable = row_sums > _MIN_ROW_SUM
    result = np.where(normalisable[:, :, None], scaled / np.where(normalisable, row_sums, 1.0)[:, :, None], 0.0)
    diagonal = np.arange(stack.shape[1])
    result[:, diagonal, diagonal] = np.where(normalisable, result[:, diagonal, diagonal], 1.0)
    return result[0] if squeeze else result


def check_choice(key: str, value: object, allowed: Sequence[str]) -> None:
    """Raise ValueError naming the argument ``key`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{key}: {value!r} is not allowed; choose one of {', '.join(allowed)}")
