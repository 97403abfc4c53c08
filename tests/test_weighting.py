"""Hand-computed cases for the alternative FedBip weighting rules (fedbilevel.weighting)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from fedbilevel.aggregation import cosine_from_gram, weight_matrix
from fedbilevel.weighting import (
    WEIGHTING_RULES,
    centered_gram,
    ema_similarity,
    self_weight_floor,
    similarity_weights,
)

# Off-diagonal rows {0.8, 0.2}, {0.8, 0.5}, {0.2, 0.5}: each has one peer at z = +1 and one at z = −1.
S3 = np.array([[1.0, 0.8, 0.2], [0.8, 1.0, 0.5], [0.2, 0.5, 1.0]])
# Client 0 is tied between clients 1 and 2; 1 and 2 are far apart.
TIED = np.array([[1.0, 0.6, 0.6], [0.6, 1.0, 0.2], [0.6, 0.2, 1.0]])
MIXED_SIGNS = np.array([[1.0, 0.5, -0.5], [0.5, 1.0, 0.0], [-0.5, 0.0, 1.0]])


def paired(same: float, other: float, pairs: int = 4) -> np.ndarray:
    """Cosines of 2·pairs clients in pairs: ``same`` within a pair, ``other`` across, 1 on the diagonal."""
    s = np.full((2 * pairs, 2 * pairs), other)
    for i in range(0, 2 * pairs, 2):
        s[i, i + 1] = s[i + 1, i] = same
    np.fill_diagonal(s, 1.0)
    return s


def test_module_imports_neither_torch_nor_flwr():
    code = "import fedbilevel.weighting, sys; print('torch' in sys.modules, 'flwr' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("negative", ["clip", "keep"])
@pytest.mark.parametrize(
    "similarity", [MIXED_SIGNS, S3, np.zeros((3, 3)), paired(0.86, 0.42), np.array([[1.0, -0.99], [-0.99, 1.0]])]
)
def test_paper_rule_is_weight_matrix_bit_for_bit(similarity, negative):
    expected = weight_matrix(similarity, negative=negative)
    assert np.array_equal(similarity_weights(similarity, rule="paper", negative=negative), expected)
    assert np.array_equal(similarity_weights(similarity[None], rule="paper", negative=negative)[0], expected)


def test_paper_rule_by_hand():
    # Clip: row 0 is [1, 0.5, 0] / 1.5; row 2 is [0, 0, 1]. Keep: row 0 is [1, 0.5, −0.5] / 1.
    np.testing.assert_allclose(
        similarity_weights(MIXED_SIGNS), [[2 / 3, 1 / 3, 0], [1 / 3, 2 / 3, 0], [0, 0, 1]], atol=1e-15
    )
    np.testing.assert_allclose(similarity_weights(MIXED_SIGNS, negative="keep")[0], [1, 0.5, -0.5], atol=1e-15)


def test_softmax_by_hand():
    # Row [1, 0.5, 0] with T = 0.5: logits [2, 1, 0], exp = [7.38905609893065, 2.718281828459045, 1]
    # summing to 11.107337927389695.
    s = np.array([[1.0, 0.5, 0.0], [0.5, 1.0, 0.5], [0.0, 0.5, 1.0]])
    w = similarity_weights(s, rule="softmax", temperature=0.5)
    np.testing.assert_allclose(w[0], [0.6652409557748219, 0.24472847105479764, 0.09003057317038046], rtol=1e-14)
    # Row [0.5, 1, 0.5]: logits [1, 2, 1], exp [e, e², e] over 2e + e² = 12.825565266807155.
    np.testing.assert_allclose(w[1], [0.21194155761708544, 0.5761168847658291, 0.21194155761708544], rtol=1e-14)


def test_softmax_is_stable_for_tiny_temperatures():
    w = similarity_weights(S3, rule="softmax", temperature=1e-6)  # logits up to 1e6: exp would overflow unshifted
    np.testing.assert_array_equal(w, np.eye(3))


def test_power_by_hand():
    # Row [1, 0.5, 0.25] squared: [1, 0.25, 0.0625] / 1.3125 = [16, 4, 1] / 21; the negative entry is clipped.
    s = np.array([[1.0, 0.5, 0.25], [0.5, 1.0, -0.5], [0.25, -0.5, 1.0]])
    w = similarity_weights(s, rule="power", power=2)
    np.testing.assert_allclose(w[0], [16 / 21, 4 / 21, 1 / 21], rtol=1e-14)
    np.testing.assert_allclose(w[1], [0.2, 0.8, 0.0], rtol=1e-14)  # [0.25, 1, 0] / 1.25


@pytest.mark.parametrize("similarity", [MIXED_SIGNS, S3, paired(0.86, 0.42)])
def test_power_one_and_top_k_everyone_equal_paper_clip(similarity):
    paper = weight_matrix(similarity)
    assert np.array_equal(similarity_weights(similarity, rule="power", power=1.0), paper)
    assert np.array_equal(similarity_weights(similarity, rule="top-k", top_k=len(similarity) - 1), paper)


def test_top_k_by_hand_with_ties_to_the_lower_index():
    # Row 0 ties clients 1 and 2 at 0.6: client 1 is kept, giving [1, 0.6, 0] / 1.6.
    w = similarity_weights(TIED, rule="top-k", top_k=1)
    np.testing.assert_allclose(w, [[5 / 8, 3 / 8, 0], [3 / 8, 5 / 8, 0], [3 / 8, 0, 5 / 8]], rtol=1e-14)


def test_threshold_by_hand():
    # t = 0.5 drops the 0.2 of clients 1 and 2; row 0 keeps both 0.6: [1, 0.6, 0.6] / 2.2.
    w = similarity_weights(TIED, rule="threshold", threshold=0.5)
    np.testing.assert_allclose(w, [[5 / 11, 3 / 11, 3 / 11], [3 / 8, 5 / 8, 0], [3 / 8, 0, 5 / 8]], rtol=1e-14)
    # A similarity equal to the threshold is kept (only values below it are dropped).
    np.testing.assert_allclose(
        similarity_weights(TIED, rule="threshold", threshold=0.6)[0], [5 / 11, 3 / 11, 3 / 11], rtol=1e-14
    )
    # Above every similarity, self is still kept: local training.
    np.testing.assert_array_equal(similarity_weights(TIED, rule="threshold", threshold=0.9), np.eye(3))


def test_zscore_softmax_by_hand():
    # Every row of S3 has peers at z = +1 and −1 (std 0.3 or 0.15); self takes the maximum, +1.
    # With z_temperature 1 the weights are [e, e, 1/e] / (2e + 1/e) = 0.468…, 0.468…, 0.063….
    w = similarity_weights(S3, rule="zscore-softmax", z_temperature=1.0, std_floor=0.01)
    big, small = 0.46831053083348123, 0.06337893833303763
    np.testing.assert_allclose(w, [[big, big, small], [big, big, small], [small, big, big]], rtol=1e-14)
    # std_floor 0.2 exceeds the 0.15 spread of rows 1 and 2: z = ±0.15 / 0.2 = ±0.75,
    # so [e^.75, e^.75, e^-.75] normalised.
    w = similarity_weights(S3, rule="zscore-softmax", z_temperature=1.0, std_floor=0.2)
    np.testing.assert_allclose(w[0], [big, big, small], rtol=1e-14)
    np.testing.assert_allclose(w[1], [0.4498162176582742, 0.4498162176582742, 0.10036756468345168], rtol=1e-14)
    # z_temperature 0.5 doubles the logits: [e², e², e⁻²] / (2e² + e⁻²).
    w = similarity_weights(S3, rule="zscore-softmax", z_temperature=0.5, std_floor=0.01)
    np.testing.assert_allclose(w[0], [0.4954626425778431, 0.4954626425778431, 0.009074714844313748], rtol=1e-14)


def test_zscore_softmax_is_averaging_when_peers_are_alike():
    # (a) An IID federation: all off-diagonal similarities equal gives exactly FedAvg, whatever their level.
    for level in (0.9, 0.3, -0.2):
        s = np.full((6, 6), level)
        np.fill_diagonal(s, 1.0)
        np.testing.assert_allclose(similarity_weights(s, rule="zscore-softmax"), np.full((6, 6), 1 / 6), rtol=1e-14)
    # Differences well under std_floor (±0.01 against 0.05) stay close to averaging, not local training.
    rng = np.random.default_rng(0)
    noise = rng.uniform(-0.01, 0.01, (8, 8))
    s = 0.5 + (noise + noise.T) / 2
    np.fill_diagonal(s, 1.0)
    w = similarity_weights(s, rule="zscore-softmax")
    assert np.all(w > 0.6 / 8) and np.all(w < 1.6 / 8)


def test_zscore_softmax_favours_clusters_at_any_cosine_level():
    # (b) Clear clusters: same pair at (0.86, 0.42) or (0.30, 0.10) — one z = √6 peer, six at −1/√6, self at √6.
    pair_weight = 0.8531001320681062  # 2e^√6 / (2e^√6 + 6e^(−1/√6))
    for same, other in ((0.86, 0.42), (0.30, 0.10)):
        w = similarity_weights(paired(same, other), rule="zscore-softmax")
        for i in range(8):
            partner = i ^ 1
            np.testing.assert_allclose(w[i, i] + w[i, partner], pair_weight, rtol=1e-12)
            assert w[i, i] == pytest.approx(w[i, partner])


def test_realistic_federation_paper_vs_adaptive():
    # Measured shape: 8 clients in 4 same-task pairs, cosine 0.86 within a pair and 0.42 across.
    s = paired(0.86, 0.42)
    pair = np.array([[i, i ^ 1] for i in range(8)])
    paper = similarity_weights(s, rule="paper")
    adaptive = similarity_weights(s, rule="zscore-softmax")
    assert np.all(np.take_along_axis(paper, pair, axis=1).sum(axis=1) < 0.5)  # 1.86 / 4.38 = 0.42
    assert np.all(np.take_along_axis(adaptive, pair, axis=1).sum(axis=1) > 0.8)


def test_zscore_cosine_by_hand():
    # zscore-softmax's weights of S3 (test above), times max(S, 0) with self at 1, paper-normalised.
    big, small = 0.46831053083348123, 0.06337893833303763
    w = similarity_weights(S3, rule="zscore-cosine", z_temperature=1.0, std_floor=0.01)
    row0 = np.array([big, 0.8 * big, 0.2 * small])
    row2 = np.array([0.2 * small, 0.5 * big, big])
    np.testing.assert_allclose(w[0], row0 / row0.sum(), rtol=1e-14)
    np.testing.assert_allclose(w[2], row2 / row2.sum(), rtol=1e-14)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-14)


def test_zscore_cosine_stays_local_where_cosines_carry_no_direction():
    """Grouped Flan-8's late rounds: 4 clients a task, cosines 0.05 within and 0.02 across tasks.
    zscore-softmax still ranks the partners first but mixes in everyone (it is blind to the level);
    zscore-cosine keeps a client's own update."""
    s = np.full((16, 16), 0.02)
    for t in range(4):
        s[4 * t : 4 * t + 4, 4 * t : 4 * t + 4] = 0.05
    np.fill_diagonal(s, 1.0)
    blind = similarity_weights(s, rule="zscore-softmax")
    aware = similarity_weights(s, rule="zscore-cosine")
    assert np.all(np.diag(blind) < 0.1)
    # Peers' mean 0.026, spread 0.012 < std_floor 0.05: z = +0.48 (self, partners), −0.12 (others); times the
    # cosines, self keeps e^.48 / (e^.48 (1 + 3·0.05) + 12·0.02·e^−.12) = 1 / (1.15 + 0.24 e^−.6).
    np.testing.assert_allclose(np.diag(aware), 1 / (1.15 + 0.24 * np.exp(-0.6)), rtol=1e-12)
    # Peers sharing no direction at all (cosines ≤ 0) leave exactly local training.
    opposed = np.array([[1.0, -0.5, 0.0], [-0.5, 1.0, -0.2], [0.0, -0.2, 1.0]])
    np.testing.assert_array_equal(similarity_weights(opposed, rule="zscore-cosine"), np.eye(3))


