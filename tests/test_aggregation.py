"""Hand-computed cases for the FedBip math (fedbilevel.aggregation)."""

import math
import subprocess
import sys

import numpy as np
import pytest

from fedbilevel.aggregation import (
    FedBipSettings,
    cosine_similarity_matrix,
    fedbip_aggregate,
    fedbip_aggregate_detailed,
    fedexp_steps,
    layer_groups,
    weight_matrix,
)
from fedbilevel.options import ConfigError
from fedbilevel.weighting import Weighting

R2 = math.sqrt(2.0)


def adapters(*rows, key="w"):
    return [{key: np.asarray(r, dtype=np.float32)} for r in rows]


def test_module_is_pure_numpy():
    # The math must stay importable without Flower or torch (servers, notebooks, tests).
    code = (
        "import sys, fedbilevel.aggregation; "
        "bad = [m for m in ('torch', 'flwr', 'peft', 'transformers') if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_cosine_matrix_by_hand():
    s = cosine_similarity_matrix(np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]))
    expected = np.array([[1, 1 / R2, 0], [1 / R2, 1, 1 / R2], [0, 1 / R2, 1]])
    np.testing.assert_allclose(s, expected, atol=1e-12)


def test_fedbip_three_clients_by_hand():
    # θ̄ differs per client, so the "θ̄ᵢ +" part of the rule is checked too.
    start = adapters([10, 20], [-1, 3], [0, 0])
    taus = [np.array([1.0, 0.0]), np.array([1.0, 1.0]), np.array([0.0, 1.0])]
    trained = [{"w": start[i]["w"] + taus[i]} for i in range(3)]
    result = fedbip_aggregate_detailed(start, trained)
    # Row 1: S = [1, 1/√2, 0] -> p = [2-√2, √2-1, 0].
    # Row 2: S = [1/√2, 1, 1/√2] -> p = [1-1/√2, √2-1, 1-1/√2].
    expected_w = np.array([[2 - R2, R2 - 1, 0], [1 - 1 / R2, R2 - 1, 1 - 1 / R2], [0, R2 - 1, 2 - R2]])
    np.testing.assert_allclose(result.weights, expected_w, atol=1e-7)
    np.testing.assert_allclose(result.adapters[0]["w"], [10 + 1, 20 + (R2 - 1)], atol=1e-5)
    np.testing.assert_allclose(result.adapters[1]["w"], [-1 + 1 / R2, 3 + 1 / R2], atol=1e-5)
    np.testing.assert_allclose(result.adapters[2]["w"], [0 + (R2 - 1), 0 + 1], atol=1e-5)


def test_negative_cosine_clip_keeps_own_update():
    start = adapters([0, 0], [5, 5])
    trained = adapters([1, 0], [4, 6])  # τ2 = [-1, 1]: cos(τ1, τ2) = -1/√2
    result = fedbip_aggregate_detailed(start, trained, negative="clip")
    np.testing.assert_allclose(result.weights, np.eye(2))
    np.testing.assert_allclose(result.adapters[0]["w"], [1, 0])
    np.testing.assert_allclose(result.adapters[1]["w"], [4, 6])


def test_negative_cosine_keep_is_literal_formula():
    start = adapters([0, 0], [5, 5])
    trained = adapters([1, 0], [4, 6])
    result = fedbip_aggregate_detailed(start, trained, negative="keep")
    # Row sum 1 - 1/√2; p = [1, -1/√2] / (1 - 1/√2) = [2+√2, -(1+√2)].
    p_self, p_other = 2 + R2, -(1 + R2)
    np.testing.assert_allclose(result.weights[0], [p_self, p_other], rtol=1e-6)
    expected = p_self * np.array([1, 0]) + p_other * np.array([-1, 1])
    np.testing.assert_allclose(result.adapters[0]["w"], expected, rtol=1e-5)
    np.testing.assert_allclose(result.weights.sum(axis=1), [1, 1])


def test_keep_with_nonpositive_row_sum_falls_back_to_own_update():
    start = adapters([0, 0], [0, 0])
    trained = adapters([1, 0], [-2, 0])  # cos = -1: signed row sum is exactly 0
    result = fedbip_aggregate_detailed(start, trained, negative="keep")
    np.testing.assert_allclose(result.weights, np.eye(2))
    np.testing.assert_allclose(result.adapters[1]["w"], [-2, 0])
    assert np.all(np.isfinite(result.weights))


