"""Pure NumPy mixing for the baselines: FedAMP's attention and cloud models, by hand."""

import math
import subprocess
import sys

import numpy as np
import pytest

from fedbilevel.mixing import (
    fedamp_attention,
    fedamp_cloud_models,
    flatten,
    group_weights,
    mix_adapters,
)


def test_fedamp_attention_by_hand():
    cosine = np.array([[1.0, 0.5, 0.0], [0.5, 1.0, -1.0], [0.0, -1.0, 1.0]])
    xi = fedamp_attention(cosine, sigma=2.0, self_weight=0.4)
    # Row 0: others 1, 2 with logits 2·0.5 = 1 and 0 -> e/(e+1), 1/(e+1) of the remaining 0.6.
    e = math.e
    np.testing.assert_allclose(xi[0], [0.4, 0.6 * e / (e + 1), 0.6 / (e + 1)])
    # Row 1: logits 1 (client 0) and -2 (client 2).
    np.testing.assert_allclose(xi[1], [0.6 * e / (e + e**-2), 0.4, 0.6 * e**-2 / (e + e**-2)])
    # Row 2: logits 0 and -2.
    np.testing.assert_allclose(xi[2], [0.6 / (1 + e**-2), 0.6 * e**-2 / (1 + e**-2), 0.4])
    np.testing.assert_allclose(xi.sum(axis=1), 1.0)


def test_fedamp_attention_edge_cases():
    cosine = np.array([[1.0, 0.9, 0.1], [0.9, 1.0, 0.2], [0.1, 0.2, 1.0]])
    uniform = fedamp_attention(cosine, sigma=0.0, self_weight=0.5)
    np.testing.assert_allclose(uniform, [[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]])
    huge = fedamp_attention(cosine, sigma=1e6, self_weight=0.0)  # no overflow: all weight on the most similar
    np.testing.assert_allclose(huge, [[0, 1, 0], [1, 0, 0], [0, 1, 0]], atol=1e-12)
    np.testing.assert_allclose(fedamp_attention(np.ones((1, 1)), sigma=5, self_weight=0.2), [[1.0]])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sigma": -1.0, "self_weight": 0.5}, r"sigma: value -1.0 is not allowed; expected a finite number ≥ 0"),
        ({"sigma": 1.0, "self_weight": 1.5}, r"self_weight: value 1.5 is not allowed; expected a number in \[0, 1\]"),
    ],
)
def test_fedamp_attention_rejects_bad_hyper_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fedamp_attention(np.eye(2), **kwargs)


def test_mix_adapters_by_hand_keeps_shapes_and_dtypes():
    adapters = [
        {"a": np.array([[1.0, 2.0]], np.float32), "b": np.array([1.0], np.float16)},
        {"a": np.array([[3.0, 0.0]], np.float32), "b": np.array([3.0], np.float16)},
    ]
    mixed = mix_adapters(adapters, np.array([[0.25, 0.75], [1.0, 0.0], [0.5, 0.5]]))
    np.testing.assert_allclose(mixed[0]["a"], [[2.5, 0.5]])
    np.testing.assert_allclose(mixed[0]["b"], [2.5])
    np.testing.assert_allclose(mixed[1]["a"], [[1.0, 2.0]])
    np.testing.assert_allclose(mixed[2]["a"], [[2.0, 1.0]])
    assert mixed[2]["a"].dtype == np.float32 and mixed[2]["b"].dtype == np.float16 and mixed[2]["a"].shape == (1, 2)
    with pytest.raises(ValueError, match=r"weights: shape \(1, 3\) is not allowed; expected M×2"):
        mix_adapters(adapters, np.ones((1, 3)))
    with pytest.raises(ValueError, match=r"adapters\[1\]: names or shapes differ"):
        mix_adapters([adapters[0], {"a": np.zeros((2, 1), np.float32), "b": adapters[1]["b"]}], np.ones((1, 2)))


def test_fedamp_cloud_models_by_hand():
    # Two clients pointing one way, one the other way: cos(w0, w1) = 1, cos(w0, w2) = 0.
    models = [
        {"w": np.array([1.0, 0.0], np.float32)},
        {"w": np.array([2.0, 0.0], np.float32)},
        {"w": np.array([0.0, 4.0], np.float32)},
    ]
    clouds, cosine, xi = fedamp_cloud_models(models, sigma=math.log(3), self_weight=0.5)
    np.testing.assert_allclose(cosine, [[1, 1, 0], [1, 1, 0], [0, 0, 1]], atol=1e-7)
    # Row 0: exp(σ·1) = 3 vs exp(0) = 1 -> others get 0.5·3/4 and 0.5·1/4.
    np.testing.assert_allclose(xi[0], [0.5, 0.375, 0.125])
    np.testing.assert_allclose(clouds[0]["w"], [0.5 * 1 + 0.375 * 2, 0.125 * 4])
    # Row 2: both others have cosine 0 -> 0.25 each.
    np.testing.assert_allclose(clouds[2]["w"], [0.25 * 1 + 0.25 * 2, 0.5 * 4])
    np.testing.assert_array_equal(flatten(models), [[1, 0], [2, 0], [0, 4]])


def test_mixing_imports_neither_torch_nor_flower():
    code = "import sys, fedbilevel.mixing; print('torch' in sys.modules, 'flwr' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() == [
        "False",
        "False",
    ]


def test_group_weights_by_hand():
    np.testing.assert_allclose(
        group_weights(["a", "b", "a", "a"]),
        [[1 / 3, 0, 1 / 3, 1 / 3], [0, 1, 0, 0], [1 / 3, 0, 1 / 3, 1 / 3], [1 / 3, 0, 1 / 3, 1 / 3]],
    )
