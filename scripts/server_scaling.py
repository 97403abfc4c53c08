"""Does the server's memory and checkpoint time grow with the round's clients or with the federation?

Runs ``run_server`` (the ServerApp's loop: sampling, strategy, per-client store, results.json,
checkpoints, the final export of every client's adapter) against an in-process grid of N clients
that answer at once, with adapters shaped like LLaMA-7B's LoRA r 8 on q and v (32 blocks × 2
modules × (8×4096 + 4096×8) = 4.19 M float32 parameters, 16.8 MB) or any ``--adapter-params``.
Each N runs in a fresh process, so the peak RSS is that run's. The clients hold nothing between
messages (each asks for its adapter in full, ``missing-adapter``), so the process's memory is the
server's; a real client holds its own adapter and the round's second send does not happen.

    .venv/bin/python scripts/server_scaling.py --clients 10,100,1000 --fraction-train 0.1 \\
        --fraction-evaluate 0.1 --rounds 3 --out outputs/server-scaling

Writes scaling.json (every round of every N, the command, the settings) and scaling.md to --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedbilevel import protocol
from fedbilevel.config import RunConfig, resolve
from fedbilevel.testing import InProcessGrid

HIDDEN, RANK = 4096, 8  # LLaMA-7B's width, LoRA rank 8


def llama_like_adapter(params: int) -> dict[str, np.ndarray]:
    """θ⁰ with q and v LoRA modules of LLaMA-7B's shape, as many blocks as give about ``params`` values."""
    per_block = 2 * 2 * RANK * HIDDEN
    blocks = max(1, round(params / per_block))
    rng = np.random.default_rng(0)
    adapter = {}
    for block in range(blocks):
        for module in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{block}.self_attn.{module}"
            adapter[f"{prefix}.lora_A.weight"] = (0.01 * rng.standard_normal((RANK, HIDDEN))).astype(np.float32)
            adapter[f"{prefix}.lora_B.weight"] = np.zeros((HIDDEN, RANK), np.float32)
    return adapter


class _Client:
    """Answers at once: trains by a seeded random step; holds nothing between messages."""

    def __init__(self, partition_id: int, num_clients: int):
        self.partition_id, self.num_clients = partition_id, num_clients

    def handle(self, message: Message) -> Message:
        if message.metadata.message_type == MessageType.QUERY:
            info = {protocol.PARTITION_ID: self.partition_id, protocol.NUM_PARTITIONS: self.num_clients}
            info.update({protocol.TASK: f"task{self.partition_id % 4}", protocol.NUM_TRAIN: 48, protocol.NUM_TEST: 32})
            return Message(RecordDict({protocol.INFO: ConfigRecord(info)}), reply_to=message)
        metrics = {protocol.PARTITION_ID: self.partition_id}
        if protocol.ARRAYS not in message.content.array_records:
            metrics[protocol.MISSING_ADAPTER] = 1
            return Message(RecordDict({protocol.METRICS: MetricRecord(metrics)}), reply_to=message)
        now = time.time()
        metrics.update({protocol.NUM_EXAMPLES: 48, protocol.BUSY_KEYS[0]: now, protocol.BUSY_KEYS[1]: now})
        if message.metadata.message_type == MessageType.EVALUATE:
            metrics.update(dict.fromkeys(protocol.TEXT_METRICS, 0.5))
            return Message(RecordDict({protocol.METRICS: MetricRecord(metrics)}), reply_to=message)
        server_round = int(message.content.config_records[protocol.CONFIG][protocol.SERVER_ROUND])
        rng = np.random.default_rng([self.partition_id, server_round])
        received = protocol.record_to_adapter(message.content.array_records[protocol.ARRAYS])
        trained = {k: (v + np.float32(1e-3) * rng.standard_normal(v.shape, np.float32)) for k, v in received.items()}
        metrics[protocol.TRAIN_LOSS] = 1.0
        content = {protocol.ARRAYS: protocol.adapter_to_record(trained), protocol.METRICS: MetricRecord(metrics)}
        return Message(RecordDict(content), reply_to=message)


