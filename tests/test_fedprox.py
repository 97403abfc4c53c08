"""FedProx: the proximal term by hand, its effect in the shared training loop, and the message."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MessageType

from fedbilevel.client.train import TextCodec, proximal_term, train_adapter
from fedbilevel.data.synthetic import make_client_data
from fedbilevel.models.adapter import build_lora_model, get_adapter_arrays
from fedbilevel.models.settings import LoraSettings
from fedbilevel.models.zoo import TINY_MODEL, load_tokenizer
from fedbilevel.strategies.fedprox import FedProx
from fedbilevel.testing import INITIAL, FakeClient, FakeGrid, update_of


def test_proximal_term_value_and_gradient_by_hand():
    layer = torch.nn.Linear(2, 2, bias=False)
    term = proximal_term(layer, mu=0.5)
    assert term(layer).item() == 0.0
    with torch.no_grad():
        layer.weight += torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    value = term(layer)
    assert value.item() == pytest.approx(0.5 / 2 * (1 + 4 + 0 + 1))
    value.backward()
    np.testing.assert_allclose(layer.weight.grad.numpy(), 0.5 * np.array([[1.0, 2.0], [0.0, -1.0]]), rtol=1e-6)


def test_large_mu_keeps_the_adapter_near_the_received_one():
    tokenizer = load_tokenizer(TINY_MODEL)
    train, _ = make_client_data(0, 2, seed=0, num_train=8, num_test=1)
    moved = {}
    for mu in (0.0, 1e4):
        model = build_lora_model(TINY_MODEL, LoraSettings(), seed=0)
        start = get_adapter_arrays(model)
        train_adapter(
            model,
            TextCodec(tokenizer, 128),
            train,
            steps=5,
            batch_size=4,
            learning_rate=0.01,
            bf16_autocast=False,
            seed=0,
            extra_loss=proximal_term(model, mu) if mu else None,
        )
        end = get_adapter_arrays(model)
        moved[mu] = sum(float(np.sum((end[k] - start[k]) ** 2)) for k in start)
    assert moved[1e4] < 0.1 * moved[0.0]


@pytest.mark.usefixtures("server_identity")
def test_fedprox_declares_mu_in_train_messages_and_averages():
    clients = {p: FakeClient(p) for p in range(2)}
    strategy = FedProx(initial_adapter=INITIAL, min_nodes=2, proximal_mu=0.3)
    strategy.start(FakeGrid({1: clients[0], 2: clients[1]}), ArrayRecord(), num_rounds=1)
    kinds = [kind for kind, _, _ in clients[0].received]
    assert kinds == [MessageType.TRAIN, MessageType.EVALUATE]
    assert [config["proximal-mu"] for config in clients[0].configs] == [0.3, 0.3]  # declared in every message
    mean = {k: (update_of(0, 1)[k] + update_of(1, 1)[k]) / 2 for k in INITIAL}
    np.testing.assert_allclose(strategy.adapter_for(1)["b"], INITIAL["b"] + mean["b"], rtol=1e-6)
    with pytest.raises(ValueError, match="proximal_mu: -1 is not allowed"):
        FedProx(initial_adapter=INITIAL, proximal_mu=-1)
