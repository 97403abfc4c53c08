"""Round time as the federation grows and the round's clients do not: `flwr run` at several N.

Runs ``scripts/flwr_run.sh`` (a private SuperLink in simulation mode, N SuperNodes) once per
federation size N with ``fraction-train`` = ``fraction-evaluate`` = k / N, so that about k clients
train and evaluate each round whatever N is, and tabulates each run's mean round time and its split
(client training, client evaluation, aggregation, Flower's overhead) from results.json. Round 1
(Ray starting its workers, every node's partition query) is reported apart.

    .venv/bin/python scripts/round_time.py --clients 8,32,100 --per-round 8 --rounds 4 \\
        --out outputs/round-time

Extra ``--set key=value`` pairs go to the run config (e.g. ``--set local-steps=5``). Writes
round_time.json and round_time.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SPLIT = ("client_train", "client_evaluate", "aggregation", "other")


def run(num_clients: int, args: argparse.Namespace) -> dict:
    fraction = min(1.0, args.per_round / num_clients)
    name = f"n{num_clients}"
    settings = {
        "model-name": "'tiny-random-llama'",
        "num-server-rounds": args.rounds,
        "fraction-train": fraction,
        "fraction-evaluate": fraction,
        "min-train-nodes": 2,
        "output-dir": f"'{args.out.resolve() / 'runs'}'",
        "run-name": f"'{name}'",
        **dict(pair.split("=", 1) for pair in args.set),
    }
    run_config = " ".join(f"{key}={value}" for key, value in settings.items())
    environment = {**os.environ, "FEDBILEVEL_NUM_SUPERNODES": str(num_clients)}
    log = args.out / "runs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(log, "w") as handle:
        done = subprocess.run(
            ["bash", str(ROOT / "scripts/flwr_run.sh"), "--run-config", run_config],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=environment,
            check=False,
        )
    if done.returncode != 0:
        raise SystemExit(f"N={num_clients}: flwr run failed (exit {done.returncode}); see {log}")
    rounds = json.loads((args.out / "runs" / name / "results.json").read_text())["rounds"]
    return {
        "clients": num_clients,
        "fraction": fraction,
        "wall_seconds": time.time() - started,
        "rounds": [
            {
                "round": r["round"],
                "trained": len(r["train"]),
                "evaluated": len(r["eval"]),
                "seconds": r["seconds"],
                **r["time_split"],
            }
            for r in rounds
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="8,32,100", help="federation sizes N, comma-separated")
    parser.add_argument("--per-round", type=int, default=8, help="clients that train (and evaluate) a round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], help="extra run-config key=value (TOML value)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.rounds < 2:
        raise SystemExit(f"--rounds: {args.rounds} is not allowed; expected at least 2 (round 1 is reported apart)")
    sizes = [int(n) for n in args.clients.split(",") if n.strip()]
    results = []
    for index, num_clients in enumerate(sizes):
        results.append(run(num_clients, args))
        later = results[-1]["rounds"][1:]
        print(
            f"[{index + 1}/{len(sizes)}] N={num_clients}: {results[-1]['wall_seconds']:.0f} s in all, "
            f"round 1 {results[-1]['rounds'][0]['seconds']:.1f} s, later rounds "
            f"{np.mean([r['seconds'] for r in later]):.1f} s",
            flush=True,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "round_time.json").write_text(json.dumps({"command": sys.argv, "results": results}, indent=1))
    lines = [
        "| N | trained / evaluated a round | round 1 (s) | later rounds (s) | clients training | clients evaluating "
        "| aggregation | other (Flower) | `flwr run` in all (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        first, later = result["rounds"][0], result["rounds"][1:]
        mean = {key: float(np.mean([r[key] for r in later])) for key in ("seconds", *SPLIT)}
        lines.append(
            f"| {result['clients']} | {later[-1]['trained']} / {later[-1]['evaluated']} | {first['seconds']:.1f} "
            f"| {mean['seconds']:.1f} | {mean['client_train']:.1f} | {mean['client_evaluate']:.1f} "
            f"| {mean['aggregation']:.2f} | {mean['other']:.1f} ({100 * mean['other'] / mean['seconds']:.0f}%) "
            f"| {result['wall_seconds']:.0f} |"
        )
    (args.out / "round_time.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
