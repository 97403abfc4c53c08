"""FedDPA: the global adapter averaged, each client's local adapter kept, the two mixed per input; by hand."""

import json
import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from in_process import client_context, started_client
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from fedbilevel import protocol
from fedbilevel.checkpoint import load_checkpoint
from fedbilevel.client.app import make_client_app
from fedbilevel.client.evaluate import evaluate_adapter
from fedbilevel.client.feddpa import (
    instance_weights,
    local_adapter,
    score_dual,
    text_representations,
    train_local_adapter,
)
from fedbilevel.client.train import TextCodec, train_adapter
from fedbilevel.config import ConfigError, RunConfig, load_app_config
from fedbilevel.data.types import Example
from fedbilevel.models.adapter import build_lora_model, get_adapter_arrays, initial_adapter_arrays, set_adapter_arrays
from fedbilevel.models.base import load_base_model
from fedbilevel.models.settings import LoraSettings
from fedbilevel.models.zoo import DIGITS_VIT, TINY_MODEL, load_tokenizer
from fedbilevel.simulation import simulate
from fedbilevel.strategies import build_strategy
from fedbilevel.strategies.feddpa import DpaSettings, FedDpa, dual_adapter, split_adapter
from fedbilevel.strategies.sampling import SamplingSettings
from fedbilevel.testing import (
    LORA_A,
    LORA_B,
    LORA_HEAD,
    LORA_THETA0,
    FakeGrid,
    assert_adapters_equal,
    fake_federation,
    resumed_and_unbroken,
)

A, B, HEAD, THETA0 = LORA_A, LORA_B, LORA_HEAD, LORA_THETA0  # short names for the hand-computed cases

ROOT = Path(__file__).resolve().parents[1]


def adapter(global_shift: float, local_shift: float) -> dict[str, np.ndarray]:
    """A FedDPA adapter: θ⁰ plus ``global_shift`` on every global array, θ⁰ plus ``local_shift`` on every local one."""
    return dual_adapter(
        {name: array + global_shift for name, array in THETA0.items()},
        {name: array + local_shift for name, array in THETA0.items()},
    )


def step(partition_id: int, server_round: int) -> dict[str, np.ndarray]:
    """What client p's training adds in round t: (p + 1)·t to its global adapter, 10 times that to its local one."""
    scale = np.float32((partition_id + 1) * server_round)
    return dual_adapter(
        {name: np.full(array.shape, scale) for name, array in THETA0.items()},
        {name: np.full(array.shape, 10 * scale) for name, array in THETA0.items()},
    )


# federation(size): node id -> fake client, partitions 0..size-1 on nodes 10, 11, ...; each derives θ⁰ (one
# adapter) at start and trains by `step`.
federation = partial(fake_federation, initial=THETA0, update=step)


def tiny_client(**overrides) -> tuple:
    """A started tiny-model ClientApp (8 training and 4 test examples), its context, and the θ⁰ it derives."""
    config = {**load_app_config(), "model-name": TINY_MODEL, "precision": "fp32", **overrides}
    app, context = started_client({**config, "synthetic-train-examples": 8, "synthetic-test-examples": 4})
    run_config = RunConfig.from_run_config(config)
    return app, context, initial_adapter_arrays(run_config.model.name, run_config.lora, seed=run_config.seed)


def send(app, context, kind: str, adapter: dict, server_round: int = 1, **values) -> Message:
    """The client's reply to a ``kind`` message for partition 0 that carries ``adapter`` in full."""
    config = {
        protocol.SERVER_ROUND: server_round,
        protocol.PARTITION_ID: 0,
        protocol.ADAPTER_DIGEST: protocol.adapter_digest(adapter),
        **values,
    }
    content = RecordDict({protocol.CONFIG: ConfigRecord(config), protocol.ARRAYS: protocol.adapter_to_record(adapter)})
    return app(Message(content, 5, kind), context)


