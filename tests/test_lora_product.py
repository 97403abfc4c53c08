"""similarity="lora-product": cosine of the LoRA modules' effective updates ΔW = BA (fedbilevel.aggregation)."""

import math

import numpy as np
import pytest

from fedbilevel.aggregation import (
    cosine_similarity_matrix,
    fedbip_aggregate,
    fedbip_aggregate_detailed,
    weight_matrix,
)

PREFIX = "base_model.model.model.layers"


def peft_name(layer, proj, factor):
    return f"{PREFIX}.{layer}.self_attn.{proj}_proj.lora_{factor}.weight"


def random_clients(shapes, n=5, seed=0):
    rng = np.random.default_rng(seed)
    initial = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    start = [{k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in initial.items()} for _ in range(n)]
    trained = [{k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in s.items()} for s in start]
    return initial, start, trained


def dense_delta(adapter, reference, a_name, b_name):
    """BA − B̄Ā with ΔW formed explicitly (factors read as r×in and out×r), float64."""
    a, b = (np.asarray(adapter[k], np.float64) for k in (a_name, b_name))
    a0, b0 = (np.asarray(reference[k], np.float64) for k in (a_name, b_name))
    rank = a.shape[0]
    return b.reshape(-1, rank) @ a.reshape(rank, -1) - b0.reshape(-1, rank) @ a0.reshape(rank, -1)


def dense_vectors(trained, starts, pairs, plain):
    """Per client: concatenated ΔW of the pairs and τ of the plain arrays."""
    return np.stack(
        [
            np.concatenate(
                [dense_delta(t, s, a, b).ravel() for a, b in pairs]
                + [(np.asarray(t[k], np.float64) - s[k]).ravel() for k in plain]
            )
            for t, s in zip(trained, starts)
        ]
    )


LLAMA_LIKE = {
    peft_name(0, "q", "A"): (3, 6),
    peft_name(0, "q", "B"): (5, 3),
    peft_name(0, "v", "A"): (3, 6),
    peft_name(0, "v", "B"): (4, 3),
    peft_name(1, "q", "A"): (3, 6),
    peft_name(1, "q", "B"): (5, 3),
    "base_model.model.score.weight": (2, 5),  # no A/B pair: plain inner product
}
PAIRS = [(peft_name(layer, proj, "A"), peft_name(layer, proj, "B")) for layer, proj in [(0, "q"), (0, "v"), (1, "q")]]
PLAIN = ["base_model.model.score.weight"]


@pytest.mark.parametrize("task_vector", ["round", "cumulative"])
def test_flat_lora_product_matches_dense_formula(task_vector):
    initial, start, trained = random_clients(LLAMA_LIKE)
    starts = start if task_vector == "round" else [initial] * len(start)
    result = fedbip_aggregate_detailed(
        start, trained, similarity="lora-product", task_vector=task_vector, initial=initial
    )
    expected = cosine_similarity_matrix(dense_vectors(trained, starts, PAIRS, PLAIN))
    np.testing.assert_allclose(result.similarity, expected, atol=1e-5)
    np.testing.assert_allclose(result.weights, weight_matrix(expected), atol=1e-5)
    # The weighted sum acts on the parameters, A and B separately.
    for i, adapter in enumerate(result.adapters):
        for name in LLAMA_LIKE:
            update = sum(result.weights[i, k] * (trained[k][name] - starts[k][name]) for k in range(len(start)))
            np.testing.assert_allclose(adapter[name], starts[i][name] + update, rtol=1e-5, atol=1e-5)


def test_block_layerwise_lora_product_matches_dense_formula():
    _, start, trained = random_clients(LLAMA_LIKE, seed=1)
    result = fedbip_aggregate_detailed(start, trained, similarity="lora-product", layerwise=True, grouping="block")
    assert list(result.group_similarity) == ["block.0", "block.1", PLAIN[0]]
    expected = {
        "block.0": dense_vectors(trained, start, PAIRS[:2], []),
        "block.1": dense_vectors(trained, start, PAIRS[2:], []),
        PLAIN[0]: dense_vectors(trained, start, [], PLAIN),
    }
    for key, vectors in expected.items():
        np.testing.assert_allclose(result.group_similarity[key], cosine_similarity_matrix(vectors), atol=1e-5)


