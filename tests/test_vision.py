"""The image path (issue 8): the digits domain federation, the digits ViT with its head in the
adapter, the classifier eval loop, and a federated run end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
from in_process import client_context

from fedbilevel.client.app import ClientSession
from fedbilevel.client.metrics import macro_f1
from fedbilevel.client.train import train_adapter
from fedbilevel.client.vision import ImageCodec, evaluate_classifier
from fedbilevel.config import load_app_config
from fedbilevel.data.digits import (
    DIGIT_DOMAINS,
    ImageExample,
    _digits,
    _split,
    make_digits_client_data,
    pretraining_set,
    transform,
)
from fedbilevel.models.adapter import adapter_parameters, build_lora_model, get_adapter_arrays, initial_adapter_arrays
from fedbilevel.models.base import load_base_model
from fedbilevel.models.settings import LoraSettings
from fedbilevel.models.zoo import DIGITS_VIT, TINY_MODEL, classifier_head, is_image_classifier
from fedbilevel.simulation import simulate

ROOT = Path(__file__).resolve().parents[1]


def test_domain_transforms_by_hand():
    image = np.array([[[0.0, 0.5], [1.0, 0.25]]], dtype=np.float32)
    np.testing.assert_allclose(transform(image, "inverted"), [[[1.0, 0.5], [0.0, 0.75]]])
    np.testing.assert_allclose(transform(image, "rotated"), [[[0.5, 0.25], [0.0, 1.0]]])  # 90° anticlockwise
    # 3×3 box with edge padding: the top-left pixel averages 0,0,0.5 / 0,0,0.5 / 1,1,0.25.
    assert transform(image, "blurred")[0, 0, 0] == pytest.approx((0 + 0 + 0.5 + 0 + 0 + 0.5 + 1 + 1 + 0.25) / 9)
    noisy = transform(np.full((3, 8, 8), 0.5, np.float32), "noisy")
    assert (
        noisy.dtype == np.float32
        and noisy.min() >= 0
        and noisy.max() <= 1
        and np.array_equal(noisy, transform(np.full((3, 8, 8), 0.5, np.float32), "noisy"))
    )
    with pytest.raises(
        ValueError, match="domain: 'sepia' is not allowed; choose one of inverted, rotated, noisy, blurred"
    ):
        transform(image, "sepia")


def test_clients_of_a_domain_split_its_images_and_never_see_pretraining_images():
    images, _ = _digits()
    pretrain, pool = _split()
    assert len(pretrain) + len(pool) == len(images) == 1797 and not set(pretrain) & set(pool)
    assert pretraining_set()[0].shape == (len(pretrain), 1, 8, 8)
    first, second = (make_digits_client_data(p, 8, seed=0, test_fraction=0.2) for p in (2, 3))
    assert first.task == second.task == "rotated" and make_digits_client_data(7, 8, seed=0).task == "blurred"
    assert len(first.train) + len(first.test) + len(second.train) + len(second.test) == len(pool)
    assert len(first.test) == round(0.2 * (len(first.train) + len(first.test)))
    pixels = {example.pixels.tobytes() for example in first.train + first.test}
    assert not pixels & {example.pixels.tobytes() for example in second.train + second.test}
    assert first.train[0].pixels.shape == (1, 8, 8) and first.train[0].pixels.dtype == np.float32
    again = make_digits_client_data(2, 8, seed=0, test_fraction=0.2)
    assert [e.label for e in again.test] == [e.label for e in first.test]
    assert [e.label for e in make_digits_client_data(2, 8, seed=1, test_fraction=0.2).test] != [
        e.label for e in first.test
    ]
    with pytest.raises(ValueError, match="num-partitions: value 3 is not allowed with 4 domains"):
        make_digits_client_data(0, 3, seed=0)


def test_macro_f1_by_hand():
    # Class 0: TP 1, FP 1, FN 1 -> 0.5; class 1: TP 1, FP 0, FN 1 -> 2/3; class 2: TP 0, FP 1, FN 0 -> 0.
    assert macro_f1([0, 0, 1, 1], [0, 2, 1, 0]) == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)
    assert macro_f1([3, 3], [3, 3]) == 1.0
    with pytest.raises(ValueError, match="2 labels and 1 predictions"):
        macro_f1([0, 1], [0])


def test_digits_vit_is_pretrained_and_its_head_is_part_of_the_adapter():
    assert is_image_classifier(DIGITS_VIT) and not is_image_classifier(TINY_MODEL)
    assert classifier_head(DIGITS_VIT) == "classifier"
    model = build_lora_model(DIGITS_VIT, LoraSettings(), seed=4)
    arrays = get_adapter_arrays(model)
    head = {k: v for k, v in arrays.items() if ".classifier." in k}
    assert set(head) == {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    np.testing.assert_array_equal(
        head["base_model.model.classifier.weight"], load_base_model(DIGITS_VIT).classifier.weight.detach().numpy()
    )
    initial = initial_adapter_arrays(DIGITS_VIT, LoraSettings(), seed=4)  # what the server starts every client from
    assert list(initial) == list(arrays) and all(np.array_equal(initial[k], arrays[k]) for k in arrays)
    assert list(adapter_parameters(model)) == list(arrays)  # FedALA's view of the trainable arrays
    # Pretrained: the clean digits it learned from are mostly right, and the domains really shift it.
    clean = [ImageExample(pixels, int(label), "clean") for pixels, label in zip(*pretraining_set())]
    assert evaluate_classifier(model, clean, batch_size=256, bf16_autocast=False)["accuracy"] > 0.8
    inverted = make_digits_client_data(0, 8, seed=0).test
    assert evaluate_classifier(model, inverted, batch_size=64, bf16_autocast=False)["accuracy"] < 0.3


def test_training_moves_lora_and_head_and_raises_accuracy():
    data = make_digits_client_data(2, 8, seed=0, test_fraction=0.2)  # rotated
    model = build_lora_model(DIGITS_VIT, LoraSettings(), seed=0)
    before, score = get_adapter_arrays(model), evaluate_classifier(model, data.test, batch_size=64, bf16_autocast=False)
    train_adapter(
        model, ImageCodec(), data.train, steps=30, batch_size=32, learning_rate=0.01, bf16_autocast=False, seed=0
    )
    after = get_adapter_arrays(model)
    assert not np.array_equal(after["base_model.model.classifier.weight"], before["base_model.model.classifier.weight"])
    assert (
        evaluate_classifier(model, data.test, batch_size=64, bf16_autocast=False)["accuracy"] > score["accuracy"] + 0.2
    )
    assert len(score["items-accuracy"]) == len(data.test) and np.mean(score["items-accuracy"]) == pytest.approx(
        score["accuracy"]
    )


def test_a_text_model_on_image_data_is_refused_with_the_key():
    config = {**load_app_config(), "data": "digits", "model-name": TINY_MODEL}
    context = client_context(config, num_partitions=8, node_id=7)
    with pytest.raises(
        ValueError,
        match="run-config key 'model-name': value 'tiny-random-llama' is a causal language model, "
        "but data='digits' holds images",
    ):
        ClientSession(context, overrides=None)


def test_image_federation_end_to_end(tmp_path):
    config = {
        **load_app_config(ROOT / "pyproject.toml"),
        "model-name": DIGITS_VIT,
        "data": "digits",
        "strategy": "fedbip",
        "num-server-rounds": 2,
        "local-steps": 5,
        "batch-size": 32,
        "learning-rate": 0.01,
        "output-dir": str(tmp_path),
        "run-name": "digits",
    }
    simulate(config, num_supernodes=8)
    results = json.loads((tmp_path / "digits" / "results.json").read_text())
    assert results["summary"]["primary_metric"] == "accuracy" and results["summary"]["metrics"] == [
        "accuracy",
        "macro_f1",
    ]
    assert [results["clients"][str(p)]["task"] for p in range(8)] == [d for d in DIGIT_DOMAINS for _ in range(2)]
    last = results["rounds"][-1]
    assert last["failures"] == [] and set(last["eval"]) == {str(p) for p in range(8)}
    assert 0 <= last["personalized_mean"]["accuracy"] <= 1 and 0 <= last["personalized_mean"]["macro_f1"] <= 1
    assert len(last["eval_items"]["0"]["accuracy"]) == results["clients"]["0"]["num_test"]
    # Round 1: clients of a domain find each other.
    similarity = np.array(results["rounds"][0]["similarity"])
    same = np.equal.outer(np.arange(8) // 2, np.arange(8) // 2) & ~np.eye(8, dtype=bool)
    assert similarity[same].mean() > similarity[~same & ~np.eye(8, dtype=bool)].mean() + 0.1
    np.fill_diagonal(similarity, -np.inf)  # the strongest shifts: the partner is the nearest
    assert [int(np.argmax(row)) for row in similarity[:4]] == [1, 0, 3, 2]
    assert (tmp_path / "digits" / "clients" / "0" / "adapter_model.safetensors").is_file()


def test_num_labels_gives_a_new_head_that_server_and_clients_agree_on():
    settings = LoraSettings(num_labels=3)
    initial = initial_adapter_arrays(DIGITS_VIT, settings, seed=0)
    assert initial["base_model.model.classifier.weight"].shape == (3, 64) and initial[
        "base_model.model.classifier.bias"
    ].shape == (3,)
    built = get_adapter_arrays(build_lora_model(DIGITS_VIT, settings, seed=0))
    np.testing.assert_array_equal(
        built["base_model.model.classifier.weight"], initial["base_model.model.classifier.weight"]
    )
    own = initial_adapter_arrays(
        DIGITS_VIT, LoraSettings(num_labels=10), seed=0
    )  # the model's own size: its trained head
    np.testing.assert_array_equal(
        own["base_model.model.classifier.weight"], load_base_model(DIGITS_VIT).classifier.weight.detach().numpy()
    )
