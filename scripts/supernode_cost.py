"""The cost of a message on a real SuperNode (issue 21, item 3).

A SuperNode runs every message in a fresh ClientApp process: it imports the stack, builds
the client's session (config, data) and loads the base model again. This script measures
that, twice over:

* ``breakdown``: one ClientApp message in a fresh process, timed part by part (import the
  stack, build the ClientSession, load the model, train), as a SuperNode would run it;
* ``deploy``: a local insecure SuperLink and 2 SuperNodes (as tests/test_deployment.py
  starts them), ``flwr run`` with the given model for R rounds, and results.json's
  per-round seconds and ``time_split``.

``--baseline DIR`` repeats both with the code of another checkout (e.g. a git worktree of
the commit before a change: ``git worktree add /tmp/sn-base HEAD``) in the same script run,
so that before/after are ratios on the same machine at the same time.

``--node-worker on`` runs the deploy part with ``node-worker=true`` in the SuperNodes' node
config (a persistent worker per node keeps the stack and the model loaded between messages,
fedbilevel/client/node_worker.py); ``both`` runs it with the worker on, then off, in the same
script run (after = on, before = off). The workers' sockets and log are in ``<out>/<label>/runtime``.

    .venv/bin/python scripts/supernode_cost.py --model tiny-random-llama --rounds 3 \
        --baseline /tmp/sn-base --out /tmp/sn-cost
    .venv/bin/python scripts/supernode_cost.py --model tiny-random-llama --rounds 3 --node-worker both
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

SMALL_RUN = {
    "synthetic-tasks": "'reverse,uppercase'",
    "synthetic-train-examples": "8",
    "synthetic-test-examples": "4",
    "eval-max-new-tokens": "4",
    "eval-every": "0",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_config(model: str, rounds: int, local_steps: int, extra: dict[str, str]) -> dict[str, str]:
    return {
        "model-name": f"'{model}'",
        "num-server-rounds": str(rounds),
        "local-steps": str(local_steps),
        **SMALL_RUN,
        **extra,
    }


# --- one message, part by part (run in a fresh process: python supernode_cost.py --phase ...) ---


def _message_breakdown(model: str, local_steps: int, partition_id: int) -> dict[str, float]:
    """Time each part of one train message as a fresh ClientApp process runs it (this process)."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    import fedbilevel.client.app as client_app

    timings["import"] = time.perf_counter() - start
    from flwr.app import Context, RecordDict

    from fedbilevel.client.train import train_adapter
    from fedbilevel.config import load_app_config

    run_config = load_app_config(Path.cwd() / "pyproject.toml")
    values = {key: eval(value) for key, value in _run_config(model, 1, local_steps, {}).items()}
    run_config.update(values)
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": partition_id, "num-partitions": 2},
        state=RecordDict(),
        run_config=run_config,
    )
    mark = time.perf_counter()
    session = client_app.ClientSession(context, None)
    timings["session"] = time.perf_counter() - mark
    mark = time.perf_counter()
    model_, tokenizer = client_app._model(session.config.model, session.config.lora)
    timings["model"] = time.perf_counter() - mark
    settings = session.config.train
    mark = time.perf_counter()
    train_adapter(
        model_,
        session.codec(tokenizer),
        session.data.train,
        steps=settings.local_steps,
        bf16_autocast=False,
        device=model_.device,
        seed=0,
        **settings.loop_options(),
    )
    timings["train"] = time.perf_counter() - mark
    timings["to_first_step"] = timings["import"] + timings["session"] + timings["model"]
    return timings


def breakdown(model: str, local_steps: int, code: Path, repeats: int, env: dict[str, str]) -> list[dict]:
    """``repeats`` fresh processes, each timing one message with the code in ``code``."""
    results = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--phase",
                "--model",
                model,
                "--local-steps",
                str(local_steps),
            ],
            cwd=code,
            env={**env, "PYTHONPATH": str(code)},
            capture_output=True,
            text=True,
            check=True,
        )
        timings = json.loads(out.stdout.strip().splitlines()[-1])
        timings["process"] = time.perf_counter() - start
        results.append(timings)
    return results


