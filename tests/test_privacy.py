"""Differential privacy (issue 19): DP-SGD through Opacus and the clipped, noised update; the accountant,
the stop rule, resume, and bad input."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from in_process import client_context, query_info
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fedbilevel import protocol
from fedbilevel.checkpoint import load_checkpoint, save_checkpoint
from fedbilevel.client.app import make_client_app
from fedbilevel.client.privacy import (
    STATE,
    DpSgd,
    Mechanism,
    PrivacyAccount,
    per_example_loss,
    plan,
    privatize_update,
)
from fedbilevel.client.train import TextCodec, proximal_term, train_adapter
from fedbilevel.client.vision import ImageCodec
from fedbilevel.config import ConfigError, RunConfig, load_app_config
from fedbilevel.data.digits import make_digits_client_data
from fedbilevel.data.synthetic import make_client_data
from fedbilevel.models.adapter import build_lora_model, get_adapter_arrays, initial_adapter_arrays, set_adapter_arrays
from fedbilevel.models.settings import LoraSettings
from fedbilevel.models.zoo import DIGITS_VIT, TINY_MODEL, load_tokenizer
from fedbilevel.privacy import (
    DP_EPSILON_SPENT,
    DP_HISTORY,
    DP_NOISE_MULTIPLIER,
    DP_SAMPLE_RATE,
    DP_STEPS,
    DP_STOPPED,
    JOURNAL,
    PrivacyLedger,
    PrivacySettings,
    extend,
    flatten,
    unflatten,
)
from fedbilevel.server import _resume_point
from fedbilevel.simulation import simulate as run_in_simulation
from fedbilevel.strategies.fedavg import FedAvg
from fedbilevel.strategies.replies import RejectedReply, check_reply
from fedbilevel.testing import INITIAL, FakeClient, FakeGrid

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = load_app_config(ROOT / "pyproject.toml")
NO_DROPOUT = LoraSettings(dropout=0.0)  # dropout masks depend on the batch's order and shape


def count_examples(n=8):
    """Synthetic `count` examples: every answer is one digit + EOS, so all have the same number of targets."""
    train, _ = make_client_data(4, 8, seed=0, num_train=n, num_test=1)
    return train


def with_random_adapter(model, scale=0.1, seed=0):
    """Random small A and B (with B = 0 the gradient of A is zero); an image head is kept."""
    rng = np.random.default_rng(seed)
    arrays = {
        name: (scale * rng.standard_normal(array.shape)).astype(np.float32) if ".lora_" in name else array
        for name, array in get_adapter_arrays(model).items()
    }
    set_adapter_arrays(model, arrays)
    return model


def private_step(model, codec, examples, dp, *, batch_size, bf16=False):
    """One DpSgd step on ``examples``: the gradient the optimizer gets (noisy, over the expected batch).
    The optimizer's learning rate is 0, so the model stays as it was."""
    encoded = codec.encode(examples)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=0.0)
    captured = []
    model.train()
    with dp.attach(model, optimizer, num_examples=len(encoded)) as attached:
        hook = attached.optimizer.step_hook

        def capture(optimizer):
            hook(optimizer)
            captured.append([p.grad.detach().clone() for p in optimizer.params])

        attached.optimizer.step_hook = capture
        attached.step(codec, encoded, batch_size=batch_size, device="cpu", bf16_autocast=bf16)
    model.eval()
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in parameters)  # model left clean
    return captured[0]


def _dp(sigma, clip, rate, seed=0):
    return DpSgd(noise_multiplier=sigma, max_grad_norm=clip, sample_rate=rate, seed=seed)


def norm(tensors):
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


# ------------------------------------------------------------------------------------------ DP-SGD


