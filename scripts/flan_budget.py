"""Local-training budget study on a flan-json federation: which budget learns which task?

Every client trains a fresh adapter alone (no federation) with each learning rate, and its
test items are scored at each step checkpoint with the shared train and eval loops: exact
match, ROUGE-1 and, for tasks whose instructions list options, option accuracy — next to
the most-common-answer baseline. A task whose score stays at that baseline is not learned
(the model learned the label prior); a budget for federated runs should learn most tasks.

    python scripts/flan_budget.py --data-path ../shared/data/flan8 --out outputs/flan-budget \\
        --learning-rates 3e-4,1e-3,3e-3 --checkpoints 20,60,120

Writes budget.json (every score, the command and the settings) and budget.md to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fedbilevel.client.evaluate import evaluate_adapter
from fedbilevel.client.metrics import answer_text, score_answers
from fedbilevel.client.train import TextCodec, train_adapter
from fedbilevel.data.common import most_common_answer
from fedbilevel.data.flan import load_flan_json
from fedbilevel.models.adapter import build_lora_model
from fedbilevel.models.settings import DEFAULT_MODEL, PRECISIONS, LoraSettings
from fedbilevel.models.zoo import load_tokenizer


def _numbers(text: str, kind: type, name: str, *, minimum: float = 0, strict: bool = True) -> list:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"{name}: {text!r} is not allowed; expected comma-separated numbers") from None
    if not values or any(v < minimum or (strict and v == minimum) for v in values):
        raise SystemExit(f"{name}: {text!r} is not allowed; expected numbers {'>' if strict else '>='} {minimum}")
    return values


def study_client(data, lr: float, checkpoints: list[int], args, device: torch.device) -> list[dict]:
    """Train one client's adapter alone at ``lr``; its scores at every checkpoint."""
    model = build_lora_model(args.model_name, LoraSettings(), seed=args.seed, precision=args.precision, device=device)
    tokenizer = load_tokenizer(args.model_name)
    rows, done = [], 0
    for checkpoint in checkpoints:
        started = time.perf_counter()
        train_adapter(
            model,
            TextCodec(tokenizer, args.max_seq_len),
            data.train,
            steps=checkpoint - done,
            batch_size=args.batch_size,
            learning_rate=lr,
            bf16_autocast=args.precision != "fp32",
            seed=args.seed + checkpoint,
            device=device,
        )
        train_seconds = time.perf_counter() - started
        done = checkpoint
        scores = evaluate_adapter(
            model,
            tokenizer,
            data.test,
            batch_size=args.eval_batch_size,
            max_new_tokens=args.eval_max_new_tokens,
            bf16_autocast=args.precision != "fp32",
            device=device,
        )
        row = {
            "task": data.task,
            "learning_rate": lr,
            "steps": checkpoint,
            "train_seconds": train_seconds,
            **{k: v for k, v in scores.items() if not k.startswith("items-")},
        }
        rows.append(row)
        print(
            f"{data.task}, lr {lr:g}, {checkpoint} steps: exact match {row['exact_match']:.3f}, "
            f"ROUGE-1 {row['rouge1']:.3f}, option accuracy {row.get('option_accuracy', float('nan')):.3f}",
            flush=True,
        )
    return rows


def markdown(rows: list[dict], majority: dict[str, float], checkpoints: list[int], header: str) -> str:
    lines = [
        header,
        "",
        "Exact match (option accuracy in brackets where the instruction lists options), by local steps:",
        "",
        "| task | majority | lr | " + " | ".join(f"{c} steps" for c in checkpoints) + " |",
        "|---|---|---|" + "---|" * len(checkpoints),
    ]
    keyed = {(r["task"], r["learning_rate"], r["steps"]): r for r in rows}
    for task in majority:
        for lr in sorted({r["learning_rate"] for r in rows}):
            cells = []
            for c in checkpoints:
                r = keyed.get((task, lr, c))
                if r is None:
                    cells.append("–")
                    continue
                option = f" ({r['option_accuracy']:.2f})" if "option_accuracy" in r else ""
                cells.append(f"{r['exact_match']:.2f}{option}")
            lines.append(f"| {task} | {majority[task]:.2f} | {lr:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", required=True, type=Path, help="flan-json folder (client_K.json, test.jsonl)")
    parser.add_argument("--out", required=True, type=Path, help="folder for budget.json and budget.md")
    parser.add_argument("--model-name", default=DEFAULT_MODEL, help=f"model (default: {DEFAULT_MODEL})")
    parser.add_argument("--learning-rates", default="3e-4,1e-3,3e-3", help="comma-separated (default: 3e-4,1e-3,3e-3)")
    parser.add_argument("--checkpoints", default="20,60,120", help="local steps at which to score (default: 20,60,120)")
    parser.add_argument("--clients", default="", help="comma-separated partition ids (default: all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument(
        "--max-test", type=int, default=40, help="test items per client (default: 40, as conf/flan8.toml)"
    )
    parser.add_argument("--eval-batch-size", type=int, default=20)
    parser.add_argument("--eval-max-new-tokens", type=int, default=32)
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    learning_rates = _numbers(args.learning_rates, float, "--learning-rates")
    checkpoints = sorted(set(_numbers(args.checkpoints, int, "--checkpoints")))
    num_clients = len(list(args.data_path.glob("client_*.json")))
    if not num_clients:
        raise SystemExit(
            f"--data-path: {str(args.data_path)!r} has no client_K.json files; expected a flan-json folder"
        )
    clients = _numbers(args.clients, int, "--clients", strict=False) if args.clients else list(range(num_clients))
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    datasets, majority = [], {}
    for partition_id in clients:
        data = load_flan_json(args.data_path, partition_id, num_clients, max_test=args.max_test, seed=args.seed)
        answer, _ = most_common_answer(data.train, key=answer_text)
        majority[data.task] = score_answers([answer] * len(data.test), [example.output for example in data.test])[
            "exact_match"
        ]
        datasets.append(data)
    started, rows = time.time(), []
    # Learning rate outermost and the tables rewritten after every client: a run cut short
    # still reports every task at the rates it finished.
    for lr in learning_rates:
        for data in datasets:
            rows.extend(study_client(data, lr, checkpoints, args, device))
            header = (
                f"Local training alone, {args.model_name}, LoRA r 8 on q,k,v,o, batch {args.batch_size}, "
                f"{args.max_seq_len} tokens, {args.max_test} test items per task, precision {args.precision}, "
                f"on {name}; {time.time() - started:.0f} s in all."
            )
            settings = {**vars(args), "data_path": str(args.data_path), "out": str(args.out)}
            (args.out / "budget.json").write_text(
                json.dumps({"command": sys.argv, "settings": settings, "majority": majority, "rows": rows}, indent=2)
            )
            table = markdown(rows, majority, checkpoints, header)
            (args.out / "budget.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