def test_a_dual_adapter_splits_back_into_its_two_and_anything_else_is_refused():
    local = {name: array + 1 for name, array in THETA0.items()}
    dual = dual_adapter(THETA0, local)
    assert list(dual) == [A, B, HEAD, f"local/{A}", f"local/{B}", f"local/{HEAD}"]
    got_global, got_local = split_adapter(dual)
    assert_adapters_equal(got_global, THETA0)
    assert_adapters_equal(got_local, local)
    with pytest.raises(ValueError, match=r"adapter: 3 global and 0 local arrays; expected a FedDPA adapter"):
        split_adapter(THETA0)
    with pytest.raises(ValueError, match=r"local adapter: its 2 arrays are not named as the global adapter's 3"):
        dual_adapter(THETA0, {A: THETA0[A], B: THETA0[B]})


@pytest.mark.usefixtures("server_identity")
def test_two_rounds_average_the_global_adapter_and_keep_each_clients_local_one():
    clients = federation(3)
    strategy = FedDpa(settings=DpaSettings(), initial_adapter=THETA0, min_nodes=3)
    strategy.start(FakeGrid(clients), ArrayRecord(), num_rounds=2)
    # Round 1 from θ⁰: global ← θ⁰ + mean(1, 2, 3) = θ⁰ + 2; client p's local adapter θ⁰ + 10(p + 1).
    # Round 2 from those: global ← θ⁰ + 2 + mean(2, 4, 6) = θ⁰ + 6; local θ⁰ + 10(p + 1) + 20(p + 1).
    for node, client in clients.items():
        p = node - 10
        kinds = [(kind, server_round) for kind, server_round, _ in client.received]
        assert kinds == [
            (MessageType.TRAIN, 1),
            (MessageType.EVALUATE, 1),
            (MessageType.TRAIN, 2),
            (MessageType.EVALUATE, 2),
        ]
        assert_adapters_equal(client.received[0][2], adapter(0, 0))
        assert client.full[0] and not client.full[2]  # θ⁰ doubled is sent once; the next train names what it holds
        assert_adapters_equal(client.received[1][2], adapter(2, 10 * (p + 1)))
        assert_adapters_equal(client.received[2][2], adapter(2, 10 * (p + 1)))
        assert_adapters_equal(client.received[3][2], adapter(6, 30 * (p + 1)))
        assert_adapters_equal(strategy.personalized_adapter(p), adapter(6, 30 * (p + 1)))
        assert all(config.items() >= DpaSettings().to_config().items() for config in client.configs)
    assert strategy.history[-1]["participants"] == [0, 1, 2]


def test_the_global_adapter_is_the_example_weighted_mean_and_a_client_that_never_trained_has_theta0s_local_one():
    strategy = FedDpa(settings=DpaSettings(), initial_adapter=THETA0)
    trained = {0: adapter(1, 10), 1: adapter(5, 20)}
    assert strategy.personalize(1, trained, {0: 1, 1: 3}) == {"participants": [0, 1]}
    # (1·1 + 3·5) / 4 = 4
    assert_adapters_equal(strategy.adapter_for(0), adapter(4, 10))
    assert_adapters_equal(strategy.adapter_for(1), adapter(4, 20))
    assert_adapters_equal(strategy.adapter_for(2), adapter(4, 0))
    # eval-global scores the global adapter alone; a run saves each client's two adapters apart.
    assert_adapters_equal(strategy.global_adapter(), {name: array + 4 for name, array in THETA0.items()})
    saved = strategy.saved_adapters(1)
    assert list(saved) == ["global", "local"]
    assert_adapters_equal(saved["global"], {name: array + 4 for name, array in THETA0.items()})
    assert_adapters_equal(saved["local"], {name: array + 20 for name, array in THETA0.items()})