@pytest.mark.parametrize("precision", ["fp32", "bf16-autocast", "bf16"])
def test_each_examples_gradient_is_clipped_to_the_norm(precision):
    bf16 = precision != "fp32"
    model = with_random_adapter(build_lora_model(TINY_MODEL, NO_DROPOUT, seed=0, precision=precision))
    codec = TextCodec(load_tokenizer(TINY_MODEL), 128)
    examples = make_client_data(0, 8, seed=0, num_train=4, num_test=1)[0]
    # Each example alone (n = 1, q = 1, σ = 0): what it adds to the sum is its clipped gradient.
    alone = [private_step(model, codec, [example], _dp(0.0, 1e9, 1.0), batch_size=1, bf16=bf16) for example in examples]
    norms = [norm(g) for g in alone]
    clip = float(np.median(norms))  # some examples are clipped, some are not
    for example, raw, raw_norm in zip(examples, alone, norms):
        clipped = private_step(model, codec, [example], _dp(0.0, clip, 1.0), batch_size=1, bf16=bf16)
        assert norm(clipped) <= clip * (1 + 1e-5)  # the bound, to float32 precision even in bf16
        factor = min(1.0, clip / raw_norm)
        for got, want in zip(clipped, raw):
            torch.testing.assert_close(got, want * factor, rtol=1e-4, atol=1e-7 if not bf16 else 1e-5)
    if bf16:
        return
    # All four in one step of two chunks: the sum of the clipped gradients over the expected batch (4).
    together = private_step(model, codec, examples, _dp(0.0, clip, 1.0), batch_size=2)
    expected = [sum(g[k] * min(1.0, clip / n) for g, n in zip(alone, norms)) / 4 for k in range(len(together))]
    for got, want in zip(together, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert norm(together) <= clip * (1 + 1e-5)


def test_the_noise_has_the_calibrated_scale_over_the_expected_batch():
    settings = PrivacySettings(mode="dp-sgd", max_grad_norm=0.7, epsilon=3.0, delta=1e-5)
    mechanism = plan(settings, num_examples=8, num_clients=2, batch_size=2, accumulation=2, local_steps=5, rounds=4)
    assert mechanism.sample_rate == 0.5 and mechanism.steps == 5
    assert mechanism.noise_multiplier == get_noise_multiplier(
        target_epsilon=3.0, target_delta=1e-5, sample_rate=0.5, steps=20, accountant="rdp", epsilon_tolerance=0.01
    )
    # A zero adapter has zero gradients (B·A x with A = B = 0): what AdamW steps with is the noise alone.
    model = build_lora_model(TINY_MODEL, NO_DROPOUT, seed=0)
    set_adapter_arrays(model, {name: np.zeros_like(a) for name, a in get_adapter_arrays(model).items()})
    codec = TextCodec(load_tokenizer(TINY_MODEL), 128)
    examples = count_examples(8)
    sigma = mechanism.noise_multiplier
    for rate in (0.5, 0.01):  # 0.01: almost surely an empty sample, which still takes its noisy step
        grad = torch.cat(
            [g.flatten() for g in private_step(model, codec, examples, _dp(sigma, 0.7, rate), batch_size=2)]
        )
        expected = sigma * 0.7 / (rate * 8)  # Opacus: N(0, σ²C²) on the sum, over the expected batch q·n
        assert grad.numel() > 5000
        assert float(grad.std()) == pytest.approx(expected, rel=0.05)
        assert abs(float(grad.mean())) < 0.05 * expected


def test_calibration_keeps_the_planned_rounds_within_epsilon_and_the_next_one_past_it():
    for mode, expected_rate in (("dp-sgd", 16 / 48), ("update", 1.0)):
        settings = PrivacySettings(mode=mode, epsilon=4.0, delta=1e-3)
        mechanism = plan(
            settings, num_examples=48, num_clients=8, batch_size=16, accumulation=1, local_steps=10, rounds=5
        )
        assert mechanism.sample_rate == pytest.approx(expected_rate)
        account = PrivacyAccount([], delta=1e-3)
        spent = []
        for _ in range(5):
            account.spend(mechanism)
            spent.append(account.epsilon())
        assert spent == sorted(spent) and 4.0 - 0.05 < spent[-1] <= 4.0
        assert account.epsilon(mechanism) > 4.0  # a sixth round would exceed the target
        # The same as Opacus's own accountant stepping through every step.
        opacus = RDPAccountant()
        for _ in range(5 * mechanism.steps):
            opacus.step(noise_multiplier=mechanism.noise_multiplier, sample_rate=mechanism.sample_rate)
        assert opacus.get_epsilon(delta=1e-3) == pytest.approx(spent[-1], rel=1e-9)


@pytest.mark.parametrize(
    ("model_name", "batch_size", "accumulation", "mu", "optimizer"),
    [
        (DIGITS_VIT, 8, 1, 0.0, "adamw"),
        (DIGITS_VIT, 4, 2, 0.1, "adamw"),
        (DIGITS_VIT, 8, 1, 0.0, "sgd"),
        (TINY_MODEL, 8, 1, 0.0, "adamw"),
    ],
    ids=["image", "image-chunks-proximal", "image-sgd", "text"],
)
def test_no_noise_and_an_infinite_clip_train_todays_adapter(model_name, batch_size, accumulation, mu, optimizer):
    # q = 1 and batch-size × accumulation = n: every step sees all 8 examples, in both loops. Images have one
    # target each and the count answers equally many, so the per-example mean loss is today's loss.
    if model_name == DIGITS_VIT:
        examples, codec = make_digits_client_data(0, 8, seed=0, test_fraction=0.2).train[:8], ImageCodec()
    else:
        examples, codec = count_examples(8), TextCodec(load_tokenizer(TINY_MODEL), 128)

    def train(dp):
        gradients = []
        hook = register_optimizer_step_pre_hook(
            lambda optimizer, *_: gradients.append(
                torch.cat([p.grad.flatten() for group in optimizer.param_groups for p in group["params"]]).clone()
            )
        )
        model = with_random_adapter(build_lora_model(model_name, NO_DROPOUT, seed=0))
        try:
            train_adapter(
                model,
                codec,
                examples,
                steps=3,
                batch_size=batch_size,
                gradient_accumulation_steps=accumulation,
                learning_rate=0.01,
                bf16_autocast=False,
                seed=1,
                extra_loss=proximal_term(model, mu) if mu else None,
                dp_sgd=_dp(0.0, 1e12, 1.0) if dp else None,
                optimizer=optimizer,
                momentum=0.9 if optimizer == "sgd" else 0.0,
            )
        finally:
            hook.remove()
        return get_adapter_arrays(model), gradients

    today, today_gradients = train(dp=False)
    private, private_gradients = train(dp=True)
    assert len(today_gradients) == len(private_gradients) == 3
    torch.testing.assert_close(private_gradients[0], today_gradients[0], rtol=1e-5, atol=1e-6)
    # AdamW divides by √v: a coordinate whose gradient is ~0 turns float rounding into up to ~lr/10 of a
    # step; all others agree to float precision.
    differences = np.concatenate([np.abs(private[name] - today[name]).ravel() for name in today])
    assert np.quantile(differences, 0.99) < 1e-5 and differences.max() < (2e-3 if optimizer == "adamw" else 1e-6)


def test_a_model_with_batch_norm_is_refused_in_one_line():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3)).train()
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(
        ConfigError, match=r"^run-config key 'dp': value 'dp-sgd' is not allowed; Opacus cannot"
    ) as error:
        _dp(1.0, 1.0, 0.5).attach(model, optimizer, num_examples=4).__enter__()
    assert "\n" not in str(error.value)