# --- a real SuperLink and 2 SuperNodes ---


def _stamp(stream, log) -> None:
    for line in iter(stream.readline, b""):
        log.write(f"{time.time():.3f} {line.decode(errors='replace')}")
        log.flush()


_TRAINED = re.compile(r"client (\d+) \(.*\), round (\d+): \d+ steps in ([\d.]+) s")


def _timeline(log: Path) -> list[dict]:
    """Per train message in a SuperNode's stamped log: arrival -> ClientApp process start -> training
    done -> reply sent, in seconds after arrival; ``to_first_step`` = training done - its seconds."""
    messages, current = [], None
    for line in log.read_text().splitlines():
        stamp, _, text = line.partition(" ")
        try:
            t = float(stamp)
        except ValueError:
            continue
        if "Receiving: train message" in text:
            current = {"arrived": t}
        elif current is None:
            continue
        elif "Start `flwr-clientapp` process" in text:
            current["process_started"] = t - current["arrived"]
        elif match := _TRAINED.search(text):
            current["round"] = int(match.group(2))
            current["trained"] = t - current["arrived"]
            current["to_first_step"] = current["trained"] - float(match.group(3))
        elif "Sending: train message" in text:
            current["replied"] = t - current["arrived"]
            messages.append(current)
            current = None
    return messages


