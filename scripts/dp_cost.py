"""The training-time cost of each DP mode as a ratio to no DP, measured in one process (issue 19, item 3).

One client is built as the ClientApp builds it (:class:`fedbilevel.client.app.ClientSession`: the run
config, the client's data partition, the shared LoRA model and its codec), and its local training is
timed under ``dp = "none"``, ``"dp-sgd"`` and ``"update"`` exactly as the train handler runs it:
:class:`fedbilevel.client.privacy.ClientPrivacy` for the round (σ calibrated from ``dp-epsilon`` as a
client does), :func:`fedbilevel.client.train.train_adapter` with its ``DpSgd`` (``dp-sgd``), then
the trained adapter read back and, under ``update``, clipped and noised (``privatize_update``). Every
run starts from the same initial adapter with the same seeds (the DP randomness too, which a real
client draws from the OS: the cost is the same).

After one warm-up run of each mode (not counted), the modes run ``--repeats`` times, interleaved and
in a rotated order each repeat, so drift on a shared machine hits all modes alike. Same
``batch-size`` and ``--steps`` for every mode; ``dp-sgd`` draws its Poisson sample each step
(each example in with probability batch-size / examples: an *expected* batch of batch-size), so its
examples per step vary and are reported.

Per mode: the median seconds per step, the ratio to ``none`` (median of the per-repeat ratios, and
their range), the same ratio per example trained on, examples per step, and the resident memory the
run added over what the process held before it (Linux: the RSS high-water mark, reset before each
run through ``/proc/self/clear_refs``).

    .venv/bin/python scripts/dp_cost.py --model tiny-random-llama --steps 10 --repeats 3 --out /tmp/dp-cost.json
    .venv/bin/python scripts/dp_cost.py --model digits-vit --steps 10 --repeats 3   # data = digits
    .venv/bin/python scripts/dp_cost.py --run-config conf/digits.toml --set batch-size=8

Options other than the model, steps and repeats come from pyproject.toml, then ``--run-config``
TOML files, then ``--set key=value`` pairs (TOML values).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import opacus
import torch
from flwr.app import Context, RecordDict

from fedbilevel import protocol
from fedbilevel.client.app import ClientSession, _model, _seed
from fedbilevel.client.privacy import ClientPrivacy
from fedbilevel.client.train import train_adapter
from fedbilevel.config import resolve
from fedbilevel.models.adapter import get_adapter_arrays, initial_adapter_arrays, set_adapter_arrays
from fedbilevel.models.zoo import TINY_MODEL, is_image_classifier
from fedbilevel.resources import process_memory_mb

MODES = ("none", "dp-sgd", "update")
BASELINE = "none"
SAMPLING_NOTE = (
    "Same batch-size and steps for every mode; dp-sgd draws a Poisson sample each step (each example in with "
    "probability q = batch-size / examples, so the expected batch is batch-size and the drawn one varies: see "
    "examples/step)."
)


# ---------------------------------------------------------------- pure helpers (tested on made-up timings)


def rotated(modes: Sequence[str], repeat: int) -> list[str]:
    """The order of ``modes`` in repeat ``repeat``: rotated by one each repeat, so none always runs first."""
    shift = repeat % len(modes)
    return [*modes[shift:], *modes[:shift]]


def summarize(repeats: Sequence[Mapping[str, Mapping[str, float]]], *, steps: int) -> list[dict[str, Any]]:
    """One row per mode from the timed repeats.

    Parameters
    ----------
    repeats : sequence of mapping
        One per repeat: mode -> that run's ``seconds`` (and optionally ``examples``, the examples
        trained on in all, and ``added_mb``, the memory the run added).
    steps : int
        Optimizer steps per run.

    Returns
    -------
    list of dict
        In the modes' first-seen order (the baseline first if present): ``mode``, ``seconds_per_step``
        (median), ``ratio`` (median of the per-repeat ratios to the baseline's run of the same repeat;
        None without a baseline), ``ratio_min``/``ratio_max``, ``ratio_per_example`` (the same per example
        trained on), ``examples_per_step`` (mean) and
        ``added_mb`` (median), the last two None where not given.
    """
    if not repeats:
        raise ValueError("repeats: expected at least one timed repeat")
    if steps < 1:
        raise ValueError(f"steps: {steps} is not allowed; expected at least 1")
    modes = list(dict.fromkeys(mode for repeat in repeats for mode in repeat))
    if BASELINE in modes:
        modes.remove(BASELINE)
        modes.insert(0, BASELINE)
    rows = []
    for mode in modes:
        runs = [repeat[mode] for repeat in repeats if mode in repeat]
        ratios = [
            repeat[mode]["seconds"] / repeat[BASELINE]["seconds"]
            for repeat in repeats
            if mode in repeat and BASELINE in repeat and repeat[BASELINE]["seconds"] > 0
        ]
        per_example = [  # the same, per example trained on (dp-sgd's Poisson batches vary)
            (repeat[mode]["seconds"] / repeat[mode]["examples"])
            / (repeat[BASELINE]["seconds"] / repeat[BASELINE]["examples"])
            for repeat in repeats
            if mode in repeat
            and BASELINE in repeat
            and repeat[BASELINE]["seconds"] > 0
            and repeat[mode].get("examples")
            and repeat[BASELINE].get("examples")
        ]
        examples = [run["examples"] for run in runs if run.get("examples") is not None]
        added = [run["added_mb"] for run in runs if run.get("added_mb") is not None]
        rows.append(
            {
                "mode": mode,
                "runs": len(runs),
                "seconds_per_step": statistics.median(run["seconds"] for run in runs) / steps,
                "ratio": statistics.median(ratios) if ratios else None,
                "ratio_min": min(ratios) if ratios else None,
                "ratio_max": max(ratios) if ratios else None,
                "ratio_per_example": statistics.median(per_example) if per_example else None,
                "examples_per_step": statistics.fmean(examples) / steps if examples else None,
                "added_mb": statistics.median(added) if added else None,
            }
        )
    return rows


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows of :func:`summarize` as a markdown table."""

    def number(value: float | None, form: str) -> str:
        return "–" if value is None else format(value, form)

    lines = [
        "| dp | s/step (median) | × none (median) | × none (range) | × none per example | examples/step "
        "| RSS added (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        spread = "–" if row["ratio_min"] is None else f"{row['ratio_min']:.2f}–{row['ratio_max']:.2f}"
        lines.append(
            f"| {row['mode']} | {row['seconds_per_step']:.4f} | {number(row['ratio'], '.2f')} | {spread} "
            f"| {number(row['ratio_per_example'], '.2f')} | {number(row['examples_per_step'], '.1f')} "
            f"| {number(row['added_mb'], '.0f')} |"
        )
    return "\n".join(lines)


def parse_set(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs with TOML values (a bare word is a string)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--set: {pair!r} is not allowed; expected key=value")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value
    return out


# ---------------------------------------------------------------- the client, as the ClientApp builds it


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark to its RSS now (Linux ≥ 4.0); whether it could."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class CountingCodec:
    """The client's codec, counting the examples it collates (the examples trained on)."""

    def __init__(self, codec) -> None:
        self.codec = codec
        self.examples = 0

    def encode(self, examples):
        return self.codec.encode(examples)

    def collate(self, items):
        self.examples += len(items)
        return self.codec.collate(items)


class Client:
    """One client of the federation: a ClientSession per DP mode over the same data and model."""

    def __init__(self, run_config: Mapping[str, Any], *, partition_id: int, num_partitions: int, steps: int):
        self.sessions = {}
        for mode in MODES:
            context = Context(
                run_id=1,
                node_id=100 + partition_id,
                node_config={"partition-id": partition_id, "num-partitions": num_partitions},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            self.sessions[mode] = ClientSession(context, {"dp": mode, "local-steps": steps})
        session = self.sessions[BASELINE]
        self.config = session.config
        # The ClientApp's model: built once per process (cached), shared by every message.
        self.model, self.tokenizer = _model(self.config.model, self.config.lora)
        self.initial = initial_adapter_arrays(self.config.model.name, self.config.lora, seed=self.config.seed)
        self.seed = _seed(self.config, session.partition_id, 1)
        self.privacy = {}
        for mode in MODES:  # the round's mechanism (σ calibrated once, cached) as the train handler finds it
            config = self.sessions[mode].config
            self.privacy[mode] = ClientPrivacy.for_message(
                config,
                num_examples=len(session.data.train),
                num_clients=session.num_partitions,
                state=RecordDict(),
                declared={},
                seed=self.seed,
            )

    def describe(self) -> dict[str, Any]:
        session, train = self.sessions[BASELINE], self.config.train
        out = {
            "model": self.config.model.name,
            "data": self.config.data.source,
            "task": session.data.task,
            "partition_id": session.partition_id,
            "num_partitions": session.num_partitions,
            "train_examples": len(session.data.train),
            "batch_size": train.batch_size,
            "gradient_accumulation_steps": train.gradient_accumulation_steps,
            "max_seq_len": train.max_seq_len,
            "learning_rate": train.learning_rate,
            "optimizer": train.optimizer,
            "momentum": train.momentum,
            "precision": self.config.model.precision,
            "bf16_compute": self.config.model.bf16_compute,
            "lora_r": self.config.lora.r,
            "trainable_parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            "device": str(self.model.device),
            "torch_threads": torch.get_num_threads(),
            "seed": self.seed,
        }
        for mode in MODES[1:]:
            privacy = self.privacy[mode]
            out[mode] = {
                "noise_multiplier": privacy.mechanism.noise_multiplier,
                "sample_rate": privacy.mechanism.sample_rate,
                "max_grad_norm": privacy.settings.max_grad_norm,
                "epsilon": privacy.settings.epsilon,
                "delta": privacy.settings.delta,
            }
        return out

    def run(self, mode: str, steps: int) -> dict[str, float | None]:
        """One round's local training under ``mode``, as the train handler runs it; its timings."""
        session = self.sessions[mode]
        config, settings = session.config, session.config.train
        set_adapter_arrays(self.model, self.initial)  # every run starts from the same adapter
        codec = CountingCodec(session.codec(self.tokenizer))
        measured = reset_peak_rss()
        before = process_memory_mb()
        started = time.perf_counter()
        privacy = ClientPrivacy.for_message(  # the round's DP, as the train handler finds it (a fresh account)
            config,
            num_examples=len(session.data.train),
            num_clients=session.num_partitions,
            state=RecordDict(),
            declared={},
            seed=self.seed,
        )
        if privacy is not None and privacy.exhausted:
            raise SystemExit(f"dp={mode}: one round already exceeds dp-epsilon ({privacy.describe()})")
        result = train_adapter(
            self.model,
            codec,
            session.data.train,
            steps=steps,
            bf16_autocast=config.model.bf16_compute,
            device=self.model.device,
            seed=self.seed,
            dp_sgd=privacy.dp_sgd() if privacy is not None else None,
            **settings.loop_options(),
        )
        trained_at = time.perf_counter()
        trained = get_adapter_arrays(self.model)
        if privacy is not None:  # dp = "update": the clipped, noised update (dp-sgd: the adapter as trained)
            trained = privacy.release(self.initial, trained, names=list(trained))
        ended = time.perf_counter()
        after = process_memory_mb()
        added = None
        if measured and after and before:  # the high-water mark is sampled by the kernel: never below 0
            added = max(0.0, after[protocol.PEAK_RSS_MB] - before[protocol.RSS_MB])
        return {
            "seconds": ended - started,
            "train_seconds": trained_at - started,
            "release_seconds": ended - trained_at,
            "examples": codec.examples,
            "loss": result.loss,
            "added_mb": added,
        }


def machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help=f"model-name (default: a --run-config's, else {TINY_MODEL})")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per timed run (default 10)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each mode, interleaved (default 3)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="steps of each mode's warm-up run (default 2)")
    parser.add_argument("--partition-id", type=int, default=0, help="the client timed (default 0)")
    parser.add_argument("--num-partitions", type=int, default=8, help="the federation's clients (default 8)")
    parser.add_argument("--run-config", action="append", default=[], type=Path, help="a TOML of run-config keys")
    parser.add_argument("--set", action="append", default=[], help="a run-config key=value (TOML value)")
    parser.add_argument("--out", type=Path, help="write the table, command, machine and settings here (JSON)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.warmup_steps < 0:
        raise SystemExit("--steps and --repeats: expected at least 1; --warmup-steps: at least 0")
    files = {key: value for path in args.run_config for key, value in tomllib.loads(path.read_text()).items()}
    overrides = parse_set(args.set)
    # --model, else a --run-config's model-name, else the tiny model (not pyproject's default).
    model = args.model or overrides.get("model-name") or files.get("model-name") or TINY_MODEL
    overrides["model-name"] = model
    if is_image_classifier(model) and "data" not in {**files, **overrides}:
        overrides["data"] = "digits"  # the offline image federation
    run_config = resolve(overrides, args.run_config)
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["dp_cost.py", *argv])

    loading = time.perf_counter()
    client = Client(run_config, partition_id=args.partition_id, num_partitions=args.num_partitions, steps=args.steps)
    settings = client.describe()
    print(
        f"{settings['model']} on {settings['device']} ({settings['torch_threads']} torch threads), "
        f"client {settings['partition_id']} ({settings['task']}, {settings['train_examples']} examples), "
        f"batch {settings['batch_size']}, {settings['trainable_parameters']:,} trainable parameters; "
        f"dp-sgd σ {settings['dp-sgd']['noise_multiplier']:.3g} q {settings['dp-sgd']['sample_rate']:.3g}, "
        f"update σ {settings['update']['noise_multiplier']:.3g}; built in {time.perf_counter() - loading:.1f} s",
        flush=True,
    )
    if args.warmup_steps:
        for mode in MODES:
            run = client.run(mode, args.warmup_steps)
            print(f"[warm-up] {mode}: {args.warmup_steps} steps in {run['seconds']:.2f} s", flush=True)
    repeats = []
    for repeat in range(args.repeats):
        timed = {}
        for mode in rotated(MODES, repeat):
            timed[mode] = run = client.run(mode, args.steps)
            added = "" if run["added_mb"] is None else f", RSS +{run['added_mb']:.0f} MB"
            print(
                f"[{repeat + 1}/{args.repeats}] {mode}: {args.steps} steps in {run['seconds']:.2f} s "
                f"({run['seconds'] / args.steps:.4f} s/step, {run['examples'] / args.steps:.1f} examples/step, "
                f"release {run['release_seconds'] * 1000:.1f} ms{added})",
                flush=True,
            )
        repeats.append(timed)
    rows = summarize(repeats, steps=args.steps)
    table = markdown_table(rows)
    print(f"\n{table}\n\n{SAMPLING_NOTE}")
    report = {
        "command": command,
        "machine": machine(),
        "settings": {
            **settings,
            "steps": args.steps,
            "repeats": args.repeats,
            "warmup_steps": args.warmup_steps,
            "order": "interleaved, rotated by one mode each repeat",
            "sampling": SAMPLING_NOTE,
        },
        "table": rows,
        "markdown": table,
        "runs": repeats,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