def test_per_example_loss_of_a_text_batch_is_each_examples_mean_over_its_targets():
    tokenizer = load_tokenizer(TINY_MODEL)
    codec = TextCodec(tokenizer, 128)
    model = build_lora_model(TINY_MODEL, NO_DROPOUT, seed=0)
    examples = make_client_data(0, 8, seed=0, num_train=3, num_test=1)[0]
    batch = codec.collate(codec.encode(examples))
    with torch.no_grad():
        together = per_example_loss(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), batch["labels"]
        )
        for index, example in enumerate(examples):
            alone = codec.collate(codec.encode([example]))
            assert float(together[index]) == pytest.approx(float(model(**alone).loss), rel=1e-5)


# ------------------------------------------------------------------------------------------ update


def test_the_update_is_clipped_to_the_norm_and_noised_with_sigma_times_twice_the_norm():
    rng = np.random.default_rng(0)
    received = {"a": rng.normal(size=(60, 50)).astype(np.float32), "frozen": np.ones(4, np.float32)}
    trained = {"a": received["a"] + rng.normal(size=(60, 50)).astype(np.float32), "frozen": np.ones(4, np.float32)}
    update = trained["a"].astype(np.float64) - received["a"]
    clip = 0.1 * float(np.linalg.norm(update))
    no_noise = privatize_update(received, trained, names=["a"], max_norm=clip, noise_multiplier=0.0, rng=rng)
    sent_update = no_noise["a"].astype(np.float64) - received["a"]
    assert np.linalg.norm(sent_update) == pytest.approx(clip, rel=1e-5)  # clipped to C, same direction
    np.testing.assert_allclose(sent_update, update * clip / np.linalg.norm(update), atol=1e-6)
    noisy = privatize_update(received, trained, names=["a"], max_norm=clip, noise_multiplier=2.0, rng=rng)
    noise = noisy["a"].astype(np.float64) - received["a"] - sent_update
    assert noise.std() == pytest.approx(2.0 * 2 * clip, rel=0.05) and abs(noise.mean()) < 0.05 * clip  # σ · 2C
    np.testing.assert_array_equal(noisy["frozen"], received["frozen"])  # not trained: sent as received
    assert [a.dtype for a in noisy.values()] == [np.float32, np.float32]
    # No noise and an infinite clip: the trained adapter itself.
    same = privatize_update(received, trained, names=["a"], max_norm=1e30, noise_multiplier=0.0, rng=rng)
    np.testing.assert_array_equal(same["a"], trained["a"])