def test_zscore_cosine_keeps_clear_clusters_and_averages_iid_rows():
    # Same-task pairs at 0.86, 0.42 across: self and partner keep more than zscore-softmax's 0.853.
    w = similarity_weights(paired(0.86, 0.42), rule="zscore-cosine")
    for i in range(8):
        assert w[i, i] + w[i, i ^ 1] > 0.9
    # IID at cosine c: every peer c, self 1, so self 1 / (1 + c (N − 1)) and each peer c times that.
    for level in (0.9, 0.3):
        s = np.full((6, 6), level)
        np.fill_diagonal(s, 1.0)
        expected = np.full((6, 6), level / (1 + 5 * level))
        np.fill_diagonal(expected, 1 / (1 + 5 * level))
        np.testing.assert_allclose(similarity_weights(s, rule="zscore-cosine"), expected, rtol=1e-14)


def test_zscore_softmax_with_fewer_than_two_peers():
    np.testing.assert_array_equal(similarity_weights(np.ones((1, 1)), rule="zscore-softmax"), [[1.0]])
    # One peer has no spread: averaging, even at cosine −1 (centred N = 2).
    np.testing.assert_allclose(
        similarity_weights(np.array([[1.0, -1.0], [-1.0, 1.0]]), rule="zscore-softmax"), np.full((2, 2), 0.5)
    )


