"""One download per client per round: a message names an adapter its client holds instead of carrying it."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from in_process import started_client

from fedbilevel import protocol
from fedbilevel.config import RunConfig, load_app_config
from fedbilevel.models.adapter import initial_adapter_arrays
from fedbilevel.strategies.fedamp import FedAmp
from fedbilevel.strategies.fedavg import FedAvg
from fedbilevel.strategies.fedbip import FedBip
from fedbilevel.testing import INITIAL, FakeClient, FakeGrid

ROUNDS = 3
ADAPTER_BYTES = sum(array.nbytes for array in INITIAL.values())


def run(strategy, behaviours):
    clients = {10 + p: FakeClient(p, behaviour) for p, behaviour in enumerate(behaviours)}
    strategy.start(FakeGrid(clients), protocol.adapter_to_record(INITIAL), num_rounds=ROUNDS)
    return strategy, clients


@pytest.mark.parametrize(
    "make",
    [
        lambda: FedBip(initial_adapter=INITIAL),
        lambda: FedBip(initial_adapter=INITIAL, layerwise=True),
        lambda: FedAmp(initial_adapter=INITIAL, proximal_lambda=0.1, sigma=5.0, self_weight=0.5),
        lambda: FedAvg(initial_adapter=INITIAL),
    ],
    ids=["fedbip", "fedbip-l", "fedamp", "fedavg"],
)
def test_each_client_downloads_its_adapter_once_a_round_with_the_same_results_as_full_sends(make, server_identity):
    strategy, clients = run(make(), ["good"] * 4)
    for client in clients.values():
        # Train + evaluate each round; the train message of round t + 1 names what evaluate of round t sent.
        assert len(client.full) == 2 * ROUNDS
        rounds = [server_round for _, server_round, _ in client.received]
        assert all(sum(f for f, r in zip(client.full, rounds) if r == t) <= 1 for t in range(1, ROUNDS + 1))
    # The new θ̄ᵢ reaches each client once a round (θ⁰ it derives itself). FedAMP's evaluated wᵢ is what the
    # client trained, so only the cloud models uᵢ of rounds 2.. travel.
    expected = 4 * (ROUNDS - 1) if isinstance(strategy, FedAmp) else 4 * ROUNDS
    assert sum(sum(client.full) for client in clients.values()) == expected
    for record in strategy.history:
        assert record["bytes_down"] < 4 * ADAPTER_BYTES + 4 * 2 * 1000  # adapters once + two small configs each
        assert not record["failures"]

    # Clients that forget what they hold are sent every adapter in full, after asking: same adapters, same scores.
    forgetful, forgetful_clients = run(make(), ["forgetful"] * 4)
    for p in range(4):
        for name in INITIAL:
            np.testing.assert_array_equal(
                strategy.personalized_adapter(p)[name], forgetful.personalized_adapter(p)[name]
            )
            np.testing.assert_array_equal(strategy.adapter_for(p)[name], forgetful.adapter_for(p)[name])
    assert [r["eval"] for r in strategy.history] == [r["eval"] for r in forgetful.history]
    assert [r["train"] for r in strategy.history] == [r["train"] for r in forgetful.history]
    for p, client in enumerate(clients.values()):
        assert [(t, r) for t, r, _ in client.received] == [(t, r) for t, r, _ in forgetful_clients[10 + p].received]
    for client in forgetful_clients.values():  # messages that named an adapter were followed by a full send
        assert sum(client.full) == 2 * ROUNDS < len(client.full)
    assert not any(r["failures"] for r in forgetful.history)


def test_a_client_that_lost_its_adapter_is_sent_it_in_full_within_the_round(server_identity):
    strategy, clients = run(FedBip(initial_adapter=INITIAL), ["good", "good", "forgetful", "good"])
    lost = clients[12]
    # Every message it could use carried the adapter: the named ones were answered missing-adapter and resent.
    assert len(lost.received) == 2 * ROUNDS
    assert sum(lost.full) == len(lost.received)
    assert (
        len(lost.full) == 3 * ROUNDS
    )  # each train message named its adapter (held, the server thought), then brought it
    assert all(record["train"].keys() == {"0", "1", "2", "3"} for record in strategy.history)


def test_a_restarted_node_gets_its_adapter_in_full(server_identity):
    strategy = FedBip(initial_adapter=INITIAL)
    clients = {10 + p: FakeClient(p) for p in range(4)}
    grid = FakeGrid(clients)
    strategy.start(grid, protocol.adapter_to_record(INITIAL), num_rounds=2)
    restarted = FakeClient(1)
    grid.nodes = {**{k: v for k, v in clients.items() if k != 11}, 21: restarted}
    strategy.start(grid, protocol.adapter_to_record(INITIAL), num_rounds=1)
    assert restarted.full == [True, True]  # its new node id holds nothing: no by-digest message, no resend
    assert clients[10].full[-2:] == [False, True]


def test_client_app_uses_the_adapter_it_holds_and_asks_for_one_it_does_not(server_identity):
    config = {
        **load_app_config(),
        "model-name": "tiny-random-llama",
        "precision": "fp32",
        "synthetic-train-examples": 8,
        "synthetic-test-examples": 4,
        "local-steps": 1,
        "eval-max-new-tokens": 4,
    }
    app, context = started_client(config)

    run_config = RunConfig.from_run_config(config)
    initial = initial_adapter_arrays(run_config.model.name, run_config.lora, seed=run_config.seed)

    def message(kind, adapter, *, full=True, digest=None):
        values = {protocol.SERVER_ROUND: 1, protocol.PARTITION_ID: 0}
        values[protocol.ADAPTER_DIGEST] = digest or protocol.adapter_digest(adapter)
        content = RecordDict({protocol.CONFIG: ConfigRecord(values)})
        if full:
            content[protocol.ARRAYS] = protocol.adapter_to_record(adapter)
        return Message(content, 5, kind)

    # The client derived θ⁰ at start (the server's own digest names it), so round 1 need not carry it.
    named, carried = (app(message(MessageType.TRAIN, initial, full=full), context) for full in (False, True))
    trained = protocol.record_to_adapter(carried.content.array_records[protocol.ARRAYS])
    for name, array in protocol.record_to_adapter(named.content.array_records[protocol.ARRAYS]).items():
        np.testing.assert_array_equal(array, trained[name])
    by_digest = app(message(MessageType.EVALUATE, trained, full=False), context)
    in_full = app(message(MessageType.EVALUATE, trained), context)
    scores = [dict(reply.content.metric_records[protocol.METRICS]) for reply in (by_digest, in_full)]
    for score in scores:
        for key in ("eval-seconds", *protocol.BUSY_KEYS):
            score.pop(key)
    assert scores[0] == scores[1] and "rougeL" in scores[0]
    other = app(message(MessageType.EVALUATE, initial, full=False), context)  # it holds `trained`, not θ⁰
    assert other.content.metric_records[protocol.METRICS][protocol.MISSING_ADAPTER] == 1