def test_evaluate_messages_say_whether_a_clients_local_adapter_has_trained():
    strategy = FedDpa(settings=DpaSettings(), initial_adapter=THETA0)
    strategy.personalize(1, {0: adapter(1, 10), 1: adapter(1, 0)}, {0: 1, 1: 1})  # round 1: client 1's local untouched
    assert [strategy.partition_config("evaluate", p)[protocol.DPA_LOCAL_TRAINED] for p in range(3)] == [
        True,
        False,
        False,  # never trained
    ]
    assert protocol.DPA_LOCAL_TRAINED not in strategy.partition_config("train", 0)


@pytest.mark.usefixtures("server_identity")
def test_absent_clients_keep_their_local_adapter_and_receive_the_current_global_one():
    records = []
    sampling = SamplingSettings(fraction_train=0.5, min_train_nodes=2)
    strategy = FedDpa(
        settings=DpaSettings(),
        initial_adapter=THETA0,
        min_nodes=4,
        sampling=sampling,
        seed=1,
        on_round_end=records.append,
    )
    clients = federation(4)
    strategy.start(FakeGrid(clients), ArrayRecord(), num_rounds=3)
    sampled = [record["sampled"]["train"] for record in records]
    assert all(len(chosen) == 2 for chosen in sampled) and len(set(map(tuple, sampled))) > 1
    # Replayed by hand: the global shift is the mean over the round's clients (equal example counts).
    shift, own = 0.0, dict.fromkeys(range(4), 0.0)
    states = {0: {p: adapter(0, 0) for p in range(4)}}
    for server_round, chosen in enumerate(sampled, start=1):
        shift += np.mean([(p + 1) * server_round for p in chosen])
        for p in chosen:
            own[p] += 10 * (p + 1) * server_round
        states[server_round] = {p: adapter(shift, own[p]) for p in range(4)}
    for node, client in clients.items():
        p = node - 10
        for kind, server_round, got in client.received:
            # A client trains from the state after the previous round and evaluates the state after this one.
            assert_adapters_equal(got, states[server_round - 1 if kind == MessageType.TRAIN else server_round][p])
        trained_in = {server_round for kind, server_round, _ in client.received if kind == MessageType.TRAIN}
        assert trained_in == {r for r, chosen in enumerate(sampled, start=1) if p in chosen}
        assert_adapters_equal(strategy.adapter_for(p), states[3][p])


@pytest.mark.usefixtures("server_identity")
def test_resume_from_a_checkpoint_matches_an_unbroken_run(tmp_path):
    def make():
        sampling = SamplingSettings(fraction_train=0.5, min_train_nodes=2)
        return FedDpa(settings=DpaSettings(), initial_adapter=THETA0, min_nodes=4, sampling=sampling, seed=1)

    resumed, unbroken, clients = resumed_and_unbroken(make, lambda: federation(4), tmp_path, num_rounds=3)
    assert set(load_checkpoint(tmp_path)["store"]) == {"global", "local"}
    assert {server_round for client in clients.values() for _, server_round, _ in client.received} == {3}
    for p in range(4):
        assert_adapters_equal(resumed.adapter_for(p), unbroken.adapter_for(p))


def test_the_registry_builds_it_with_its_keys_and_bad_values_are_refused_in_one_line():
    config = RunConfig.from_run_config(
        {**load_app_config(), "strategy": "feddpa", "feddpa-local-weight": 0.3, "feddpa-instances": 7}
    )
    strategy = build_strategy(config, initial_adapter=THETA0)
    assert isinstance(strategy, FedDpa)
    assert strategy.client_config() == {
        "feddpa-local-weight": 0.3,
        "feddpa-instances": 7,
        "feddpa-max-weight": 0.5,
    }
    assert DpaSettings.from_config(strategy.client_config()) == config.feddpa
    assert DpaSettings.from_config({protocol.PROXIMAL_MU: 0.1}) is None  # another strategy's message
    for key, value, allowed in (
        ("feddpa-local-weight", 0.0, r"expected a number in \(0\.0, 1\.0\]"),
        ("feddpa-instances", 0, "expected an integer ≥ 1"),
        ("feddpa-max-weight", 1.5, r"expected a number in \[0\.0, 1\.0\]"),
    ):
        with pytest.raises(ConfigError, match=rf"run-config key '{key}': value {value} is not allowed; {allowed}"):
            RunConfig.from_run_config({**load_app_config(), "strategy": "feddpa", key: value})
    with pytest.raises(ConfigError, match="run-config key 'strategy': value 'feddpa' is not allowed; dp='dp-sgd'"):
        RunConfig.from_run_config({**load_app_config(), "strategy": "feddpa", "dp": "dp-sgd"})