DEGENERATE = {
    "zero": np.zeros((3, 3)),
    "all negative": np.array([[1.0, -0.5, -0.9], [-0.5, 1.0, -1.0], [-0.9, -1.0, 1.0]]),
    "one zero vector": cosine_from_gram(np.array([[1.0, 0.0, 0.5], [0.0, 0.0, 0.0], [0.5, 0.0, 1.0]])),
    "identical": np.ones((4, 4)),
    "single": np.ones((1, 1)),
}


@pytest.mark.parametrize("rule", WEIGHTING_RULES)
@pytest.mark.parametrize("name", DEGENERATE)
def test_degenerate_input_gives_finite_rows_summing_to_one(rule, name):
    w = similarity_weights(DEGENERATE[name], rule=rule)
    assert np.all(np.isfinite(w))
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-14)


@pytest.mark.parametrize("rule", WEIGHTING_RULES)
def test_zero_task_vectors_fall_back_to_self(rule):
    # Like aggregation.py: a zero task vector keeps itself and gets no weight from anyone else.
    np.testing.assert_array_equal(similarity_weights(np.zeros((3, 3)), rule=rule), np.eye(3))
    w = similarity_weights(DEGENERATE["one zero vector"], rule=rule)
    np.testing.assert_array_equal(w[1], [0.0, 1.0, 0.0])
    np.testing.assert_array_equal(w[[0, 2], 1], [0.0, 0.0])