# ------------------------------------------------------------------------------------------ the client app


def client(overrides, partition_id=0, num_partitions=2, state=None):
    config = {
        **DEFAULTS,
        "model-name": TINY_MODEL,
        "precision": "fp32",
        "synthetic-train-examples": 8,
        "synthetic-test-examples": 2,
        "local-steps": 2,
        "batch-size": 4,
        "learning-rate": 0.01,
        "num-server-rounds": 3,
        "dp-delta": 1e-3,
        **overrides,
    }
    context = client_context(config, partition_id=partition_id, num_partitions=num_partitions, state=state)
    app = make_client_app()
    info = query_info(app, context)
    return app, context, RunConfig.from_run_config(config), info


def train_message(app, context, adapter, server_round, history=None):
    values = {
        protocol.SERVER_ROUND: server_round,
        protocol.PARTITION_ID: 0,
        protocol.ADAPTER_DIGEST: protocol.adapter_digest(adapter),
    }
    if history:
        values[DP_HISTORY] = flatten(history)
    content = RecordDict({protocol.CONFIG: ConfigRecord(values), protocol.ARRAYS: protocol.adapter_to_record(adapter)})
    reply = app(Message(content, 5, MessageType.TRAIN), context)
    return protocol.record_to_adapter(reply.content.array_records[protocol.ARRAYS]), dict(
        reply.content.metric_records[protocol.METRICS]
    )


def test_a_client_stops_before_a_round_that_would_exceed_its_epsilon(server_identity):
    one_round = Mechanism(noise_multiplier=1.0, sample_rate=0.5, steps=2)  # q = batch-size 4 / 8 examples
    first = PrivacyAccount([], delta=1e-3).epsilon(one_round)
    second = PrivacyAccount([(1.0, 0.5, 2)], delta=1e-3).epsilon(one_round)
    budget = (first + second) / 2  # room for one round, not two
    # A run planned for one round (a budget that two planned rounds exceed is refused at start-up), then
    # extended, as a resume with more num-server-rounds would be.
    *_, refused = client({"dp": "dp-sgd", "dp-noise-multiplier": 1.0, "dp-epsilon": budget, "num-server-rounds": 2})
    assert "the planned 2 rounds × 2 steps at sample rate 0.5 spend ε" in refused[protocol.START_ERROR]
    keys = {"dp": "dp-sgd", "dp-noise-multiplier": 1.0, "dp-epsilon": budget, "num-server-rounds": 1}
    app, context, config, info = client(keys)
    assert protocol.START_ERROR not in info
    sent = initial_adapter_arrays(TINY_MODEL, config.lora, seed=0)
    trained, metrics = train_message(app, context, sent, 1)
    assert not all(np.array_equal(trained[name], sent[name]) for name in sent)
    assert metrics[DP_EPSILON_SPENT] == pytest.approx(first) and first <= budget
    assert (metrics[DP_STEPS], metrics[DP_STOPPED], metrics[DP_NOISE_MULTIPLIER], metrics[DP_SAMPLE_RATE]) == (
        2,
        0,
        1.0,
        0.5,
    )
    assert unflatten(context.state.config_records[STATE][DP_HISTORY]) == [(1.0, 0.5, 2)]
    again, stopped = train_message(app, context, trained, 2)
    assert all(np.array_equal(again[name], trained[name]) for name in trained)  # the adapter goes back as received
    assert stopped[DP_STOPPED] == 1 and stopped[DP_STEPS] == 0 and stopped[protocol.TRAIN_LOSS] == 0.0
    assert stopped[DP_EPSILON_SPENT] == pytest.approx(first)  # never more than the budget