def test_the_weight_of_an_input_is_beta_times_its_mean_cosine_to_the_drawn_training_inputs():
    references = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    inputs = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    # cos with the two references: (1, 0), (0, 1), (1/√2, 1/√2), (−1, 0); α = 0.5 × their mean.
    expected = [0.25, 0.25, 0.5 / math.sqrt(2), -0.25]
    np.testing.assert_allclose(instance_weights(inputs, references, max_weight=0.5), expected, rtol=1e-6)
    # An input that is a training input, the only one drawn: α = β, the global adapter's largest weight.
    assert instance_weights(references[:1], references[:1], max_weight=0.5).tolist() == [0.5]


def random_adapter(model, seed: int) -> dict[str, np.ndarray]:
    """The model's adapter with every array drawn at random (B non-zero: the adapter changes the model)."""
    rng = np.random.default_rng(seed)
    return {
        name: (0.1 * rng.standard_normal(array.shape)).astype(np.float32)
        for name, array in get_adapter_arrays(model).items()
    }


def test_a_lora_layer_adds_each_adapters_update_times_its_weight_per_item():
    model = build_lora_model(TINY_MODEL, LoraSettings())
    global_arrays, local_arrays = random_adapter(model, 1), random_adapter(model, 2)
    set_adapter_arrays(model, global_arrays)
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    x = torch.randn(2, 3, layer.in_features, generator=torch.Generator().manual_seed(0))
    alone = layer(x)
    with local_adapter(model, local_arrays) as mixer:
        factors = {name: (layer.lora_A[name].weight, layer.lora_B[name].weight) for name in ("default", "local")}
        scaling = layer.scaling["default"]  # lora_alpha / r = 2
        assert scaling == 2.0 and layer.scaling["local"] == 2.0
        updates = {name: x @ a.T @ b.T * scaling for name, (a, b) in factors.items()}
        torch.testing.assert_close(layer(x), alone)  # weights (1, 0) until set: the global adapter alone
        w = torch.tensor([0.2, 0.7])
        with mixer.weighted(w, 1 - w), torch.no_grad():
            got = layer(x)
        expected = layer.base_layer(x) + w.view(2, 1, 1) * updates["default"] + (1 - w).view(2, 1, 1) * updates["local"]
        torch.testing.assert_close(got, expected)
    assert layer.scaling == {"default": 2.0}


def test_local_training_moves_the_local_adapter_only_and_leaves_the_model_as_it_was():
    model = build_lora_model(TINY_MODEL, LoraSettings())
    global_arrays, local_arrays = random_adapter(model, 1), random_adapter(model, 2)
    set_adapter_arrays(model, global_arrays)
    before = {name: (p.requires_grad, p.detach().clone()) for name, p in model.named_parameters()}
    tokenizer = load_tokenizer(TINY_MODEL)
    examples = [Example(f"Reverse: ab{i}", f"{i}ba", "reverse") for i in range(4)]

    def train():
        assert all(".local." in name for name, p in model.named_parameters() if p.requires_grad)
        return train_adapter(
            model,
            TextCodec(tokenizer, 64),
            examples,
            steps=2,
            batch_size=2,
            learning_rate=0.05,
            bf16_autocast=False,
            seed=0,
        )

    trained, result = train_local_adapter(model, local_arrays, train, local_weight=0.5)
    assert np.isfinite(result.loss) and list(trained) == list(local_arrays)
    assert all(not np.array_equal(trained[name], local_arrays[name]) for name in trained)
    assert_adapters_equal(get_adapter_arrays(model), global_arrays)  # the global adapter is frozen
    after = dict(model.named_parameters())
    assert list(after) == list(before) and list(model.peft_config) == ["default"]
    for name, (requires_grad, value) in before.items():
        assert after[name].requires_grad == requires_grad and torch.equal(after[name].detach(), value), name