def run_one(args: argparse.Namespace, num_clients: int) -> dict:
    """This process runs ``args.strategy`` over ``num_clients`` clients; each round's record."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedbilevel import server

    # Messages take their run id from the task identity that Flower sets in a real run.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    initial = llama_like_adapter(args.adapter_params)
    # The server loop as it is, with the adapter of a model this machine cannot load.
    server.initial_adapter_arrays = lambda *_, **__: initial
    server.model_digest = lambda _name: "llama-like"
    server.save_adapter = lambda arrays, directory, *_: protocol.adapter_digest(arrays)  # read it, write nothing
    with tempfile.TemporaryDirectory(dir=args.scratch) as folder:
        config = RunConfig.from_run_config(
            resolve(
                {
                    "strategy": args.strategy,
                    "num-server-rounds": args.rounds,
                    "min-nodes": num_clients,
                    "fraction-train": args.fraction_train,
                    "fraction-evaluate": args.fraction_evaluate,
                    "output-dir": folder,
                    "run-name": "scaling",
                }
            )
        )
        started = time.time()
        run_dir = server.run_server(InProcessGrid({1 + p: _Client(p, num_clients) for p in range(num_clients)}), config)
        seconds = time.time() - started
        rounds = json.loads((run_dir / "results.json").read_text())["rounds"]
        store_mb = sum(f.stat().st_size for f in (run_dir / "store").rglob("*") if f.is_file()) / 2**20
    return {
        "clients": num_clients,
        "adapter-params": sum(a.size for a in initial.values()),
        "seconds": seconds,
        "store-mb": store_mb,
        "rounds": [
            {
                "round": r["round"],
                "trained": len(r["train"]),
                "seconds": r["seconds"],
                "seconds_checkpoint": r["seconds_checkpoint"],
                **r["server_memory_mb"],
            }
            for r in rounds
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="10,100,1000", help="federation sizes N, comma-separated")
    parser.add_argument("--adapter-params", type=float, default=4.2e6, help="parameters per adapter (LLaMA-like)")
    parser.add_argument("--fraction-train", type=float, default=0.1)
    parser.add_argument("--fraction-evaluate", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--strategy", default="fedbip")
    parser.add_argument("--scratch", default=None, help="folder for the runs' stores (default: the system's)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one N, print JSON
    args = parser.parse_args()
    args.adapter_params = int(args.adapter_params)
    if args.one:
        print("SCALING " + json.dumps(run_one(args, args.one)))
        return 0
    sizes = [int(n) for n in args.clients.split(",") if n.strip()]
    results = []
    for index, num_clients in enumerate(sizes):
        command = [sys.executable, __file__, *sys.argv[1:], "--one", str(num_clients)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("SCALING ")), None)
        if done.returncode != 0 or line is None:
            raise SystemExit(f"N={num_clients}: failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        results.append(json.loads(line.removeprefix("SCALING ")))
        last = results[-1]["rounds"][-1]
        print(
            f"[{index + 1}/{len(sizes)}] N={num_clients}: {results[-1]['seconds']:.0f} s, "
            f"peak RSS {last['peak-rss-mb']:.0f} MB, checkpoint {last['seconds_checkpoint']:.2f} s in round "
            f"{last['round']}",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "one"} | {"out": str(args.out)}
    (args.out / "scaling.json").write_text(json.dumps({"command": sys.argv, "settings": settings, "results": results}))
    adapter_mb = results[0]["adapter-params"] * 4 / 2**20
    lines = [
        "| N | trained a round | peak RSS (MB) | all N adapters would hold (MB) | checkpoint s/round (mean) "
        "| round s (mean) | store on disk (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        rounds = result["rounds"]
        lines.append(
            f"| {result['clients']} | {rounds[-1]['trained']} | {rounds[-1]['peak-rss-mb']:.0f} "
            f"| {result['clients'] * adapter_mb:.0f} | {np.mean([r['seconds_checkpoint'] for r in rounds]):.2f} "
            f"| {np.mean([r['seconds'] for r in rounds]):.1f} | {result['store-mb']:.0f} |"
        )
    (args.out / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
