"""The persistent per-node worker (node config ``node-worker=true``): same replies, state and log as a
ClientApp process; a light entry point; fallback in-process when the worker breaks; it exits on its own."""

import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from in_process import client_context

from fedbilevel import protocol
from fedbilevel.client import node_worker
from fedbilevel.config import RunConfig, load_app_config
from fedbilevel.models.adapter import initial_adapter_arrays

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {
    **load_app_config(),
    "model-name": "tiny-random-llama",
    "precision": "fp32",
    "synthetic-train-examples": 8,
    "synthetic-test-examples": 4,
    "local-steps": 1,
    "eval-max-new-tokens": 4,
    "num-server-rounds": 1,
}
VOLATILE = {*protocol.BUSY_KEYS, protocol.TRAIN_SECONDS, protocol.EVAL_SECONDS, protocol.RSS_MB, protocol.PEAK_RSS_MB}
NODE_ID = 5


def on_worker(state=None, **node):
    context = client_context(CONFIG, node_id=NODE_ID, state=state)
    context.node_config.update({"node-worker": True, **node})
    return context


def query():
    content = RecordDict({protocol.CONFIG: ConfigRecord({protocol.QUERY: protocol.QUERY_PARTITION})})
    return Message(content, NODE_ID, MessageType.QUERY)


def message(kind, adapter, partition_id=0):
    values = {protocol.SERVER_ROUND: 1, protocol.PARTITION_ID: partition_id}
    values[protocol.ADAPTER_DIGEST] = protocol.adapter_digest(adapter)  # named, not carried: held since the query
    return Message(RecordDict({protocol.CONFIG: ConfigRecord(values)}), NODE_ID, kind)


def flat(records: RecordDict) -> dict:
    """Records as comparable values (arrays as bytes), the volatile metrics left out."""
    out = {}
    for key, record in records.items():
        out[key] = {
            name: value.numpy().tobytes() if hasattr(value, "numpy") else value
            for name, value in record.items()
            if name not in VOLATILE
        }
    return out


@pytest.fixture
def short_dir():
    """A folder with a short path: a Unix socket's path must fit 107 bytes (pytest's tmp_path under xdist does not)."""
    with tempfile.TemporaryDirectory(prefix="nw-", dir="/tmp") as folder:
        yield Path(folder)


@pytest.fixture
def runtime_dir(short_dir, monkeypatch):
    """A private runtime folder for this test's workers; the workers started meanwhile end with it."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(short_dir))
    started = len(node_worker._started)
    yield short_dir / "fedbilevel"
    for process in node_worker._started[started:]:
        process.kill()
        process.wait()
    del node_worker._started[started:]


def test_entry_point_imports_flower_only_and_runs_the_app_in_process_by_default(server_identity):
    code = (
        "import sys, client_app; "
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'datasets', 'sklearn') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True
    )
    assert out.returncode == 0 and out.stdout.decode().split() == ["[]"], out.stderr.decode()[-2000:]
    # Worker off (no node-worker key, as in simulation): the real app, in this process, on the first message.
    context = client_context(CONFIG, node_id=NODE_ID)
    info = node_worker.make_entry_app()(query(), context).content.config_records[protocol.INFO]
    assert protocol.START_ERROR not in info and info[protocol.PARTITION_ID] == 0
    assert protocol.ARRAYS not in info and context.state.array_records  # θ⁰ held, as the real app does
    for value in ("maybe", 2):
        with pytest.raises(ValueError, match=f"node-config key 'node-worker': value {value!r} is not allowed"):
            node_worker.worker_enabled({"node-worker": value})
    assert node_worker.worker_enabled({"node-worker": "true"}) and not node_worker.worker_enabled({})


def test_worker_replies_as_the_app_in_this_process_with_state_and_log(runtime_dir, server_identity, capfd):
    app = node_worker.make_entry_app()
    here, there = client_context(CONFIG, node_id=NODE_ID), on_worker()
    config = RunConfig.from_run_config(CONFIG)
    initial = initial_adapter_arrays(config.model.name, config.lora, seed=config.seed)

    # The first message starts the worker; the stack and model load there, not here.
    replies = [app(query(), there)]
    assert len(node_worker._started) >= 1 and (runtime_dir / f"node{NODE_ID}.log").exists()
    socket_path = node_worker.WorkerPaths.of(NODE_ID, 1).socket
    assert oct(os.stat(socket_path).st_mode & 0o777) == "0o600" and oct(os.stat(runtime_dir).st_mode & 0o777) == "0o700"
    replies.append(app(message(MessageType.TRAIN, initial), there))  # names θ⁰, which the query left in the state
    err = capfd.readouterr().err
    assert "client 0 (reverse), round 1: 1 steps in" in err  # the worker's lines reach this process's output
    assert len(node_worker._started) == 1  # the second message found the worker running
    assert not node_worker.WorkerPaths.of(NODE_ID, 1).off.exists()  # no fallback

    expected = [
        node_worker.real_app()(query(), here),
        node_worker.real_app()(message(MessageType.TRAIN, initial), here),
    ]
    for reply, local in zip(replies, expected):
        assert reply.metadata.reply_to_message_id == local.metadata.reply_to_message_id
        assert flat(reply.content) == flat(local.content)
    assert flat(there.state) == flat(here.state)  # the trained adapter held, as in-process
    assert protocol.ARRAYS in replies[1].content.array_records

    # The app's own exception comes back with its type and text (Flower's error reply reads as before).
    with pytest.raises(Exception, match="message for partition 1 reached client 0") as raised:
        app(message(MessageType.EVALUATE, initial, partition_id=1), there)
    assert str(type(raised.value)) == "<class 'ValueError'>"
    assert isinstance(raised.value, node_worker.NodeWorkerError)


class Flower:
    """Flower's log lines at WARNING and above."""

    def __init__(self):
        self.lines = []
        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = lambda record: self.lines.append(record.getMessage())

    def __enter__(self):
        # Another test in this (xdist) process may have left Flower's logger disabled.
        flower = logging.getLogger("flwr")
        self.disabled, flower.disabled = flower.disabled, False
        flower.addHandler(self.handler)
        return self.lines

    def __exit__(self, *_):
        flower = logging.getLogger("flwr")
        flower.removeHandler(self.handler)
        flower.disabled = self.disabled