@pytest.mark.parametrize("rule", WEIGHTING_RULES)
def test_stack_matches_single_matrices(rule):
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(3, 5, 4))  # 3 layer groups, 5 clients
    stack = np.stack([cosine_from_gram(v @ v.T) for v in vectors])
    weights = similarity_weights(stack, rule=rule, top_k=2, threshold=0.0)
    assert weights.shape == (3, 5, 5)
    for group in range(3):
        np.testing.assert_array_equal(
            weights[group], similarity_weights(stack[group], rule=rule, top_k=2, threshold=0.0)
        )
    np.testing.assert_allclose(weights.sum(axis=2), 1.0, rtol=1e-14)
    assert np.all(weights >= 0)


def test_centered_gram_matches_explicit_mean_subtraction():
    rng = np.random.default_rng(2)
    # A large common direction plus client-specific parts, as in the measured updates.
    vectors = rng.normal(size=(4, 6, 50)) * 0.3 + rng.normal(size=50)
    centred = vectors - vectors.mean(axis=1, keepdims=True)
    expected = centred @ centred.transpose(0, 2, 1)
    grams = vectors @ vectors.transpose(0, 2, 1)
    np.testing.assert_allclose(centered_gram(grams), expected, atol=1e-10)
    np.testing.assert_allclose(centered_gram(grams[0]), expected[0], atol=1e-10)
    assert centered_gram(grams[0]).shape == (6, 6)


def test_centered_gram_by_hand_and_two_clients():
    # τ = (1, 0), (0, 1) → mean (½, ½), centred (½, −½) and (−½, ½): Gram [[½, −½], [−½, ½]], cosine −1.
    centred = centered_gram(np.eye(2))
    np.testing.assert_allclose(centred, [[0.5, -0.5], [-0.5, 0.5]], atol=1e-15)
    np.testing.assert_allclose(cosine_from_gram(centred), [[1.0, -1.0], [-1.0, 1.0]], atol=1e-15)


def test_self_weight_floor_by_hand():
    w = np.array([[0.2, 0.5, 0.3], [0.3, 0.6, 0.1], [0.0, 0.0, 1.0]])
    # Row 0: self 0.2 → 0.5, others × 0.5 / 0.8 = 0.625. Rows 1 (0.6 ≥ 0.5) and 2 (self 1) unchanged.
    floored = self_weight_floor(w, 0.5)
    np.testing.assert_allclose(floored, [[0.5, 0.3125, 0.1875], [0.3, 0.6, 0.1], [0.0, 0.0, 1.0]], rtol=1e-15)
    np.testing.assert_array_equal(floored[1:], w[1:])
    np.testing.assert_array_equal(self_weight_floor(w, 0.0), w)
    np.testing.assert_array_equal(self_weight_floor(w, 1.0), np.eye(3))
    stacked = self_weight_floor(np.stack([w, w]), 0.5)
    assert stacked.shape == (2, 3, 3)
    np.testing.assert_array_equal(stacked[1], floored)