def test_an_image_head_is_mixed_as_the_lora_updates_are():
    model = build_lora_model(DIGITS_VIT, LoraSettings(), seed=0)
    global_arrays = get_adapter_arrays(model)  # B zero: both adapters leave the features as the base model's
    rng = np.random.default_rng(0)
    local_arrays = {
        name: array + rng.standard_normal(array.shape).astype(np.float32) if ".classifier." in name else array
        for name, array in global_arrays.items()
    }
    pixels = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        global_logits = model(pixel_values=pixels).logits
        set_adapter_arrays(model, local_arrays)
        local_logits = model(pixel_values=pixels).logits
        set_adapter_arrays(model, global_arrays)
        alpha = torch.tensor([0.0, 0.3, 1.0])
        with local_adapter(model, local_arrays) as mixer, mixer.weighted(alpha, 1 - alpha):
            mixed = model(pixel_values=pixels).logits
    expected = alpha[:, None] * global_logits + (1 - alpha[:, None]) * local_logits
    torch.testing.assert_close(mixed, expected)


def test_identical_adapters_mixed_per_item_score_as_the_global_adapter_alone():
    model = build_lora_model(TINY_MODEL, LoraSettings())
    arrays = random_adapter(model, 3)
    set_adapter_arrays(model, arrays)
    tokenizer = load_tokenizer(TINY_MODEL)
    training = [Example(f"Reverse: xy{i}", f"{i}yx", "reverse") for i in range(6)]
    scored = [
        Example("Reverse: abc", "cba", "reverse"),
        Example("Is it so?\nOPTIONS:\n- yes\n- no", "yes", "nli"),  # scored by its options too, one item at a time
        Example("Reverse: de", "ed", "reverse"),
    ]
    settings = {"batch_size": 2, "max_new_tokens": 4, "bf16_autocast": False}
    alone = evaluate_adapter(model, tokenizer, scored, **settings)
    mixed = score_dual(
        model,
        arrays,
        DpaSettings(instances=4),
        training=training,
        scored=scored,
        represent=lambda items: text_representations(
            model, tokenizer, [item.instruction for item in items], batch_size=2, bf16_autocast=False, device="cpu"
        ),
        score=lambda rows: evaluate_adapter(model, tokenizer, scored, rows=rows, **settings),
        seed=0,
    )
    # α·Δ + (1 − α)·Δ = Δ whatever each item's α: the same answers and option choices.
    assert {k: v for k, v in mixed.items() if k not in (protocol.EVAL_SECONDS, protocol.DPA_MEAN_WEIGHT)} == {
        k: v for k, v in alone.items() if k != protocol.EVAL_SECONDS
    }
    assert "option_accuracy" in mixed and -0.5 <= mixed[protocol.DPA_MEAN_WEIGHT] <= 0.5
    assert_adapters_equal(get_adapter_arrays(model), arrays) and list(model.peft_config) == ["default"]