def test_a_fresh_client_continues_the_account_the_server_sends_back(server_identity):
    # A resumed run starts fresh client processes: the train message carries the server's copy.
    history = [(1.0, 0.5, 2), (1.0, 0.5, 2)]
    app, context, config, _ = client({"dp": "dp-sgd", "dp-noise-multiplier": 1.0, "dp-epsilon": 0.0})
    sent = initial_adapter_arrays(TINY_MODEL, config.lora, seed=0)
    _, metrics = train_message(app, context, sent, 3, history=[(1.0, 0.5, 4)])
    assert metrics[DP_EPSILON_SPENT] == pytest.approx(PrivacyAccount([(1.0, 0.5, 6)], delta=1e-3).epsilon())
    assert unflatten(context.state.config_records[STATE][DP_HISTORY]) == [(1.0, 0.5, 6)]
    # The client's own account wins when it has spent more (a round whose reply the server never accepted).
    _, metrics = train_message(app, context, sent, 4, history=history)
    assert metrics[DP_EPSILON_SPENT] == pytest.approx(PrivacyAccount([(1.0, 0.5, 8)], delta=1e-3).epsilon())


def test_the_update_mode_sends_a_clipped_noised_update_and_accounts_each_round(server_identity):
    app, context, config, info = client({"dp": "update", "dp-max-grad-norm": 0.01, "dp-epsilon": 20.0})
    assert protocol.START_ERROR not in info
    mechanism = plan(
        config.privacy, num_examples=8, num_clients=2, batch_size=4, accumulation=1, local_steps=2, rounds=3
    )
    sent = initial_adapter_arrays(TINY_MODEL, config.lora, seed=0)
    update, metrics = train_message(app, context, sent, 1)
    difference = np.concatenate([(update[name].astype(np.float64) - sent[name]).ravel() for name in sent])
    # ‖clipped τ‖ ≤ C is small next to the noise: what arrives is N(0, σ²(2C)²) per coordinate, give or take C.
    expected = mechanism.noise_multiplier * 2 * 0.01
    assert np.linalg.norm(difference - difference.mean()) / math.sqrt(difference.size) == pytest.approx(
        expected, rel=0.05
    )
    assert (metrics[DP_SAMPLE_RATE], metrics[DP_STEPS], metrics[DP_STOPPED]) == (1.0, 1, 0)
    assert metrics[DP_EPSILON_SPENT] == pytest.approx(PrivacyAccount([], delta=1e-3).epsilon(mechanism))
    # The client holds what it sent (the server names it by digest next round), not the un-noised adapter.
    assert (
        protocol.adapter_digest(update) == context.state.config_records["held-adapter-digest"][protocol.ADAPTER_DIGEST]
    )


# ------------------------------------------------------------------------------------------ the server's copy


class DpClient(FakeClient):
    """A fake client that reports one DP-SGD round (σ 1, q 0.5, 2 steps) with every train reply
    (its ε spent: the rounds it trained in this process)."""

    trained = 0

    def handle(self, message):
        reply = super().handle(message)
        if message.metadata.message_type == MessageType.TRAIN:
            self.trained += 1
            metrics = dict(reply.content.metric_records[protocol.METRICS])
            metrics.update(
                {
                    DP_EPSILON_SPENT: float(self.trained),
                    DP_NOISE_MULTIPLIER: 1.0,
                    DP_SAMPLE_RATE: 0.5,
                    DP_STEPS: 2.0,
                    DP_STOPPED: 0.0,
                }
            )
            reply.content[protocol.METRICS] = MetricRecord(metrics)
        return reply


def test_the_server_keeps_each_clients_account_through_a_resume(tmp_path, server_identity):
    def run(rounds, strategy):
        clients = {p: DpClient(p) for p in range(2)}
        strategy.start(FakeGrid({20 + p: c for p, c in clients.items()}), ArrayRecord(), num_rounds=rounds)
        return clients

    first = FedAvg(initial_adapter=INITIAL)
    clients = run(2, first)
    assert DP_HISTORY not in clients[0].configs[0]  # round 1's train message: no account yet
    assert first.history[0]["train"]["0"][DP_EPSILON_SPENT] == 1.0  # results.json's train entry
    first.store.attach(tmp_path / "store")
    save_checkpoint(tmp_path, first.checkpoint())
    assert load_checkpoint(tmp_path)["privacy"] == {"0": [1.0, 0.5, 4.0], "1": [1.0, 0.5, 4.0]}
    resumed = FedAvg(initial_adapter=INITIAL)
    resumed.store.attach(tmp_path / "store")
    resumed.restore(load_checkpoint(tmp_path))
    clients = run(1, resumed)  # fresh clients: what they know of their account comes from the server
    sent = [c for c in clients[1].configs if DP_HISTORY in c]
    assert len(sent) == 1 and unflatten(sent[0][DP_HISTORY]) == [(1.0, 0.5, 4)]
    assert resumed.privacy.histories[1] == [(1.0, 0.5, 6)]