def test_array_layerwise_groups_each_module_under_its_lora_a_name():
    _, start, trained = random_clients(LLAMA_LIKE, seed=2)
    result = fedbip_aggregate_detailed(start, trained, similarity="lora-product", layerwise=True)
    assert list(result.group_weights) == [a for a, _ in PAIRS] + PLAIN
    for a, b in PAIRS:
        expected = cosine_similarity_matrix(dense_vectors(trained, start, [(a, b)], []))
        np.testing.assert_allclose(result.group_similarity[a], expected, atol=1e-5)
        # lora_B is mixed with its module's weights.
        weights = result.group_weights[a]
        update = sum(weights[1, k] * (trained[k][b] - start[k][b]) for k in range(len(start)))
        np.testing.assert_allclose(result.adapters[1][b], start[1][b] + update, rtol=1e-5, atol=1e-5)


def test_factor_updates_disagree_but_effective_updates_agree_by_hand():
    # r = in = out = 1: ΔW = BA − B̄Ā. Client 1: Ā=1, B̄=1 -> A=2, B=1: ΔW = 1, τ = (δA, δB) = (1, 0).
    # Client 2: Ā=2, B̄=1 -> A=1, B=3: ΔW = 1, τ = (-1, 2). Flat cos = -1/√5 (clipped: own update);
    # lora-product cos = 1: p = [1/2, 1/2], mean τ = (0, 1).
    a, b = peft_name(0, "q", "A"), peft_name(0, "q", "B")

    def lora(a_value, b_value):
        return {a: np.array([[a_value]], np.float32), b: np.array([[b_value]], np.float32)}

    start, trained = [lora(1, 1), lora(2, 1)], [lora(2, 1), lora(1, 3)]
    flat = fedbip_aggregate_detailed(start, trained)
    np.testing.assert_allclose(flat.similarity[0, 1], -1 / math.sqrt(5), rtol=1e-6)
    np.testing.assert_allclose(flat.weights, np.eye(2))
    result = fedbip_aggregate_detailed(start, trained, similarity="lora-product")
    np.testing.assert_allclose(result.similarity, np.ones((2, 2)), atol=1e-7)
    np.testing.assert_allclose(result.weights, np.full((2, 2), 0.5), atol=1e-7)
    np.testing.assert_allclose([result.adapters[0][a][0, 0], result.adapters[0][b][0, 0]], [1, 2], atol=1e-6)
    np.testing.assert_allclose([result.adapters[1][a][0, 0], result.adapters[1][b][0, 0]], [2, 2], atol=1e-6)


def test_reparametrised_factors_and_orthogonal_module_by_hand():
    # Common start A = [1 0], B = 0 (peft init): ΔW = BA. Clients 1 and 2 reach the same
    # ΔW = e1 e1ᵀ through different factors; client 3 reaches e2 e1ᵀ, orthogonal to it.
    a, b = peft_name(0, "v", "A"), peft_name(0, "v", "B")
    start = [{a: np.array([[1.0, 0.0]], np.float32), b: np.zeros((2, 1), np.float32)} for _ in range(3)]
    trained = [
        {a: np.array([[1.0, 0.0]], np.float32), b: np.array([[1.0], [0.0]], np.float32)},
        {a: np.array([[2.0, 0.0]], np.float32), b: np.array([[0.5], [0.0]], np.float32)},
        {a: np.array([[1.0, 0.0]], np.float32), b: np.array([[0.0], [1.0]], np.float32)},
    ]
    result = fedbip_aggregate_detailed(start, trained, similarity="lora-product")
    np.testing.assert_allclose(result.similarity, [[1, 1, 0], [1, 1, 0], [0, 0, 1]], atol=1e-7)
    np.testing.assert_allclose(result.weights, [[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1]], atol=1e-7)
    # Clients 1 and 2: start + (τ1 + τ2)/2 = A [1.5 0], B [0.75 0]ᵀ; client 3 keeps its own.
    for i in (0, 1):
        np.testing.assert_allclose(result.adapters[i][a], [[1.5, 0]], atol=1e-6)
        np.testing.assert_allclose(result.adapters[i][b], [[0.75], [0]], atol=1e-6)
    np.testing.assert_allclose(result.adapters[2][b], [[0], [1]], atol=1e-6)