def test_the_client_app_trains_the_global_adapter_as_fedit_does_and_the_local_one_from_round_2(server_identity):
    app, context, theta0 = tiny_client(**{"local-steps": 2, "learning-rate": 0.01})

    def train(sent: dict, server_round: int, feddpa: bool) -> tuple[dict, dict]:
        settings = DpaSettings().to_config() if feddpa else {}
        reply = send(app, context, MessageType.TRAIN, sent, server_round, **settings)
        return protocol.record_to_adapter(reply.content.array_records[protocol.ARRAYS]), dict(
            reply.content.metric_records[protocol.METRICS]
        )

    plain_before, _ = train(theta0, 1, feddpa=False)
    first, metrics = train(dual_adapter(theta0, theta0), 1, feddpa=True)
    first_global, first_local = split_adapter(first)
    assert_adapters_equal(first_global, plain_before)  # round 1: FedIT's step, the local adapter untouched
    assert_adapters_equal(first_local, theta0) and protocol.DPA_LOCAL_LOSS not in metrics
    second, metrics = train(first, 2, feddpa=True)
    second_global, second_local = split_adapter(second)
    assert_adapters_equal(second_global, train(first_global, 2, feddpa=False)[0])  # the global adapter trains alone
    assert any(not np.array_equal(second_local[name], theta0[name]) for name in theta0)
    assert np.isfinite(metrics[protocol.DPA_LOCAL_LOSS])
    # The process's one model serves the next client as if FedDPA had never run on it.
    assert_adapters_equal(train(theta0, 1, feddpa=False)[0], plain_before)


def test_with_dp_update_a_local_adapter_that_did_not_train_goes_back_without_noise(server_identity):
    keys = {"dp": "update", "dp-noise-multiplier": 1.0, "dp-epsilon": 0.0, "dp-delta": 1e-3}
    app, context, theta0 = tiny_client(**{"local-steps": 1, **keys})
    reply = send(app, context, MessageType.TRAIN, dual_adapter(theta0, theta0), **DpaSettings().to_config())
    global_part, local_part = split_adapter(protocol.record_to_adapter(reply.content.array_records[protocol.ARRAYS]))
    assert_adapters_equal(local_part, theta0)  # round 1: the local adapter did not train, so nothing was released
    assert any(not np.array_equal(global_part[name], theta0[name]) for name in theta0)  # the noised global update


def test_a_client_whose_local_adapter_has_not_trained_scores_the_global_adapter_alone(server_identity):
    app, context, theta0 = tiny_client(**{"eval-max-new-tokens": 4})
    rng = np.random.default_rng(0)
    trained_global = {name: a + 0.05 * rng.standard_normal(a.shape).astype(a.dtype) for name, a in theta0.items()}

    def evaluate(sent: dict, **values) -> dict:
        return dict(send(app, context, MessageType.EVALUATE, sent, **values).content.metric_records[protocol.METRICS])

    fedit = evaluate(trained_global)
    dual = dual_adapter(trained_global, theta0)
    alone = evaluate(dual, **DpaSettings().to_config(), **{protocol.DPA_LOCAL_TRAINED: False})
    mixed = evaluate(dual, **DpaSettings().to_config(), **{protocol.DPA_LOCAL_TRAINED: True})
    assert alone[protocol.DPA_MEAN_WEIGHT] == 1.0 and mixed[protocol.DPA_MEAN_WEIGHT] <= 0.5
    for key in ("rouge1", "rougeL", "exact_match"):
        assert alone[key] == fedit[key]
    # eval-cross: the other tasks' items are mixed per item too, and their mean α(x) is reported beside the own one.
    cross = evaluate(dual, **DpaSettings().to_config(), **{protocol.DPA_LOCAL_TRAINED: True, protocol.CROSS_TASK: True})
    assert cross[protocol.DPA_MEAN_WEIGHT] == mixed[protocol.DPA_MEAN_WEIGHT]
    assert -0.5 <= cross[protocol.CROSS_DPA_MEAN_WEIGHT] <= 0.5 and sum(cross[protocol.CROSS_ITEMS]) > 0
    assert protocol.CROSS_DPA_MEAN_WEIGHT not in evaluate(
        dual, **DpaSettings().to_config(), **{protocol.CROSS_TASK: True, protocol.DPA_LOCAL_TRAINED: False}
    )