def test_releases_after_the_last_checkpoint_count_when_the_run_resumes(tmp_path, server_identity):
    """A server that stops after round 2's replies arrived but before its checkpoint: the resumed run
    counts round 2's releases from the journal, and again when it replays the round."""

    def strategy():
        made = FedAvg(initial_adapter=INITIAL, on_round_end=lambda record: checkpoint_after_round_1(made, record))
        made.store.attach(tmp_path / "store")
        made.privacy.attach(tmp_path / JOURNAL)
        return made

    def checkpoint_after_round_1(made, record):
        if record["round"] == 1:
            save_checkpoint(tmp_path, made.checkpoint())

    def run(made, rounds):
        clients = {p: DpClient(p) for p in range(2)}
        made.start(FakeGrid({20 + p: c for p, c in clients.items()}), ArrayRecord(), num_rounds=rounds)
        return clients

    run(strategy(), 2)
    assert load_checkpoint(tmp_path)["privacy"] == {"0": [1.0, 0.5, 2.0], "1": [1.0, 0.5, 2.0]}  # round 1 only
    resumed = strategy()
    resumed.restore(load_checkpoint(tmp_path))
    assert resumed.privacy.histories == {0: [(1.0, 0.5, 4)], 1: [(1.0, 0.5, 4)]}  # round 2 from the journal
    clients = run(resumed, 1)  # round 2 again: a second release
    assert unflatten(clients[0].configs[0][DP_HISTORY]) == [(1.0, 0.5, 4)]
    assert resumed.privacy.histories == {0: [(1.0, 0.5, 6)], 1: [(1.0, 0.5, 6)]}
    entries = [json.loads(line) for line in (tmp_path / JOURNAL).read_text().splitlines()]
    assert [(e["round"], e["partition_id"]) for e in entries] == [(1, 0), (1, 1), (2, 0), (2, 1), (2, 0), (2, 1)]


class RejectedDpClient(DpClient):
    """A DpClient whose round-2 adapter holds NaN: the server rejects the reply, which reports its DP round."""

    def handle(self, message):
        reply = super().handle(message)
        config = message.content.config_records[protocol.CONFIG]
        if message.metadata.message_type == MessageType.TRAIN and config[protocol.SERVER_ROUND] == 2:
            adapter = protocol.record_to_adapter(reply.content.array_records[protocol.ARRAYS])
            adapter["b"][0] = np.nan
            reply.content[protocol.ARRAYS] = protocol.adapter_to_record(adapter)
        return reply


def test_a_rejected_reply_still_counts_in_the_account_and_incomplete_dp_metrics_are_rejected(tmp_path, server_identity):
    made = FedAvg(initial_adapter=INITIAL, min_available_fraction=0.5)
    made.privacy.attach(tmp_path / JOURNAL)
    clients = {0: RejectedDpClient(0), 1: DpClient(1)}
    made.start(FakeGrid({20 + p: c for p, c in clients.items()}), ArrayRecord(), num_rounds=2)
    assert [(f["phase"], f["partition_id"]) for f in made.history[1]["failures"]] == [("train", 0)]
    assert made.privacy.histories == {0: [(1.0, 0.5, 4)], 1: [(1.0, 0.5, 4)]}
    ledger = PrivacyLedger()
    ledger.attach(tmp_path / JOURNAL)
    assert ledger.restore({}) == 4  # a resume from before round 1 recounts every release, the rejected one too
    report = {protocol.TRAIN_LOSS: 1.0, protocol.NUM_EXAMPLES: 10, protocol.PARTITION_ID: 0, DP_EPSILON_SPENT: 1.0}
    message = Message(RecordDict({protocol.METRICS: MetricRecord(report)}), 7, MessageType.TRAIN)
    with pytest.raises(RejectedReply, match="train metric 'dp-noise-multiplier': None; expected a finite number"):
        check_reply(message, 0, "train")