@pytest.mark.parametrize(
    "shapes",
    [
        # peft's in-memory names carry the adapter name.
        {"m.q_proj.lora_A.default.weight": (2, 3), "m.q_proj.lora_B.default.weight": (4, 2)},
        # Embedding LoRA: lora_embedding_A r×num_embeddings, lora_embedding_B dim×r.
        {"m.embed_tokens.lora_embedding_A": (2, 7), "m.embed_tokens.lora_embedding_B": (3, 2)},
        # Conv LoRA: A r×in×k×k, B out×r×1×1.
        {"m.conv.lora_A.weight": (2, 3, 2, 2), "m.conv.lora_B.weight": (5, 2, 1, 1)},
    ],
    ids=["adapter-name", "embedding", "conv"],
)
def test_other_peft_layouts_pair_up(shapes):
    _, start, trained = random_clients(shapes, n=4, seed=3)
    a_name, b_name = shapes
    result = fedbip_aggregate_detailed(start, trained, similarity="lora-product")
    expected = cosine_similarity_matrix(dense_vectors(trained, start, [(a_name, b_name)], []))
    np.testing.assert_allclose(result.similarity, expected, atol=1e-5)


def test_without_pairs_lora_product_is_flat():
    # A lora_A without its lora_B (and any other array) is an ordinary parameter.
    shapes = {peft_name(0, "q", "A"): (2, 3), "head.weight": (4,)}
    _, start, trained = random_clients(shapes, n=4, seed=4)
    for layerwise in (False, True):
        flat = fedbip_aggregate_detailed(start, trained, layerwise=layerwise)
        lora = fedbip_aggregate_detailed(start, trained, layerwise=layerwise, similarity="lora-product")
        np.testing.assert_array_equal(lora.similarity, flat.similarity)
        for x, y in zip(flat.adapters, lora.adapters):
            for k in shapes:
                np.testing.assert_array_equal(x[k], y[k])


def test_small_updates_keep_their_precision():
    # ΔW ~ 1e-4 · BA: subtracting BᵢAᵢ − B̄ᵢĀᵢ as two large products would lose it in float32.
    _, start, _ = random_clients(LLAMA_LIKE, n=4, seed=5)
    rng = np.random.default_rng(6)
    trained = [{k: (v + 1e-4 * rng.normal(size=v.shape)).astype(np.float32) for k, v in s.items()} for s in start]
    result = fedbip_aggregate_detailed(start, trained, similarity="lora-product")
    expected = cosine_similarity_matrix(dense_vectors(trained, start, PAIRS, PLAIN))
    np.testing.assert_allclose(result.similarity, expected, atol=1e-4)


def test_unknown_similarity_fails_in_one_line():
    start = [{"w": np.zeros(2, np.float32)}]
    with pytest.raises(ValueError, match=r"^similarity: 'dense' is not allowed; choose one of flat, lora-product$"):
        fedbip_aggregate(start, start, similarity="dense")


def test_mismatched_factor_shapes_are_rejected():
    start = [{"m.lora_A.weight": np.zeros((3, 5), np.float32), "m.lora_B.weight": np.zeros((4, 2), np.float32)}]
    with pytest.raises(ValueError, match=r"'m\.lora_B\.weight': shape \(4, 2\) does not pair with 'm\.lora_A\.weight'"):
        fedbip_aggregate(start, start, similarity="lora-product")


def test_nan_in_a_factor_is_named():
    _, start, trained = random_clients(LLAMA_LIKE, n=3, seed=7)
    a, b = PAIRS[1]
    trained[2][b][1, 0] = np.nan
    with pytest.raises(ValueError, match=rf"trained\[2\]\['{b}'\]: contains NaN or Inf"):
        fedbip_aggregate(start, trained, similarity="lora-product")
    trained[2][b][1, 0] = 0.0
    start[1][a][0, 2] = np.inf
    with pytest.raises(ValueError, match=rf"personalized\[1\]\['{a}'\]: contains NaN or Inf"):
        fedbip_aggregate(start, trained, similarity="lora-product", layerwise=True)
