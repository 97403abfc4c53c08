"""Run tracking (issue 21): TensorBoard event files that hold each round of results.json."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, MessageType

from fedbilevel import protocol, tracking
from fedbilevel.config import RESUMABLE_KEYS, ConfigError, RunConfig, load_app_config
from fedbilevel.results import RunRecorder, make_run_dir
from fedbilevel.strategies.cross_task import cross_task_record
from fedbilevel.strategies.fedbip import FedBip
from fedbilevel.strategies.sampling import SamplingSettings
from fedbilevel.testing import INITIAL, FakeClient, FakeGrid

DEFAULTS = load_app_config(Path(__file__).resolve().parents[1] / "pyproject.toml")
needs_tensorboard = pytest.mark.skipif(tracking._MISSING is not None, reason="the [tensorboard] extra is missing")


class ScoringClient(FakeClient):
    """A FakeClient with the text scores a RunRecorder expects and a train loss that falls by round."""

    def handle(self, message):
        reply = super().handle(message)
        if message.metadata.message_type == MessageType.QUERY:
            return reply
        server_round = int(message.content.config_records["config"]["server-round"])
        if message.metadata.message_type == MessageType.EVALUATE:
            metrics = reply.content.metric_records["metrics"]
            metrics["rouge1"] = 0.1 * self.partition_id + 0.05 * server_round
            metrics["rougeL"] = 0.08 * self.partition_id + 0.05 * server_round
            metrics["exact_match"] = 0.05 * self.partition_id + 0.04 * server_round
        elif message.metadata.message_type == MessageType.TRAIN:
            reply.content.metric_records["metrics"]["train-loss"] = 2.0 / server_round + 0.1 * self.partition_id
        return reply


def tracked_run(tmp_path, tracker_name, *, rounds=3, cross=None):
    """A FedBip run of 6 clients (half train each round) recorded and tracked as run_server does it;
    ``cross``, when given, is the final round's ``cross_task`` entry (as eval-cross records it)."""
    config = RunConfig.from_run_config(
        DEFAULTS, {"output-dir": str(tmp_path), "run-name": "run", "tracker": tracker_name}
    )
    tracker = tracking.make_tracker(config.tracker)
    recorder = RunRecorder(config, make_run_dir(config))
    tracker.start(recorder.run_dir, recorder.results)

    def on_round_end(record):
        record["seconds_checkpoint"] = 0.25
        if cross is not None and record["round"] == rounds:
            record["cross_task"] = cross
        recorder.set_clients(strategy.clients)
        recorder.record_round(record)
        tracker.log_round(recorder.results)

    sampling = SamplingSettings(fraction_train=0.5, min_train_nodes=2)
    strategy = FedBip(initial_adapter=INITIAL, min_nodes=6, sampling=sampling, seed=7, on_round_end=on_round_end)
    strategy.start(FakeGrid({40 + p: ScoringClient(p) for p in range(6)}), ArrayRecord(), num_rounds=rounds)
    tracker.close()
    return recorder


def read_events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def scalar_series(events, tag):
    return {event.step: event.value for event in events.Scalars(tag)}


@needs_tensorboard
@pytest.mark.usefixtures("server_identity")
def test_tensorboard_event_files_hold_every_round_of_results_json(tmp_path):
    recorder = tracked_run(tmp_path, "tensorboard")
    rounds = recorder.results["rounds"]
    events = read_events(recorder.run_dir / "tensorboard")
    tags = events.Tags()
    for metric in ("rouge1", "rougeL", "exact_match"):
        expected = {r["round"]: pytest.approx(r["personalized_mean"][metric], rel=1e-6) for r in rounds}
        assert scalar_series(events, f"personalized_mean/{metric}") == expected
    for client in range(6):
        expected = {r["round"]: pytest.approx(r["eval"][str(client)]["rougeL"], rel=1e-6) for r in rounds}
        assert scalar_series(events, f"client/{client}/rougeL") == expected
        trained = {
            r["round"]: pytest.approx(r["train"][str(client)]["loss"]) for r in rounds if str(client) in r["train"]
        }
        assert trained and scalar_series(events, f"client/{client}/train_loss") == trained  # only when it trained
    assert "client/0/num-examples" not in tags["scalars"]  # scores only, not the reply's counts
    for r in rounds:
        step = r["round"]
        losses = [entry["loss"] for entry in r["train"].values()]
        assert scalar_series(events, "train_loss/mean")[step] == pytest.approx(sum(losses) / len(losses))
        assert scalar_series(events, "time/round")[step] == pytest.approx(r["seconds"], rel=1e-6)
        for part in ("client_train", "client_evaluate", "aggregation", "other"):
            assert scalar_series(events, f"time/{part}")[step] == pytest.approx(r["time_split"][part], rel=1e-6)
        assert scalar_series(events, "time/checkpoint")[step] == 0.25
        assert scalar_series(events, "bytes/down")[step] == r["bytes_down"]
        assert scalar_series(events, "bytes/up")[step] == r["bytes_up"]
    for key in ("similarity", "weights"):
        images = events.Images(f"matrix/{key}")
        assert [image.step for image in images] == [1, 2, 3]
        for image in images:
            assert image.encoded_image_string.startswith(b"\x89PNG") and image.width > 200 and image.height > 200


