"""Does the server process accumulate memory over rounds? The real server loop, fake clients.

Runs ``run_server`` (the ServerApp's loop: strategy, results.json, checkpoints, final adapters)
for many rounds against an in-process grid whose 8 clients answer at once with adapters of the
real model's size (SmolLM2-135M, LoRA r 8 on q,k,v,o: 3.7 MB each) moved by a seeded random
update, so a round costs only the server's own work. Each strategy runs in a fresh process;
after every round the server's resident memory (``server_memory_mb`` in results.json) and
the Python heap traced by tracemalloc are recorded. The baseline is FedAvg, which keeps one
adapter; FedBip keeps one per client.

    .venv/bin/python scripts/memory_growth.py --rounds 40 --out outputs/memory-growth

Writes memory.json (every round, the command, the settings) and memory.md (growth per round
over the second half of the rounds, where start-up allocations are done, and the bytes sent
down and up) to --out. The clients hold the adapter they last received or trained, as the
ClientApp does, but not θ⁰ (they ask for it in full in round 1).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedbilevel import protocol
from fedbilevel.config import RunConfig, resolve
from fedbilevel.testing import InProcessGrid

NUM_CLIENTS = 8


class _Client:
    """Answers like the real ClientApp, instantly: a seeded random update, fixed scores."""

    def __init__(self, partition_id: int):
        self.partition_id = partition_id
        # (digest, adapter) it last received or trained, as the ClientApp holds it (not θ⁰: it asks for that)
        self.held: tuple[str, dict[str, np.ndarray]] = ("", {})

    def handle(self, message: Message) -> Message:
        if message.metadata.message_type == MessageType.QUERY:
            info = ConfigRecord(
                {
                    protocol.PARTITION_ID: self.partition_id,
                    protocol.NUM_PARTITIONS: NUM_CLIENTS,
                    protocol.TASK: f"task{self.partition_id // 2}",
                    protocol.NUM_TRAIN: 48,
                    protocol.NUM_TEST: 32,
                }
            )
            return Message(RecordDict({protocol.INFO: info}), reply_to=message)
        config = message.content.config_records[protocol.CONFIG]
        server_round = int(config[protocol.SERVER_ROUND])
        if protocol.ARRAYS in message.content.array_records:
            adapter = protocol.record_to_adapter(message.content.array_records[protocol.ARRAYS])
            self.held = (config[protocol.ADAPTER_DIGEST], adapter)
        elif self.held[0] != config[protocol.ADAPTER_DIGEST]:
            metrics = MetricRecord({protocol.PARTITION_ID: self.partition_id, protocol.MISSING_ADAPTER: 1})
            return Message(RecordDict({protocol.METRICS: metrics}), reply_to=message)
        now = time.time()
        metrics = {
            protocol.PARTITION_ID: self.partition_id,
            protocol.NUM_EXAMPLES: 48,
            protocol.BUSY_KEYS[0]: now,
            protocol.BUSY_KEYS[1]: now,
        }
        if message.metadata.message_type == MessageType.EVALUATE:
            metrics.update(dict.fromkeys(protocol.TEXT_METRICS, 0.5))
            return Message(RecordDict({protocol.METRICS: MetricRecord(metrics)}), reply_to=message)
        adapter = self.held[1]
        rng = np.random.default_rng(1000 * self.partition_id + server_round)
        trained = {
            name: (value + 1e-3 * rng.standard_normal(value.shape)).astype(np.float32)
            for name, value in adapter.items()
        }
        metrics[protocol.TRAIN_LOSS] = 1.0
        self.held = (protocol.adapter_digest(trained), trained)
        content = RecordDict(
            {protocol.ARRAYS: protocol.adapter_to_record(trained), protocol.METRICS: MetricRecord(metrics)}
        )
        return Message(content, reply_to=message)


def run_one(strategy: str, rounds: int, model_name: str) -> dict:
    """This process runs ``strategy`` for ``rounds`` rounds: its memory after each round
    (``rounds``) and its Python heap at the end (``heap-mb-at-end``)."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedbilevel.server import run_server

    # Messages take their run id from the task identity that Flower sets in a real run.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    tracemalloc.start()
    with tempfile.TemporaryDirectory() as folder:
        config = RunConfig.from_run_config(
            resolve(
                {
                    "strategy": strategy,
                    "num-server-rounds": rounds,
                    "model-name": model_name,
                    "min-nodes": NUM_CLIENTS,
                    "output-dir": folder,
                    "run-name": strategy,
                }
            )
        )
        run_dir = run_server(InProcessGrid({100 + p: _Client(p) for p in range(NUM_CLIENTS)}), config)
        rounds_recorded = json.loads((run_dir / "results.json").read_text())["rounds"]
    # tracemalloc's figure is read here for the last round only; RSS comes from every round.
    heap_mb = tracemalloc.get_traced_memory()[0] / 2**20
    return {
        "rounds": [
            {
                "round": r["round"],
                **r["server_memory_mb"],
                "seconds": r["seconds"],
                "bytes_down": r["bytes_down"],
                "bytes_up": r["bytes_up"],
            }
            for r in rounds_recorded
        ],
        "heap-mb-at-end": heap_mb,
    }