def test_a_broken_worker_means_in_process_replies_logged_once(runtime_dir, server_identity):
    paths = node_worker.WorkerPaths.of(NODE_ID, 1)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a "worker" that hangs up on every message
    dead.bind(str(paths.socket))
    dead.listen(4)

    def hang_up():
        while True:
            try:
                conn, _ = dead.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    app, context = node_worker.make_entry_app(), on_worker()
    config = RunConfig.from_run_config(CONFIG)
    initial = initial_adapter_arrays(config.model.name, config.lora, seed=config.seed)
    try:
        with Flower() as lines:
            info = app(query(), context).content.config_records[protocol.INFO]
            trained = app(message(MessageType.TRAIN, initial), context)
    finally:
        dead.close()
    assert protocol.START_ERROR not in info and protocol.ARRAYS in trained.content.array_records
    assert len(lines) == 1 and "node worker" in lines[0] and "run in the ClientApp process" in lines[0]
    assert paths.off.exists() and not node_worker._started  # off for the run: no worker started after it


def test_worker_exits_when_idle_and_when_the_supernode_is_gone(short_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def worker(name, *args):
        command = [sys.executable, "-m", node_worker.MODULE, "--socket", str(short_dir / name), *args]
        return subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)

    idle = worker("idle.sock", "--idle-seconds", "1")
    supernode = subprocess.Popen(["sleep", "60"])
    orphan = worker("orphan.sock", "--idle-seconds", "60", "--watch-pid", str(supernode.pid))
    deadline = time.time() + 30
    while not (short_dir / "orphan.sock").exists() and time.time() < deadline:
        time.sleep(0.1)
    supernode.kill()
    supernode.wait()
    try:
        assert idle.wait(timeout=30) == 0 and orphan.wait(timeout=30) == 0
    finally:
        for process in (idle, orphan):
            process.kill()
    assert "exits: idle" in idle.stderr.read() and "is gone" in orphan.stderr.read()
    assert not (short_dir / "idle.sock").exists() and not (short_dir / "orphan.sock").exists()


def test_the_final_rounds_evaluate_reply_ends_the_run(server_identity):
    config = ConfigRecord({protocol.SERVER_ROUND: 3, protocol.PARTITION_ID: 0})
    context = client_context({"num-server-rounds": 3})
    evaluate = Message(RecordDict({protocol.CONFIG: config}), NODE_ID, MessageType.EVALUATE)
    train = Message(RecordDict({protocol.CONFIG: config}), NODE_ID, MessageType.TRAIN)

    def reply(metrics):
        return Message(RecordDict({protocol.METRICS: MetricRecord(metrics)}), reply_to=evaluate)

    assert node_worker._is_final_evaluate(evaluate, reply({"exact_match": 1.0}), context)
    assert not node_worker._is_final_evaluate(evaluate, reply({protocol.MISSING_ADAPTER: 1}), context)
    assert not node_worker._is_final_evaluate(train, reply({}), context)
    assert not node_worker._is_final_evaluate(evaluate, reply({}), client_context({"num-server-rounds": 4}))
    np.testing.assert_equal(node_worker.idle_seconds({"node-worker-idle-seconds": "5"}), 5.0)


def test_a_start_prunes_files_of_nodes_gone_for_a_week_and_nothing_live(short_dir):
    root = short_dir
    mine = node_worker.WorkerPaths.of(NODE_ID, 1, root)
    old = [root / "node9.lock", root / "node9.log", root / "node9-run3-abcd1234.off", root / "dead.sock"]
    fresh = [root / "node8.lock", root / "node8.log"]
    for path in [*old, *fresh, mine.lock, mine.log, root / "notes.txt"]:
        path.write_text("")
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(root / "live.sock"))
    listening.listen()
    week_ago = time.time() - node_worker.STALE_SECONDS - 60
    for path in [*old, mine.lock, mine.log, root / "notes.txt", root / "live.sock"]:
        os.utime(path, (week_ago, week_ago))
    try:
        removed = node_worker.prune_stale(root, keep=mine)
    finally:
        listening.close()
    assert sorted(removed) == sorted(old)
    left = {path.name for path in root.iterdir()}
    assert left == {"node8.lock", "node8.log", mine.lock.name, mine.log.name, "notes.txt", "live.sock"}