def test_a_federated_run_scores_every_client_and_saves_both_adapters(tmp_path):
    config = {
        **load_app_config(ROOT / "pyproject.toml"),
        "strategy": "feddpa",
        "model-name": TINY_MODEL,
        "precision": "fp32",
        "num-server-rounds": 2,
        "synthetic-tasks": "reverse,uppercase",
        "synthetic-train-examples": 16,
        "synthetic-test-examples": 6,
        "local-steps": 4,
        "learning-rate": 0.01,
        "eval-max-new-tokens": 6,
        "eval-global": True,
        "eval-cross": True,  # FedDPA's test-time personalization: the mixed adapters on the other task too
        "output-dir": str(tmp_path),
        "run-name": "feddpa",
    }
    simulate(config, num_supernodes=4)
    results = json.loads((tmp_path / "feddpa" / "results.json").read_text())
    clients = {str(p) for p in range(4)}
    for record in results["rounds"]:
        assert record["failures"] == [] and set(record["train"]) == set(record["eval"]) == clients
        for scores in record["eval"].values():
            assert 0 <= scores["rougeL"] <= 1 and 0 <= scores["global-rougeL"] <= 1
            if record["round"] == 1:  # no local adapter has trained yet: the global one alone
                assert scores[protocol.DPA_MEAN_WEIGHT] == 1.0
            else:
                assert -0.5 <= scores[protocol.DPA_MEAN_WEIGHT] <= 0.5
        local_losses = [scores.get(protocol.DPA_LOCAL_LOSS) for scores in record["train"].values()]
        assert (
            all(loss is None for loss in local_losses) if record["round"] == 1 else all(map(np.isfinite, local_losses))
        )
    base = load_base_model(TINY_MODEL)
    for p in range(4):
        for folder in ("global", "local"):  # standard PEFT folders
            model = PeftModel.from_pretrained(base, tmp_path / "feddpa" / "clients" / str(p) / folder)
            assert len(get_adapter_arrays(model)) > 0
            base = model.unload()
    cross = results["rounds"][-1]["cross_task"]
    assert np.array(cross["scores"]["rougeL"]).shape == (4, 2) and cross["items"] == [[6, 12]] * 2 + [[12, 6]] * 2


def test_an_image_client_trains_both_adapters_and_scores_them_mixed(server_identity):
    config = {**load_app_config(), "model-name": DIGITS_VIT, "data": "digits", "local-steps": 2, "batch-size": 16}
    context = client_context(config, num_partitions=4)
    app = make_client_app()
    run_config = RunConfig.from_run_config(config)
    theta0 = initial_adapter_arrays(run_config.model.name, run_config.lora, seed=run_config.seed)

    def send(kind: str, adapter: dict, feddpa: bool = True) -> Message:
        values = {
            protocol.SERVER_ROUND: 2,
            protocol.PARTITION_ID: 0,
            protocol.ADAPTER_DIGEST: protocol.adapter_digest(adapter),
            **(DpaSettings().to_config() if feddpa else {}),
        }
        content = RecordDict(
            {protocol.CONFIG: ConfigRecord(values), protocol.ARRAYS: protocol.adapter_to_record(adapter)}
        )
        return app(Message(content, 5, kind), context)

    reply = send(MessageType.TRAIN, dual_adapter(theta0, theta0))
    trained_global, trained_local = split_adapter(protocol.record_to_adapter(reply.content.array_records["arrays"]))
    for trained in (trained_global, trained_local):  # the LoRA arrays and the head of both adapters moved
        assert all(not np.array_equal(trained[name], theta0[name]) for name in theta0 if ".lora_A." not in name)
    mixed = dict(
        send(MessageType.EVALUATE, dual_adapter(trained_global, trained_global)).content.metric_records["metrics"]
    )
    alone = dict(send(MessageType.EVALUATE, trained_global, feddpa=False).content.metric_records["metrics"])
    assert mixed["items-accuracy"] == alone["items-accuracy"] and mixed["macro_f1"] == pytest.approx(alone["macro_f1"])
    assert -0.5 <= mixed[protocol.DPA_MEAN_WEIGHT] <= 0.5