def growth(rows: list[dict]) -> float:
    """Least-squares slope of RSS (MB) per round over the second half of the rounds."""
    half = rows[len(rows) // 2 :]
    return float(np.polyfit([r["round"] for r in half], [r["rss-mb"] for r in half], 1)[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--strategies", default="fedavg,fedbip,fedbip-l")
    parser.add_argument("--model-name", default="smollm2-135m-instruct", help="sets the adapters' size")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one strategy, print JSON
    args = parser.parse_args()
    if args.rounds < 4:
        raise SystemExit(
            f"--rounds: {args.rounds} is not allowed; expected at least 4 (growth is fitted on the second half)"
        )
    if args.one:
        print("MEMORY " + json.dumps(run_one(args.one, args.rounds, args.model_name)))
        return 0
    results = {}
    for strategy in [s.strip() for s in args.strategies.split(",") if s.strip()]:
        started = time.time()
        done = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                strategy,
                "--rounds",
                str(args.rounds),
                "--model-name",
                args.model_name,
                "--out",
                str(args.out),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("MEMORY ")), None)
        if done.returncode != 0 or line is None:
            raise SystemExit(f"{strategy}: failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
        measured = json.loads(line.removeprefix("MEMORY "))
        rows = measured["rounds"]
        results[strategy] = {**measured, "growth-mb-per-round": growth(rows)}
        print(
            f"{strategy}: {args.rounds} rounds in {time.time() - started:.0f} s; "
            f"RSS round 1 {rows[0]['rss-mb']:.0f} MB, "
            f"last {rows[-1]['rss-mb']:.0f} MB, peak {rows[-1]['peak-rss-mb']:.0f} MB; "
            f"growth {results[strategy]['growth-mb-per-round']:+.2f} MB/round; "
            f"Python heap at end {measured['heap-mb-at-end']:.0f} MB",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(
        json.dumps({"command": sys.argv, "settings": vars(args) | {"out": str(args.out)}, "results": results}, indent=1)
    )
    lines = [
        "| strategy | RSS round 1 (MB) | RSS last round (MB) | peak (MB) | growth, 2nd half (MB/round) "
        "| Python heap at end (MB) | bytes down, round 1 / last | bytes up, last round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for strategy, result in results.items():
        rows = result["rounds"]
        lines.append(
            f"| {strategy} | {rows[0]['rss-mb']:.0f} | {rows[-1]['rss-mb']:.0f} | {rows[-1]['peak-rss-mb']:.0f} | "
            f"{result['growth-mb-per-round']:+.2f} | {result['heap-mb-at-end']:.0f} | "
            f"{rows[0]['bytes_down']:,} / {rows[-1]['bytes_down']:,} | {rows[-1]['bytes_up']:,} |"
        )
    (args.out / "memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