def test_zero_task_vector_is_similar_to_nothing():
    start = adapters([1, 1], [2, 2], [0, 0])
    trained = adapters([2, 1], [2, 2], [1, 1])  # τ2 = 0
    result = fedbip_aggregate_detailed(start, trained)
    assert np.all(np.isfinite(result.similarity))
    np.testing.assert_allclose(result.similarity[1], [0, 0, 0])
    np.testing.assert_allclose(result.weights[1], [0, 1, 0])
    np.testing.assert_allclose(result.adapters[1]["w"], [2, 2])
    # Client 1 (τ=[1,0]) and 3 (τ=[1,1]): p = [2-√2, 0, √2-1].
    np.testing.assert_allclose(result.weights[0], [2 - R2, 0, R2 - 1], atol=1e-7)


def test_all_zero_updates_change_nothing():
    start = adapters([1, 2], [3, 4])
    out = fedbip_aggregate(start, start)
    for before, after in zip(start, out):
        np.testing.assert_array_equal(before["w"], after["w"])


def two_array_clients():
    start = [
        {"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float32)},
        {"a": np.ones(2, np.float32), "b": np.ones(2, np.float32)},
    ]
    taus = [
        {"a": np.array([1.0, 0.0]), "b": np.array([0.0, 1.0])},
        {"a": np.array([2.0, 0.0]), "b": np.array([0.0, -1.0])},
    ]
    trained = [{k: start[i][k] + taus[i][k] for k in "ab"} for i in range(2)]
    return start, trained


def test_fedbip_flat_by_hand():
    start, trained = two_array_clients()
    # Flat τ1 = [1,0,0,1], τ2 = [2,0,0,-1]: cos = 1/√10.
    c = 1 / math.sqrt(10)
    out = fedbip_aggregate(start, trained)
    p = np.array([1, c]) / (1 + c)
    np.testing.assert_allclose(out[0]["a"], p[0] * np.array([1, 0]) + p[1] * np.array([2, 0]), rtol=1e-6)
    np.testing.assert_allclose(out[0]["b"], p[0] * np.array([0, 1]) + p[1] * np.array([0, -1]), rtol=1e-6)


def test_fedbip_layerwise_by_hand():
    start, trained = two_array_clients()
    result = fedbip_aggregate_detailed(start, trained, layerwise=True)
    # Array a: cos = 1 -> p = [1/2, 1/2]; array b: cos = -1 -> clipped -> own update.
    np.testing.assert_allclose(result.group_weights["a"], [[0.5, 0.5], [0.5, 0.5]])
    np.testing.assert_allclose(result.group_weights["b"], np.eye(2))
    np.testing.assert_allclose(result.adapters[0]["a"], [1.5, 0])
    np.testing.assert_allclose(result.adapters[1]["a"], [1 + 1.5, 1])
    np.testing.assert_allclose(result.adapters[0]["b"], [0, 1])
    np.testing.assert_allclose(result.adapters[1]["b"], [1, 0])
    # Reported matrices are the mean over layer groups.
    np.testing.assert_allclose(result.similarity, [[1, 0], [0, 1]])
    np.testing.assert_allclose(result.weights, [[0.75, 0.25], [0.25, 0.75]])


def test_layerwise_with_one_group_equals_flat():
    rng = np.random.default_rng(0)
    names = ["model.layers.0.q.lora_A", "model.layers.0.v.lora_B"]
    start = [{n: rng.normal(size=(3, 2)).astype(np.float32) for n in names} for _ in range(4)]
    trained = [{n: a + rng.normal(size=a.shape).astype(np.float32) for n, a in s.items()} for s in start]
    flat = fedbip_aggregate(start, trained)
    block = fedbip_aggregate(start, trained, layerwise=True, grouping="block")
    for f, b in zip(flat, block):
        for n in names:
            np.testing.assert_allclose(f[n], b[n], rtol=1e-5, atol=1e-6)


def test_block_grouping():
    names = [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight",
        "base_model.model.score.weight",
    ]
    groups = layer_groups(names, "block")
    assert groups == {
        "block.0": [names[0], names[2]],
        "block.1": [names[1]],
        names[3]: [names[3]],
    }
    assert layer_groups(names, "array") == {n: [n] for n in names}


def test_block_grouping_layerwise_by_hand():
    # Arrays of one block share weights: both arrays of block 0 use cos over their concatenation.
    names = ["m.layers.0.a", "m.layers.0.b"]
    start = [{n: np.zeros(1, np.float32) for n in names} for _ in range(2)]
    trained = [
        {names[0]: np.array([1.0], np.float32), names[1]: np.array([0.0], np.float32)},
        {names[0]: np.array([1.0], np.float32), names[1]: np.array([1.0], np.float32)},
    ]
    out = fedbip_aggregate(start, trained, layerwise=True, grouping="block")
    # cos = 1/√2 -> p1 = [2-√2, √2-1]: new1 = [1, √2-1].
    np.testing.assert_allclose([out[0][names[0]][0], out[0][names[1]][0]], [1, R2 - 1], rtol=1e-6)


def test_cumulative_task_vectors_by_hand():
    initial = {"w": np.zeros(2, np.float32)}
    start = adapters([5, 5], [-3, 7])  # ignored: τ is measured from the initial adapter
    trained = adapters([1, 0], [1, 1])
    out = fedbip_aggregate(start, trained, task_vector="cumulative", initial=initial)
    np.testing.assert_allclose(out[0]["w"], [1, R2 - 1], rtol=1e-6)
    np.testing.assert_allclose(out[1]["w"], [1, 2 - R2], rtol=1e-6)


def test_cumulative_requires_initial():
    start = adapters([0, 0])
    with pytest.raises(ValueError, match="initial"):
        fedbip_aggregate(start, start, task_vector="cumulative")


def test_single_client_gets_its_own_trained_adapter():
    start = adapters([1, 2])
    trained = adapters([3, -4])
    np.testing.assert_allclose(fedbip_aggregate(start, trained)[0]["w"], [3, -4])


def test_shapes_dtypes_order_and_inputs_preserved():
    rng = np.random.default_rng(1)
    start = [
        {"z": rng.normal(size=(2, 3)).astype(np.float32), "a": rng.normal(size=4).astype(np.float64)} for _ in range(3)
    ]
    trained = [{k: v + 1 for k, v in s.items()} for s in start]
    copies = [{k: v.copy() for k, v in s.items()} for s in start]
    out = fedbip_aggregate(start, trained, layerwise=True)
    for o in out:
        assert list(o) == ["z", "a"]
        assert o["z"].shape == (2, 3) and o["z"].dtype == np.float32
        assert o["a"].dtype == np.float64
    for s, c in zip(start, copies):
        for k in s:
            np.testing.assert_array_equal(s[k], c[k])
    # Everyone moved by the same update (all cosines 1): new = start + 1.
    np.testing.assert_allclose(out[2]["z"], start[2]["z"] + 1, rtol=1e-6)


@pytest.mark.parametrize("negative", ["clip", "keep"])
@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("task_vector", ["round", "cumulative"])
def test_every_variant_rows_sum_to_one_and_finite(negative, layerwise, task_vector):
    rng = np.random.default_rng(7)
    initial = {"x": rng.normal(size=5), "y": rng.normal(size=(2, 2))}
    start = [{k: v + rng.normal(size=v.shape) for k, v in initial.items()} for _ in range(5)]
    trained = [{k: v + rng.normal(size=v.shape) for k, v in s.items()} for s in start]
    trained[3] = {k: v.copy() for k, v in start[3].items()}  # one zero update
    result = fedbip_aggregate_detailed(
        start, trained, layerwise=layerwise, negative=negative, task_vector=task_vector, initial=initial
    )
    for w in [result.weights, *result.group_weights.values()]:
        np.testing.assert_allclose(w.sum(axis=1), np.ones(5), atol=1e-9)
        if negative == "clip":
            assert np.all(w >= 0)
    assert all(np.all(np.isfinite(a[k])) for a in result.adapters for k in a)


def test_weight_matrix_rejects_unknown_mode():
    with pytest.raises(ValueError, match=r"negative: 'abs' is not allowed; choose one of clip, keep"):
        weight_matrix(np.eye(2), negative="abs")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task_vector": "global"}, "task_vector: 'global' is not allowed"),
        ({"grouping": "head"}, "grouping: 'head' is not allowed"),
    ],
)
def test_unknown_options_fail_in_one_line(kwargs, message):
    start = adapters([0, 0])
    with pytest.raises(ValueError, match=message):
        fedbip_aggregate(start, start, **kwargs)