def test_a_torn_last_journal_line_is_ignored_and_a_broken_one_before_it_is_an_error(tmp_path):
    line = '{"round": 3, "partition_id": 1, "sigma": 1.0, "sample_rate": 0.5, "steps": 2}\n'
    (tmp_path / JOURNAL).write_text(line + line[:20])  # the server stopped while writing the second
    ledger = PrivacyLedger()
    ledger.attach(tmp_path / JOURNAL)
    assert ledger.restore({"1": [1.0, 0.5, 4.0]}, after_round=2) == 1
    assert ledger.histories == {1: [(1.0, 0.5, 6)]}
    assert ledger.restore({"1": [1.0, 0.5, 4.0]}, after_round=3) == 0  # round 3 is in the checkpoint
    # A resumed run attaches first: the torn tail is cut, so its own releases start lines of their own and a
    # second resume reads them.
    (tmp_path / JOURNAL).write_text(line + line[:20])
    resumed = PrivacyLedger()
    resumed.attach(tmp_path / JOURNAL)
    assert (tmp_path / JOURNAL).read_text() == line
    resumed.restore({}, after_round=2)
    report = {DP_EPSILON_SPENT: 1.5, DP_NOISE_MULTIPLIER: 1.0, DP_SAMPLE_RATE: 0.5, DP_STEPS: 2.0, DP_STOPPED: 0.0}
    resumed.note(1, report, server_round=3)
    again = PrivacyLedger()
    again.attach(tmp_path / JOURNAL)
    assert again.restore({}, after_round=2) == 2 and again.histories == {1: [(1.0, 0.5, 4)]}
    (tmp_path / JOURNAL).write_text(line[:20] + "\n" + line)
    with pytest.raises(ValueError, match="line 1 is not a DP release"):
        ledger.restore({})


def test_resuming_an_update_run_noised_at_another_sensitivity_is_refused(tmp_path):
    keys = {"dp": "update", "dp-noise-multiplier": 1.0, "dp-epsilon": 0.0, "num-server-rounds": 3}
    config = RunConfig.from_run_config({**DEFAULTS, **keys, "resume-from": str(tmp_path)})
    (tmp_path / "config.json").write_text(json.dumps({"run_config": config.to_run_config()}))
    meta = {"round": 1, "clients": {}, "store": {}, "privacy": {"0": [1.0, 1.0, 1.0]}}
    save_checkpoint(tmp_path, meta)  # as an earlier version wrote it: the noise was σ·C
    with pytest.raises(ConfigError, match=r"noised its dp='update' rounds at sensitivity 1·C, .* 2·C, so their ε"):
        _resume_point(config)
    save_checkpoint(tmp_path, {**meta, "privacy_update_sensitivity": 2.0})
    assert _resume_point(config)[1]["round"] == 1


def test_the_ledger_merges_rounds_and_ignores_stopped_ones():
    ledger = PrivacyLedger()
    report = {DP_EPSILON_SPENT: 1.5, DP_NOISE_MULTIPLIER: 1.0, DP_SAMPLE_RATE: 0.5, DP_STEPS: 2.0, DP_STOPPED: 0.0}
    assert "ε spent 1.500" in ledger.note(3, report, server_round=1)
    assert "stopped training" in ledger.note(3, {**report, DP_STEPS: 0.0, DP_STOPPED: 1.0}, server_round=1)
    assert ledger.note(3, {protocol.TRAIN_LOSS: 1.0}, server_round=1) is None  # no DP
    assert ledger.histories == {3: [(1.0, 0.5, 2)]}
    assert extend([(1.0, 0.5, 2)], 2.0, 0.5, 3) == [(1.0, 0.5, 2), (2.0, 0.5, 3)]  # σ changed (a longer resume)
    with pytest.raises(ValueError, match="triples"):
        unflatten([1.0, 0.5])


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"dp-max-grad-norm": 0.0},
            r"'dp-max-grad-norm': value 0\.0 is not allowed; expected a number in \(0\.0, inf\)",
        ),
        ({"dp-max-grad-norm": -1.0}, r"'dp-max-grad-norm': value -1\.0 is not allowed"),
        ({"dp-delta": 1.0}, r"'dp-delta': value 1\.0 is not allowed; expected a number in \(0\.0, 1\.0\)"),
        ({"dp": "dp-sgd", "dp-epsilon": 0.0}, r"'dp-epsilon': value 0\.0 .* expected dp-epsilon > 0 .* or dp-noise"),
        ({"dp": "dp-sgd", "precision": "4bit"}, r"'precision': value '4bit' is not allowed; dp='dp-sgd' is verified"),
        ({"dp": "dp-sgd", "gradient-checkpointing": True}, r"'gradient-checkpointing': value True .* dp='update'"),
        ({"dp": "dp-sgd", "strategy": "fedala"}, r"'strategy': value 'fedala' is not allowed; dp='dp-sgd' cannot"),
    ],
)
def test_bad_settings_fail_at_start_up_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=r"^run-config key " + message) as error:
        RunConfig.from_run_config(DEFAULTS, overrides)
    assert "\n" not in str(error.value)


