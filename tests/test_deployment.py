"""Deployment: a local SuperLink and 2 SuperNodes on 127.0.0.1, the app run with `flwr run`.

The same path a lab takes (README, "Deploying SuperNodes"), with the tiny model: each
SuperNode names its partition in --node-config, the ServerApp personalizes by partition
id, and every process the test starts is stopped at the end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(port: int, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert process.poll() is None, "the SuperLink exited during start-up"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"SuperLink on port {port} not healthy after {seconds} s")


def living_members(groups: set[int]) -> list[str]:
    """Processes (not zombies) in the given process groups, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, group = fields[0], int(fields[2])
        if group in groups and state != "Z":
            found.append(stat.parent.name)
    return found


def test_flwr_run_against_a_superlink_and_two_supernodes(tmp_path):
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FEDBILEVEL_OUTPUT_ROOT": str(tmp_path),
    }
    port = free_port()
    (tmp_path / "flwr-home").mkdir()
    (tmp_path / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "lab"\n\n[superlink.lab]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    started: list[subprocess.Popen] = []
    logs = []

    def start(name: str, *command: str) -> subprocess.Popen:
        log = (tmp_path / f"{name}.log").open("w")
        logs.append(log)
        # A session of its own, so that stopping it also stops the processes it spawns (ServerApp, ClientApps).
        process = subprocess.Popen(
            command, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        started.append(process)
        return process

    try:
        superlink = start(
            "superlink",
            str(BIN / "flower-superlink"),
            "--insecure",
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        )
        wait_healthy(port, superlink)
        for partition_id in range(2):
            start(
                f"supernode-{partition_id}",
                str(BIN / "flower-supernode"),
                "--insecure",
                "--superlink",
                f"127.0.0.1:{port}",
                "--node-config",
                f"partition-id={partition_id} num-partitions=2",
                "--port",
                str(free_port()),
            )
        run_config = (
            "model-name='tiny-random-llama' num-server-rounds=2 synthetic-tasks='reverse,uppercase' local-steps=2 "
            "synthetic-train-examples=8 synthetic-test-examples=4 eval-max-new-tokens=4 eval-every=0 "
            "output-dir='runs' run-name='deployed'"
        )
        result = subprocess.run(
            [str(BIN / "flwr"), "run", str(ROOT), "lab", "--stream", "--run-config", run_config],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        results = json.loads((tmp_path / "runs" / "deployed" / "results.json").read_text())
        assert {p: (c["task"], c["num_train"], c["num_test"]) for p, c in results["clients"].items()} == {
            "0": ("reverse", 8, 4),
            "1": ("uppercase", 8, 4),
        }
        assert [r["round"] for r in results["rounds"]] == [1, 2]
        assert all(r["failures"] == [] and set(r["train"]) == {"0", "1"} for r in results["rounds"])
        assert set(results["rounds"][-1]["eval"]) == {"0", "1"}
        assert (tmp_path / "runs" / "deployed" / "clients" / "1" / "adapter_model.safetensors").exists()
    finally:
        for process in reversed(started):
            os.killpg(process.pid, signal.SIGTERM)
        for process in started:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for log in logs:
            log.close()
    time.sleep(1)
    groups = {process.pid for process in started}
    assert living_members(groups) == [], "processes the test started are still running"


def test_the_front_door_fails_with_the_reason_last_when_the_server_app_fails(tmp_path):
    """`flwr run --stream` exits 0 after a failed ServerApp; scripts/flwr_run.sh (make run) must not."""
    env = {
        **os.environ,
        "FEDBILEVEL_SUPERLINK_PORT": str(free_port()),
        "FEDBILEVEL_NUM_SUPERNODES": "2",
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }
    missing = tmp_path / "no-such-run"
    run_config = f"resume-from='{missing}' model-name='tiny-random-llama'"
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "flwr_run.sh"), "--run-config", run_config],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    last = (result.stdout + result.stderr).strip().splitlines()[-1]
    assert last.startswith("fedbilevel: run ") and "finished:failed" in last
    assert "run-config key 'resume-from'" in last and str(missing) in last