@needs_tensorboard
@pytest.mark.usefixtures("server_identity")
def test_a_resumed_run_writes_the_event_files_afresh_from_the_rounds_it_keeps(tmp_path):
    recorder = tracked_run(tmp_path, "tensorboard")
    folder = recorder.run_dir / "tensorboard"
    # As a resume after round 2: results.json keeps rounds 1 and 2; round 3 comes again.
    kept = {**recorder.results, "rounds": recorder.results["rounds"][:2]}
    tracker = tracking.make_tracker("tensorboard")
    tracker.start(recorder.run_dir, kept)
    tracker.log_round(recorder.results)
    tracker.close()
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1
    events = read_events(folder)
    assert [event.step for event in events.Scalars("personalized_mean/rougeL")] == [1, 2, 3]
    assert [image.step for image in events.Images("matrix/weights")] == [1, 2, 3]


@needs_tensorboard
@pytest.mark.usefixtures("server_identity")
def test_eval_cross_puts_its_matrix_and_means_in_the_final_round_only(tmp_path):
    tasks = {p: {protocol.TASK: "abc"[p // 2]} for p in range(6)}
    # Client p scores 0.1 * p + 0.2 on its own task and 0.1 on each other task.
    rows = {
        p: (
            {m: [0.1 * p + 0.2 if task == "abc"[p // 2] else 0.1 for task in "abc"] for m in protocol.TEXT_METRICS},
            [3] * 3,
            1.0,
        )
        for p in range(5)  # client 5 sent no usable cross-task scores
    }
    cross = cross_task_record(rows, tasks)
    recorder = tracked_run(tmp_path, "tensorboard", cross=cross)
    events = read_events(recorder.run_dir / "tensorboard")
    own = sum(0.1 * p + 0.2 for p in range(5)) / 5
    assert scalar_series(events, "cross_task/own_task_mean/rougeL") == {3: pytest.approx(own)}
    assert scalar_series(events, "cross_task/other_task_mean/rougeL") == {3: pytest.approx(0.1)}
    [image] = events.Images("matrix/cross_task")
    assert image.step == 3 and image.encoded_image_string.startswith(b"\x89PNG") and image.width > 400
    assert recorder.results["summary"]["split"] == "test"


@pytest.mark.usefixtures("server_identity")
def test_tracker_none_writes_nothing(tmp_path):
    recorder = tracked_run(tmp_path, "none", rounds=1)
    assert not (recorder.run_dir / "tensorboard").exists()
    assert sorted(p.name for p in recorder.run_dir.iterdir()) == ["config.json", "results.json"]


def test_an_unknown_tracker_fails_in_one_line_naming_the_key():
    message = "run-config key 'tracker': value 'wandb' is not allowed; choose one of none, tensorboard"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        RunConfig.from_run_config(DEFAULTS, {"tracker": "wandb"})


def test_tensorboard_without_the_package_fails_at_start_up_in_one_line(monkeypatch):
    monkeypatch.setattr(tracking, "_MISSING", "No module named 'tensorboard'")
    with pytest.raises(ConfigError) as failure:
        tracking.make_tracker("tensorboard")
    message = str(failure.value)
    assert "\n" not in message
    assert message.startswith("run-config key 'tracker': value 'tensorboard' is not allowed; it needs the tensorboard")
    assert "pip install -e '.[tensorboard]'" in message


def test_a_resumed_run_may_change_the_tracker():
    assert "tracker" in RESUMABLE_KEYS