def test_dp_update_and_fedala_or_4bit_are_allowed():
    RunConfig.from_run_config(DEFAULTS, {"dp": "update", "strategy": "fedala", "precision": "4bit"})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (PrivacySettings(mode="dp-sgd", delta=0.2), r"'dp-delta': value 0\.2 .* less than 1/8, one over this client's"),
        (
            PrivacySettings(mode="update", delta=0.5),
            r"'dp-delta': value 0\.5 .* less than 1/4, one over the federation",
        ),
        (PrivacySettings(mode="dp-sgd", epsilon=0.1), r"'dp-epsilon': value 0\.1 .* reports at least ε 0\.1[0-9]* at"),
        (
            PrivacySettings(mode="dp-sgd", epsilon=0.5, noise_multiplier=0.3),
            r"'dp-epsilon': value 0\.5 .* at dp-noise-multiplier 0\.3 the planned 20 rounds × 10 steps at sample "
            r"rate 0\.5 spend ε [0-9.]+; expected",
        ),
    ],
)
def test_a_plan_the_clients_data_cannot_meet_fails_in_one_line(settings, message):
    with pytest.raises(ConfigError, match=r"^run-config key " + message) as error:
        plan(settings, num_examples=8, num_clients=4, batch_size=4, accumulation=1, local_steps=10, rounds=20)
    assert "\n" not in str(error.value)


def test_a_client_whose_data_cannot_meet_the_budget_cannot_start(server_identity):
    *_, info = client({"dp": "dp-sgd", "dp-delta": 0.2})
    assert info[protocol.START_ERROR].startswith("ConfigError: run-config key 'dp-delta': value 0.2 is not allowed")


def test_results_and_checkpoint_record_dp_keys_only_with_dp(server_identity):
    strategy = FedAvg(initial_adapter=INITIAL)
    strategy.start(FakeGrid({20 + p: FakeClient(p) for p in range(2)}), ArrayRecord(), num_rounds=1)
    assert "privacy" not in strategy.checkpoint()
    assert not any(key.startswith("dp-") for key in json.dumps(strategy.history).split('"'))


# ------------------------------------------------------------------------------------------ end to end (flwr run)


def simulate(tmp_path, name, **overrides):
    """A run of the app through `flwr run` (fedbilevel.simulation): two tiny-model clients; its results."""
    config = {
        **DEFAULTS,
        "model-name": TINY_MODEL,
        "precision": "fp32",
        "synthetic-tasks": "reverse,uppercase",
        "synthetic-train-examples": 16,
        "synthetic-test-examples": 2,
        "local-steps": 2,
        "learning-rate": 0.01,
        "eval-max-new-tokens": 2,
        "output-dir": str(tmp_path),
        "run-name": name,
        "dp-delta": 1e-3,
        **overrides,
    }
    run_in_simulation(config, num_supernodes=2)
    return json.loads((tmp_path / name / "results.json").read_text())


def test_dp_sgd_end_to_end_records_epsilon_each_round_and_a_resume_keeps_the_account(tmp_path):
    keys = {"dp": "dp-sgd", "dp-noise-multiplier": 1.0, "dp-epsilon": 0.0}  # q = 8 / 16
    simulate(tmp_path, "dp", **keys, **{"num-server-rounds": 1})
    assert load_checkpoint(tmp_path / "dp")["privacy"] == {"0": [1.0, 0.5, 2.0], "1": [1.0, 0.5, 2.0]}
    results = simulate(tmp_path, "dp", **keys, **{"num-server-rounds": 2, "resume-from": str(tmp_path / "dp")})
    for server_round, record in zip((1, 2), results["rounds"]):
        assert record["failures"] == [] and set(record["train"]) == {"0", "1"}
        expected = PrivacyAccount([(1.0, 0.5, 2 * server_round)], delta=1e-3).epsilon()
        for entry in record["train"].values():  # fresh client processes after the resume: ε continues
            assert entry[DP_EPSILON_SPENT] == pytest.approx(expected) and entry[DP_STOPPED] == 0


def test_update_mode_end_to_end_stays_within_its_epsilon(tmp_path):
    results = simulate(tmp_path, "update", **{"dp": "update", "dp-epsilon": 5.0, "num-server-rounds": 1})
    record = results["rounds"][0]
    assert record["failures"] == [] and set(record["train"]) == {"0", "1"}
    for entry in record["train"].values():
        assert 4.9 < entry[DP_EPSILON_SPENT] <= 5.0 and entry[DP_SAMPLE_RATE] == 1.0