def deploy(
    model: str,
    rounds: int,
    local_steps: int,
    code: Path,
    workdir: Path,
    env: dict[str, str],
    node_worker: bool = False,
) -> dict:
    """Run ``flwr run`` of the app in ``code`` on a local SuperLink and 2 SuperNodes; per-round timings.
    ``node_worker``: the SuperNodes' node config turns the persistent per-node worker on."""
    workdir.mkdir(parents=True, exist_ok=True)
    runtime = workdir / "runtime"  # the workers' private folder (sockets, their log)
    runtime.mkdir(mode=0o700, exist_ok=True)
    port = _free_port()
    home = workdir / "flwr-home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "lab"\n\n[superlink.lab]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = {
        **env,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "FLWR_HOME": str(home),
        "FEDBILEVEL_OUTPUT_ROOT": str(workdir),
        "PYTHONPATH": str(code),
        "XDG_RUNTIME_DIR": str(runtime),
    }
    started: list[subprocess.Popen] = []
    logs = []

    def start(name: str, *command: str) -> subprocess.Popen:
        log = (workdir / f"{name}.log").open("w")
        logs.append(log)
        process = subprocess.Popen(
            command, env=env, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        started.append(process)
        # Each line stamped with the time it arrived: the timeline of a message (_timeline).
        threading.Thread(target=_stamp, args=(process.stdout, log), daemon=True).start()
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
        import httpx

        deadline = time.time() + 60
        while time.time() < deadline:
            if superlink.poll() is not None:
                raise RuntimeError(f"the SuperLink exited; see {workdir / 'superlink.log'}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).is_success:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        for partition_id in range(2):
            start(
                f"supernode-{partition_id}",
                str(BIN / "flower-supernode"),
                "--insecure",
                "--superlink",
                f"127.0.0.1:{port}",
                "--node-config",
                f"partition-id={partition_id} num-partitions=2" + (" node-worker=true" if node_worker else ""),
                "--port",
                str(_free_port()),
            )
        config = _run_config(model, rounds, local_steps, {"output-dir": "'runs'", "run-name": "'cost'"})
        began = time.perf_counter()
        result = subprocess.run(
            [
                str(BIN / "flwr"),
                "run",
                str(code),
                "lab",
                "--stream",
                "--run-config",
                " ".join(f"{k}={v}" for k, v in config.items()),
            ],
            env=env,
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=3600,
        )
        wall = time.perf_counter() - began
        (workdir / "flwr-run.log").write_text(result.stdout + result.stderr)
        results_file = workdir / "runs" / "cost" / "results.json"
        if result.returncode != 0 or not results_file.exists():
            raise RuntimeError(f"flwr run failed; see {workdir / 'flwr-run.log'}")
        results = json.loads(results_file.read_text())
    finally:
        for process in reversed(started):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in started:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for log in logs:
            log.close()
    # A worker exits when its SuperNode's executor is gone (it checks every second).
    deadline = time.time() + 30
    while list(runtime.glob("*/*.sock")) and time.time() < deadline:
        time.sleep(0.5)
    left = [str(path) for path in runtime.glob("*/*.sock")]
    if left:
        print(f"warning: node workers still listening after the SuperNodes stopped: {left}", file=sys.stderr)
    rounds_ = [
        {
            "round": r["round"],
            "seconds": r["seconds"],
            **r["time_split"],
            **{f"train_seconds_{p}": t["seconds"] for p, t in r["train"].items()},
        }
        for r in results["rounds"]
    ]
    timeline = [m for i in range(2) for m in _timeline(workdir / f"supernode-{i}.log")]
    return {"wall": wall, "rounds": rounds_, "messages": timeline}


def _summary(label: str, message: list[dict], run: dict | None) -> dict:
    def mean(values):
        values = list(values)
        return sum(values) / len(values) if values else float("nan")

    summary = {"label": label}
    for part in ("import", "session", "model", "train", "to_first_step", "process"):
        summary[f"message_{part}"] = mean(m[part] for m in message)
    if run is not None:
        summary["round_seconds"] = mean(r["seconds"] for r in run["rounds"])
        summary["round_other"] = mean(r["other"] for r in run["rounds"])
        summary["round_client_train"] = mean(r["client_train"] for r in run["rounds"])
        summary["wall"] = run["wall"]
        for part in ("process_started", "to_first_step", "replied"):
            summary[f"deployed_{part}"] = mean(m[part] for m in run["messages"] if part in m)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-random-llama")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes timed part by part")
    parser.add_argument("--baseline", type=Path, help="a checkout of the code before the change")
    parser.add_argument("--no-deploy", action="store_true", help="only the part-by-part breakdown")
    parser.add_argument(
        "--node-worker",
        choices=("off", "on", "both"),
        default="off",
        help="the SuperNodes' node-worker setting in the deploy part; both: on, then off",
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--phase", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(_message_breakdown(args.model, args.local_steps, 0)))
        return
    out = args.out or Path(tempfile.mkdtemp(prefix="supernode-cost-"))
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    codes = [("after", ROOT)] + ([("before", args.baseline.resolve())] if args.baseline else [])
    workers = {"off": [False], "on": [True], "both": [True, False]}[args.node_worker]
    report = {"model": args.model, "rounds": args.rounds, "local_steps": args.local_steps, "cpus": os.cpu_count()}
    summaries = []
    for name, code in codes:
        message = breakdown(args.model, args.local_steps, code, args.repeats, env)
        for worker in workers:
            label = name if args.node_worker != "both" else f"{name}-worker-{'on' if worker else 'off'}"
            run = (
                None
                if args.no_deploy
                else deploy(args.model, args.rounds, args.local_steps, code, out / label, env, node_worker=worker)
            )
            report[label] = {"message": message, "deploy": run, "node_worker": worker}
            summaries.append(_summary(label, message, run))
            print(json.dumps(summaries[-1]), flush=True)
    report["summary"] = summaries
    (out / "supernode_cost.json").write_text(json.dumps(report, indent=2))
    keys = [k for k in summaries[0] if k != "label"]
    width = max(8, *(len(summary["label"]) for summary in summaries))
    print(f"\n{'':{width}}" + "".join(f"{k:>20}" for k in keys))
    for summary in summaries:
        print(f"{summary['label']:{width}}" + "".join(f"{summary[k]:>20.2f}" for k in keys))
    if len(summaries) == 2:
        after, before = summaries
        print(
            f"{after['label']}/{before['label']}: "
            + ", ".join(f"{k} {after[k] / before[k]:.2f}" for k in keys if before.get(k))
        )
    print(f"details: {out / 'supernode_cost.json'}")


if __name__ == "__main__":
    main()