def test_bad_adapters_are_rejected_with_the_key_named():
    good = adapters([0, 0], [1, 1])
    with pytest.raises(ValueError, match=r"trained\[1\]\['w'\]: shape \(3,\) differs"):
        fedbip_aggregate(good, [good[0], {"w": np.zeros(3, np.float32)}])
    with pytest.raises(ValueError, match=r"trained\[0\]\['w'\]: contains NaN or Inf"):
        fedbip_aggregate(good, [{"w": np.array([np.nan, 0], np.float32)}, good[1]])
    with pytest.raises(ValueError, match=r"missing \['w'\], unexpected \['v'\]"):
        fedbip_aggregate(good, [good[0], {"v": np.zeros(2, np.float32)}])
    with pytest.raises(ValueError, match="dtype int64 is not allowed"):
        fedbip_aggregate(good, [good[0], {"w": np.zeros(2, np.int64)}])
    with pytest.raises(ValueError, match="pair up"):
        fedbip_aggregate(good, good[:1])


def reference_fedbip(start, trained, layerwise=False, negative="clip", grouping="array"):
    """FedBip straight from the definition: stacked float32 τ, one Gram and one product per group."""
    names = list(start[0])
    groups = layer_groups(names, grouping) if layerwise else {"all": names}
    out = [{} for _ in start]
    for members in groups.values():
        tau = np.stack(
            [
                np.concatenate([(t[k].astype(np.float32) - s[k].astype(np.float32)).ravel() for k in members])
                for s, t in zip(start, trained)
            ]
        )
        mixed = weight_matrix(cosine_similarity_matrix(tau), negative=negative).astype(np.float32) @ tau
        for i, s in enumerate(start):
            offset = 0
            for k in members:
                size = s[k].size
                out[i][k] = s[k].astype(np.float32) + mixed[i, offset : offset + size].reshape(s[k].shape)
                offset += size
    return out


