"""Cross-task evaluation (eval-cross): the items a client scores for the other tasks, the server's checks
and matrix, the own/other means in the tables. The simulated run with the matrix and its heatmap is
test_simulation.py's FedBip run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, MessageType
from in_process import client_context
from simulated import flan_without_test_lines_for_client_2

from fedbilevel import protocol
from fedbilevel.client.app import ClientSession
from fedbilevel.client.cross import other_task_scores
from fedbilevel.comparison import load_run, markdown, summary_rows, write_plots
from fedbilevel.config import ConfigError, RunConfig, load_app_config
from fedbilevel.data.types import data_digest
from fedbilevel.results import cross_task_table
from fedbilevel.strategies.cross_task import cross_task_means, cross_task_record
from fedbilevel.strategies.fedavg import FedAvg
from fedbilevel.testing import INITIAL, FakeClient, FakeGrid

ROOT = Path(__file__).resolve().parents[1]
FLAN8 = ROOT.parent / "shared" / "data" / "flan8"


# ---------------------------------------------------------------- start-up: data without tasks


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"data": "digits"}, "data='digits' holds images"),
        ({"synthetic-split": "iid", "synthetic-instruction": "per-task"}, "synthetic-split='iid' gives every client"),
        ({"synthetic-tasks": "reverse"}, "synthetic-tasks='reverse' is one task: there is no other task to score"),
        ({"data": "hub", "hub-dataset": "x/y", "partitioner": "iid"}, "partitioner='iid' gives the clients no task"),
        ({"data": "hub", "hub-dataset": "x/y", "partitioner": "dirichlet", "partition-by": "label"}, "'dirichlet'"),
    ],
)
def test_eval_cross_on_data_without_a_task_per_client_is_a_start_up_error(overrides, reason):
    config = {**load_app_config(ROOT / "pyproject.toml"), **overrides, "eval-cross": True}
    with pytest.raises(ConfigError, match=r"^run-config key 'eval-cross': value True is not allowed; ") as error:
        RunConfig.from_run_config(config)
    assert reason in str(error.value) and "\n" not in str(error.value)
    RunConfig.from_run_config({**config, "eval-cross": False})  # the data itself is fine


def test_eval_cross_is_off_by_default_and_runs_in_the_final_round_only():
    config = RunConfig.from_run_config(load_app_config(ROOT / "pyproject.toml"))
    assert config.eval.cross is False and not config.cross_evaluates_in_round(config.num_server_rounds)
    config = RunConfig.from_run_config({**load_app_config(ROOT / "pyproject.toml"), "eval-cross": True})
    last = config.num_server_rounds
    assert [config.cross_evaluates_in_round(r) for r in range(1, last + 1)] == [False] * (last - 1) + [True]


# ---------------------------------------------------------------- the client: which items, which scores


def session(partition_id: int, num_partitions: int, **run_config) -> ClientSession:
    config = {**load_app_config(ROOT / "pyproject.toml"), **run_config}
    context = client_context(config, partition_id=partition_id, num_partitions=num_partitions, node_id=7)
    return ClientSession(context, overrides=None)


def item_score(example) -> float:
    """A made-up per-item score that tells items apart."""
    return (len(example.instruction) % 7) / 7


def recording_scorer(calls: list):
    def score(items):
        calls.append(list(items))
        values = [item_score(item) for item in items]
        return {f"{protocol.ITEMS_PREFIX}{name}": values for name in protocol.TEXT_METRICS}

    return score


FEDERATIONS = {
    # 4 clients, 2 tasks; validation items (val-fraction) as the scored split.
    "synthetic": (4, {"synthetic-tasks": "reverse,uppercase", "val-fraction": 0.25, "eval-split": "validation"}),
    # 16 clients, 2 a task, each task's test lines split between them, capped at 5 a client.
    "flan8": (16, {"data": "flan-json", "data-path": str(FLAN8), "clients-per-task": 2, "max-test-examples": 5}),
}


@pytest.mark.parametrize("name", list(FEDERATIONS))
def test_other_task_items_are_exactly_what_their_owners_score(name):
    if name == "flan8" and not FLAN8.is_dir():
        pytest.skip(f"{FLAN8} (the shared Flan-8 federation) is not present")
    size, run_config = FEDERATIONS[name]
    owners = [session(p, size, **run_config) for p in range(size)]
    for client in (0, size - 1):
        calls: list = []
        me = owners[client]
        out = other_task_scores(recording_scorer(calls), me.config, client, size)
        others = [owner for owner in owners if owner.data.task != me.data.task]
        # One scoring call over the other tasks' owners' scored items, in partition order.
        assert calls == [[item for owner in others for item in owner.scored]]
        for p, owner in enumerate(owners):
            mine = owner.data.task == me.data.task
            assert out[protocol.CROSS_ITEMS][p] == (0 if mine else len(owner.scored))
            assert out[protocol.CROSS_DIGESTS][p] == protocol.digest_number(data_digest(owner.data))
            expected = 0.0 if mine else float(np.mean([item_score(item) for item in owner.scored]))
            for metric in protocol.TEXT_METRICS:
                assert out[f"{protocol.CROSS_PREFIX}{metric}"][p] == pytest.approx(expected)
        assert out[protocol.CROSS_SECONDS] >= 0 and protocol.CROSS_DPA_MEAN_WEIGHT not in out


def test_feddpas_mean_weight_over_the_other_tasks_items_goes_into_the_reply():
    size, run_config = FEDERATIONS["synthetic"]
    me = session(0, size, **run_config)

    def mixing(items):  # as FedDPA's scoring: the scores and the mean α(x) over these items
        return {**recording_scorer([])(items), protocol.DPA_MEAN_WEIGHT: 0.125}

    assert other_task_scores(mixing, me.config, 0, size)[protocol.CROSS_DPA_MEAN_WEIGHT] == 0.125


def test_a_partition_that_cannot_be_loaded_is_skipped_not_fatal(tmp_path):
    # Client 2's category has no test lines: it cannot start, and the others' cross-task scoring,
    # which loads every partition, once failed the whole evaluate reply (losing the own-task scores).
    data = flan_without_test_lines_for_client_2(tmp_path / "flan")
    me = session(0, 3, **{"data": "flan-json", "data-path": str(data)})
    calls: list = []
    out = other_task_scores(recording_scorer(calls), me.config, 0, 3)
    beta = session(1, 3, **{"data": "flan-json", "data-path": str(data)})
    assert calls == [beta.scored] and out[protocol.CROSS_ITEMS] == [0, 1, 0]
    assert out[protocol.CROSS_DIGESTS][2] == 0  # no data: if its owner had started, the server refuses the row


# ---------------------------------------------------------------- the server: checks and matrix


class CrossClient(FakeClient):
    """A FakeClient with 3 scored items, text scores and cross-task scores when asked; ``cross`` says how."""

    SIZE = 4

    def __init__(self, partition_id: int, cross: str = "good"):
        super().__init__(partition_id, data_digest=f"{partition_id + 10:012x}ffff")
        self.cross = cross

    def handle(self, message):
        reply = super().handle(message)
        if message.metadata.message_type == MessageType.QUERY:
            info = reply.content.config_records[protocol.INFO]
            info[protocol.NUM_TEST], info[protocol.NUM_PARTITIONS] = 3, self.SIZE
            return reply
        if message.metadata.message_type != MessageType.EVALUATE:
            return reply
        metrics = reply.content.metric_records[protocol.METRICS]
        own = 0.1 * (self.partition_id + 1)
        metrics.update({"rouge1": own, "rougeL": own, "exact_match": own, protocol.NUM_EXAMPLES: 3})
        asked = message.content.config_records[protocol.CONFIG].get(protocol.CROSS_TASK)
        if (not asked and self.cross != "unasked") or self.cross == "none":
            return reply
        other = [p for p in range(self.SIZE) if p // 2 != self.partition_id // 2]
        score = [0.0 if p not in other else 0.25 * (p % 2 + 1) for p in range(self.SIZE)]  # 0.25, 0.5
        metrics.update(
            {
                protocol.CROSS_ITEMS: [3 if p in other else 0 for p in range(self.SIZE)],
                protocol.CROSS_DIGESTS: [p + 10 for p in range(self.SIZE)],
                protocol.CROSS_SECONDS: 0.5,
                **{f"{protocol.CROSS_PREFIX}{m}": list(score) for m in protocol.TEXT_METRICS},
            }
        )
        if self.cross == "short":  # one entry too few: another federation size
            metrics[protocol.CROSS_ITEMS] = metrics[protocol.CROSS_ITEMS][:-1]
        if self.cross == "foreign":  # scored another copy of the data
            metrics[protocol.CROSS_DIGESTS] = [p + 99 for p in range(self.SIZE)]
        if self.cross == "miscount":  # not the items the owner scores
            metrics[protocol.CROSS_ITEMS] = [2 if p in other else 0 for p in range(self.SIZE)]
        if self.cross == "range":
            metrics["cross-rouge1"] = [1.5] * self.SIZE
        if self.cross in ("nan", "unasked"):
            metrics["cross-exact_match"] = [math.nan] * self.SIZE
        if self.cross.startswith("dpa"):  # FedDPA: the mean α(x) over its own and the other tasks' items
            metrics[protocol.DPA_MEAN_WEIGHT] = 0.4
            metrics[protocol.CROSS_DPA_MEAN_WEIGHT] = 1.5 if self.cross == "dpa-bad" else 0.1 * self.partition_id
        return reply


def cross_rounds(behaviour: list[str], evaluate_cross, num_rounds: int = 1) -> tuple[list[dict], dict]:
    """FedAvg over one CrossClient per ``behaviour`` entry (partition ids 0, 1, ...): its round records, its clients."""
    clients = {p: CrossClient(p, how) for p, how in enumerate(behaviour)}
    records: list = []
    strategy = FedAvg(initial_adapter=INITIAL, min_nodes=4, on_round_end=records.append, evaluate_cross=evaluate_cross)
    strategy.start(FakeGrid({70 + p: c for p, c in clients.items()}), ArrayRecord(), num_rounds=num_rounds)
    return records, clients


@pytest.mark.usefixtures("server_identity")
def test_final_round_matrix_and_unusable_cross_task_parts_are_recorded_failures():
    (first, final), clients = cross_rounds(["good", "short", "foreign", "nan"], lambda r: r == 2, num_rounds=2)
    evaluate_configs = [c for c in clients[0].configs if protocol.CROSS_TASK in c]
    assert len(evaluate_configs) == 1 and evaluate_configs[0][protocol.SERVER_ROUND] == 2  # final round only
    assert "cross_task" not in first and first["failures"] == []
    reasons = {(f["phase"], f["partition_id"]): f["reason"] for f in final["failures"]}
    assert set(reasons) == {("cross-task", 1), ("cross-task", 2), ("cross-task", 3)}
    assert "'cross-items' is 3 entries; expected one entry per partition (4)" in reasons[("cross-task", 1)]
    assert "partition 0's data as this client loaded it differs from its owner's" in reasons[("cross-task", 2)]
    assert reasons[("cross-task", 3)] == "cross-task scores: exact_match nan on partition 0; expected a score in [0, 1]"
    # Ordinary scores of the clients whose cross-task part was refused (NaN too) still count, without cross- keys.
    assert set(final["eval"]) == {"0", "1", "2", "3"}
    assert all(not k.startswith("cross-") for scores in final["eval"].values() for k in scores)
    cross = final["cross_task"]
    assert cross["tasks"] == ["task0", "task1"] and cross["clients"] == [0, 1, 2, 3]
    # Client 0: own task = its ordinary score on its own 3 items; task1 = items of 2 and 3 (3 each), 0.25 and 0.5.
    assert cross["scores"]["exact_match"] == [[0.1, 0.375], None, None, None]
    assert cross["items"] == [[3, 6], None, None, None]
    assert cross["own_task_mean"]["exact_match"] == 0.1 and cross["other_task_mean"]["exact_match"] == 0.375


@pytest.mark.usefixtures("server_identity")
def test_miscounted_missing_or_impossible_cross_task_scores_are_refused():
    ((record,), _) = cross_rounds(["miscount", "good", "none", "range"], bool)
    reasons = {f["partition_id"]: f["reason"] for f in record["failures"]}
    assert reasons[0] == "cross-task scores: 2 items of partition 2 (task1) scored; expected 3"
    assert reasons[2] == "cross-task scores: none in the reply; the evaluate message asked for them"
    assert reasons[3] == "cross-task scores: rouge1 1.5 on partition 0; expected a score in [0, 1]"
    assert [row is None for row in record["cross_task"]["items"]] == [True, False, True, True]


@pytest.mark.usefixtures("server_identity")
def test_feddpas_weights_on_own_and_other_task_items_are_recorded_per_client():
    ((record,), _) = cross_rounds(["dpa", "dpa", "good", "dpa-bad"], bool)
    (failure,) = record["failures"]
    assert (failure["phase"], failure["partition_id"]) == ("cross-task", 3)
    assert failure["reason"] == "cross-task scores: 'cross-feddpa-mean-weight' is 1.5; expected a number in [-1, 1]"
    assert record["cross_task"]["feddpa_mean_weight"] == [[0.4, 0.0], [0.4, 0.1], None, None]


@pytest.mark.usefixtures("server_identity")
def test_cross_task_metrics_nobody_asked_for_are_neither_recorded_nor_refused():
    ((record,), _) = cross_rounds(["unasked"] * 4, lambda r: False)  # NaN cross-task scores in every reply
    assert record["failures"] == [] and "cross_task" not in record and set(record["eval"]) == {"0", "1", "2", "3"}
    assert all(not k.startswith("cross-") for scores in record["eval"].values() for k in scores)


# ---------------------------------------------------------------- own/other means in the tables


# Three clients of tasks a, b, c; client 2 has no scores. Own: (0.9 + 0.8) / 2; other: (0.15 + 0.2) / 2.
MATRIX = {
    "tasks": ["a", "b", "c"],
    "clients": [0, 1, 2],
    "client_tasks": ["a", "b", "c"],
    "scores": {"exact_match": [[0.9, 0.1, 0.2], [0.3, 0.8, 0.1], None]},
    "items": [[4, 5, 6], [4, 5, 6], None],
}


def test_own_and_other_task_means_by_hand():
    means = cross_task_means(MATRIX)
    assert means["own_task"]["exact_match"] == pytest.approx(0.85)
    assert means["other_task"]["exact_match"] == pytest.approx(0.175)
    single = {
        **MATRIX,
        "tasks": ["a"],
        "client_tasks": ["a", "a", "a"],
        "scores": {"exact_match": [[0.4], None, [0.6]]},
    }
    assert cross_task_means(single) == {"own_task": {"exact_match": 0.5}, "other_task": {"exact_match": None}}


def test_record_orders_clients_by_task_and_the_run_table_shows_the_means():
    info = {
        p: {protocol.TASK: task, protocol.NUM_TEST: 2} for p, task in enumerate(["b", "a", "b", "a"])
    }  # tasks by first partition: b, a
    row = ({"rouge1": [0.5, 0.25], "rougeL": [0.5, 0.25], "exact_match": [0.5, 0.25]}, [2, 4], 1.0)
    record = cross_task_record({0: row}, info)
    assert record["tasks"] == ["b", "a"] and record["clients"] == [0, 2, 1, 3]
    assert record["client_tasks"] == ["b", "b", "a", "a"] and record["items"] == [[2, 4], None, None, None]
    assert record["own_task_mean"]["exact_match"] == 0.5 and record["other_task_mean"]["exact_match"] == 0.25
    table = cross_task_table({**MATRIX, **cross_task_means_fields(MATRIX)}, "exact_match", "test")
    assert "| 0 | a | 0.900 | 0.100 | 0.200 | 0.900 | 0.150 |" in table
    assert "| 2 | c | – | – | – | – | – |" in table
    assert table.splitlines()[-1] == "| mean | | | | | 0.850 | 0.175 |"
    # FedDPA: its mean weight on the global adapter, own items and the other tasks' items, per row.
    assert "feddpa_mean_weight" not in record
    mixed = cross_task_record({0: row}, info, {0: (0.4, 0.2)})
    assert mixed["feddpa_mean_weight"] == [[0.4, 0.2], None, None, None]
    table = cross_task_table(
        {**MATRIX, **cross_task_means_fields(MATRIX), "feddpa_mean_weight": [[0.4, 0.2], None, [0.5, 0.1]]},
        "exact_match",
        "test",
    )
    assert table.splitlines()[-1] == (
        "FedDPA's weight α(x) on the global adapter, mean over clients: 0.450 on their own items, "
        "0.150 on the other tasks' items."
    )


def cross_task_means_fields(cross):
    means = cross_task_means(cross)
    return {"own_task_mean": means["own_task"], "other_task_mean": means["other_task"]}


def write_run(folder: Path, seed: int, own: float, other: float | None) -> Path:
    """A one-round run whose final round holds a 2 × 2 cross-task matrix with these means (None: no matrix)."""
    scores = {"rouge1": 0.5, "rougeL": 0.5, "exact_match": 0.5}
    record = {"round": 1, "eval": {"0": scores, "1": scores}, "failures": [], "personalized_mean": scores}
    if other is not None:
        matrix = {"exact_match": [[own, other], [other, own]]}
        record["cross_task"] = {
            "tasks": ["a", "b"],
            "clients": [0, 1],
            "client_tasks": ["a", "b"],
            "scores": matrix,
            "items": [[3, 3], [3, 3]],
            **cross_task_means_fields({"tasks": ["a", "b"], "client_tasks": ["a", "b"], "scores": matrix}),
        }
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"seed": seed, "run_config": {}}))
    clients = {"0": {"task": "a"}, "1": {"task": "b"}}
    summary = {"primary_metric": "exact_match", "seconds": 60.0}
    results = {"strategy": folder.name.split("-")[0], "clients": clients, "rounds": [record], "summary": summary}
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_comparison_tables_show_own_and_other_task_means_over_seeds(tmp_path):
    runs = [
        load_run(write_run(tmp_path / "fedbip-0", 0, 0.8, 0.2)),
        load_run(write_run(tmp_path / "fedbip-1", 1, 0.6, 0.4)),
        load_run(write_run(tmp_path / "fedavg-0", 0, 0.5, None)),  # no eval-cross
    ]
    fedbip, fedavg = summary_rows(runs)
    assert fedbip["cross_seeds"] == "0 1" and fedbip["cross_own_exact_match_mean"] == pytest.approx(0.7)
    assert fedbip["cross_own_exact_match_std"] == pytest.approx(math.sqrt(0.02))
    assert fedbip["cross_other_exact_match_mean"] == pytest.approx(0.3)
    assert fedavg["cross_seeds"] == "" and math.isnan(fedavg["cross_own_exact_match_mean"])
    text = markdown(runs)
    assert "| fedbip | 0 1 | 0.700 ± 0.141 | 0.300 ± 0.141 |" in text and "| fedavg | – | – | – |" in text
    assert "cross_seeds" not in summary_rows(runs[2:])[0]  # without eval-cross the tables are as before
    paths = write_plots(runs, tmp_path / "out")
    assert tmp_path / "out" / "cross_task_fedbip.png" in paths
    assert not (tmp_path / "out" / "cross_task_fedavg.png").exists()