def test_self_weight_floor_keeps_rows_summing_to_one():
    w = similarity_weights(paired(0.86, 0.42), rule="paper")
    floored = self_weight_floor(w, 0.4)
    np.testing.assert_allclose(floored.sum(axis=1), 1.0, rtol=1e-14)
    np.testing.assert_allclose(np.diag(floored), 0.4)


def test_ema_similarity_by_hand():
    previous = np.array([[1.0, 0.2], [0.2, 1.0]])
    current = np.array([[1.0, 0.6], [0.6, 1.0]])
    # 0.75 · 0.2 + 0.25 · 0.6 = 0.3; the diagonal stays 1.
    np.testing.assert_allclose(ema_similarity(previous, current, 0.75), [[1.0, 0.3], [0.3, 1.0]], rtol=1e-15)
    np.testing.assert_array_equal(ema_similarity(previous, current, 0.0), current)
    first = ema_similarity(None, current, 0.9)
    np.testing.assert_array_equal(first, current)
    assert first is not current
    assert ema_similarity(previous[None], current[None], 0.5).shape == (1, 2, 2)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"rule": "cosine"}, "weighting"),
        ({"negative": "abs"}, "negative-cosine"),
        ({"rule": "softmax", "negative": "keep"}, "negative-cosine"),
        ({"temperature": 0}, "weighting-temperature"),
        ({"temperature": -0.1}, "weighting-temperature"),
        ({"temperature": float("inf")}, "weighting-temperature"),
        ({"temperature": "0.1"}, "weighting-temperature"),
        ({"power": 0.5}, "weighting-power"),
        ({"power": float("nan")}, "weighting-power"),
        ({"top_k": 0}, "weighting-top-k"),
        ({"top_k": 1.5}, "weighting-top-k"),
        ({"top_k": True}, "weighting-top-k"),
        ({"threshold": float("nan")}, "weighting-threshold"),
        ({"threshold": None}, "weighting-threshold"),
        ({"z_temperature": 0.0}, "weighting-z-temperature"),
        ({"std_floor": 0.0}, "std_floor"),
        ({"std_floor": -1}, "std_floor"),
    ],
)
def test_bad_hyper_parameters_name_themselves(kwargs, name):
    # The rules' options are run-config keys (Weighting declares them); std_floor is the function's own.
    with pytest.raises(ValueError, match=rf"^{name}: " if name == "std_floor" else rf"^run-config key '{name}': "):
        similarity_weights(S3, **kwargs)


def test_bad_hyper_parameter_message_says_what_is_allowed():
    expected = r"^run-config key 'weighting-temperature': value 0 is not allowed; expected a number in \(0.0, inf\)$"
    with pytest.raises(ValueError, match=expected):
        similarity_weights(S3, rule="softmax", temperature=0)


@pytest.mark.parametrize("floor", [-0.1, 1.1, float("nan"), True])
def test_bad_floor(floor):
    with pytest.raises(ValueError, match=r"^floor: value .* is not allowed; expected a number in \[0, 1\]"):
        self_weight_floor(np.eye(2), floor)


@pytest.mark.parametrize("decay", [-0.1, 1.0, float("nan")])
def test_bad_decay(decay):
    with pytest.raises(ValueError, match=r"^decay: value .* is not allowed; expected a number in \[0, 1\)"):
        ema_similarity(None, np.eye(2), decay)


@pytest.mark.parametrize(
    "matrix", [np.ones((2, 3)), np.ones(3), np.ones((1, 2, 2, 2)), np.array([[1.0, np.nan], [0.0, 1.0]])]
)
def test_bad_shapes_and_values(matrix):
    with pytest.raises(ValueError, match=r"^similarity: "):
        similarity_weights(matrix)
    with pytest.raises(ValueError, match=r"^gram: "):
        centered_gram(matrix)
    with pytest.raises(ValueError, match=r"^weights: "):
        self_weight_floor(matrix, 0.5)
    with pytest.raises(ValueError, match=r"^current: "):
        ema_similarity(None, matrix, 0.5)


def test_ema_shape_mismatch():
    with pytest.raises(ValueError, match=r"^previous: shape \(3, 3\) differs from current shape \(2, 2\)"):
        ema_similarity(np.eye(3), np.eye(2), 0.5)