@pytest.mark.parametrize(("layerwise", "grouping"), [(False, "array"), (True, "array"), (True, "block")])
def test_segmented_weighted_sums_match_the_definition(monkeypatch, layerwise, grouping):
    # A tiny segment budget splits every array into several BLAS products.
    monkeypatch.setattr("fedbilevel.aggregation._SEGMENT_BYTES", 4 * 6 * 7)
    rng = np.random.default_rng(11)
    shapes = {"m.layers.0.a": (5, 9), "m.layers.0.b": (13,), "m.layers.1.a": (3, 4), "head": (2, 2)}
    start = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(6)]
    trained = [{k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in s.items()} for s in start]
    out = fedbip_aggregate(start, trained, layerwise=layerwise, grouping=grouping)
    expected = reference_fedbip(start, trained, layerwise=layerwise, grouping=grouping)
    for o, e in zip(out, expected):
        assert list(o) == list(shapes)
        for k in shapes:
            np.testing.assert_allclose(o[k], e[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_nan_anywhere_in_large_arrays_is_named(layerwise, where):
    # NaN/Inf is detected through the Gram diagonal: check BLAS sees it wherever it is.
    rng = np.random.default_rng(12)
    start = [{"x": rng.normal(size=(64, 300)).astype(np.float32), "y": np.zeros(7, np.float32)} for _ in range(9)]
    trained = [{k: v + 1 for k, v in s.items()} for s in start]
    index = {"first": (0, 0), "middle": (31, 150), "last": (63, 299)}[where]
    trained[4]["x"][index] = np.inf if where == "middle" else np.nan
    with pytest.raises(ValueError, match=r"trained\[4\]\['x'\]: contains NaN or Inf"):
        fedbip_aggregate(start, trained, layerwise=layerwise)


def test_overflowing_task_vectors_are_rejected():
    # Finite inputs whose squared norm exceeds float32 cannot give a cosine.
    start = adapters([0, 0], [0, 0])
    trained = adapters([1e30, 0], [0, 1e30])
    with pytest.raises(ValueError, match="overflow float32"):
        fedbip_aggregate(start, trained)


def test_cumulative_still_checks_the_unused_personalized_adapters():
    initial = {"w": np.zeros(2, np.float32)}
    start = adapters([0, 0], [np.nan, 0])
    with pytest.raises(ValueError, match=r"personalized\[1\]\['w'\]: contains NaN or Inf"):
        fedbip_aggregate(start, adapters([1, 0], [0, 1]), task_vector="cumulative", initial=initial)


def test_returned_arrays_are_independent_and_memory_stays_near_two_stacked_arrays():
    import tracemalloc

    rng = np.random.default_rng(13)
    names = [f"m.layers.{layer}.{p}" for layer in range(4) for p in ("q", "v")]
    start = [{k: rng.normal(size=(64, 128)).astype(np.float32) for k in names} for _ in range(8)]
    trained = [{k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in s.items()} for s in start]
    stacked = 8 * len(names) * 64 * 128 * 4
    for layerwise in (False, True):
        tracemalloc.start()
        try:
            out = fedbip_aggregate(start, trained, layerwise=layerwise)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        # τ plus the returned adapters, and a bounded segment buffer.
        assert peak <= 2.5 * stacked
        assert not np.shares_memory(out[0][names[0]], out[0][names[1]])
        # No two clients share a buffer: an adapter kept for rounds pins no one else's memory.
        owners = [{id(a if a.base is None else a.base) for a in adapter.values()} for adapter in out]
        assert all(owners[i].isdisjoint(owners[j]) for i in range(8) for j in range(i))


def test_zero_size_arrays_pass_through():
    start = [{"empty": np.zeros((0, 3), np.float32), "w": np.array([0.0, 0.0], np.float32)} for _ in range(2)]
    trained = [{"empty": np.zeros((0, 3), np.float32), "w": np.array(w, np.float32)} for w in ([1, 0], [1, 1])]
    for layerwise in (False, True):
        out = fedbip_aggregate(start, trained, layerwise=layerwise)
        assert out[0]["empty"].shape == (0, 3)
        np.testing.assert_allclose(out[1]["w"], [1, 2 - R2], rtol=1e-6)


def test_fedexp_steps_by_hand():
    # Three orthonormal task vectors: the uniform mean has ‖·‖² 1/3 against a mean ‖τ‖² of 1 -> η = 1 / (2/3).
    steps = fedexp_steps(np.eye(3), np.array([[1 / 3] * 3, [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]))
    assert steps == pytest.approx([1.5, 1.0, 1.0])  # own vector alone: 1/2, kept at 1; two: 1 / (2 · 1/2) = 1
    # Aligned task vectors lose no length: no extrapolation.
    assert fedexp_steps(np.ones((3, 3)), np.full((1, 3), 1 / 3)) == pytest.approx([1.0])
    # Lengths 1 and 3, orthogonal, equal weights: mean ‖τ‖² 5, ‖mean‖² 2.5 -> η = 5 / 5 = 1; with 4 such: 2.
    assert fedexp_steps(np.diag([1.0, 9.0]), np.array([[0.5, 0.5]])) == pytest.approx([1.0])
    assert fedexp_steps(np.diag([1.0, 9.0, 1.0, 9.0]), np.full((1, 4), 0.25)) == pytest.approx([2.0])


def test_the_fedexp_server_step_scales_each_clients_weighted_sum():
    start = adapters([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    trained = adapters([2.0, 1.0, 1.0], [1.0, 2.0, 1.0], [1.0, 1.0, 2.0])  # τ: the unit vectors
    # A very hot softmax over equal cosines: uniform weights, so each mean is (1/3, 1/3, 1/3) and η = 1.5.
    uniform = Weighting(rule="softmax", temperature=1e9)
    result = fedbip_aggregate_detailed(start, trained, weighting=uniform, server_step="fedexp")
    assert result.server_steps == pytest.approx([1.5] * 3)
    assert result.weights == pytest.approx(np.full((3, 3), 1 / 3))  # reported as pᵢₖ
    for adapter in result.adapters:
        np.testing.assert_allclose(adapter["w"], [1.5, 1.5, 1.5], rtol=1e-6)  # 1 + 1.5 · 1/3
    # The step a client receives against its own update: ‖(e₁ + e₂ + e₃)/3‖ = √(1/3), times η.
    assert result.step_lengths == pytest.approx([1.5 / math.sqrt(3)] * 3)
    plain = fedbip_aggregate_detailed(start, trained, weighting=uniform)
    assert plain.server_steps is None and plain.step_lengths == pytest.approx([1 / math.sqrt(3)] * 3)
    # A client that did not move has no step ratio (and, similar to nothing, no weight: (e₁ + e₂)/2 for the others).
    still = fedbip_aggregate_detailed(start, [trained[0], trained[1], start[2]], weighting=uniform)
    assert math.isnan(still.step_lengths[2]) and still.step_lengths[0] == pytest.approx(1 / math.sqrt(2))
    np.testing.assert_allclose(plain.adapters[0]["w"], [4 / 3] * 3, rtol=1e-6)
    with pytest.raises(ConfigError, match=r"'server-step': value 'fedexp' is not allowed; .* similarity-space 'flat'"):
        FedBipSettings(server_step="fedexp", similarity_space="lora-product")
