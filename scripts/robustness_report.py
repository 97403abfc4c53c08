"""Faulty-client robustness: the other clients' final score with a client honest, faulty or absent.

Reads finished runs (folders written by scripts/compare.py) for each condition, pairs them by
strategy and seed, and writes robustness.md / robustness.csv: the mean last-round score of the
other clients, and of the other clients that do not share a task with the faulty one, per
condition, with the paired differences. Make the runs with compare.py, e.g.

    python scripts/compare.py --strategies fedbip,fedavg --seeds 0,1 --faulty-clients 7 --out outputs/robustness/faulty
    python scripts/compare.py --strategies fedbip,fedavg --seeds 0,1 --absent-clients 7 --out outputs/robustness/absent
    python scripts/compare.py --strategies fedbip,fedavg --seeds 0,1 --out outputs/robustness/honest
    python scripts/robustness_report.py --faulty-clients 7 --out outputs/robustness \\
        --condition honest=outputs/robustness/honest --condition faulty=outputs/robustness/faulty \\
        --condition absent=outputs/robustness/absent

A condition may list several compare.py folders, comma-separated.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from fedbilevel.comparison import load_run, robustness_rows


def _condition(text: str) -> tuple[str, list[Path]]:
    label, sep, folders = text.partition("=")
    if not sep or not label or not folders:
        raise argparse.ArgumentTypeError(f"--condition: {text!r} is not allowed; expected LABEL=FOLDER[,FOLDER...]")
    return label, [Path(f) for f in folders.split(",") if f]


def _cell(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument(
        "--condition",
        action="append",
        type=_condition,
        required=True,
        metavar="LABEL=FOLDER[,FOLDER]",
        help="compare.py output folder(s) of one condition (repeatable; the first is the reference)",
    )
    parser.add_argument(
        "--faulty-clients", required=True, help="comma-separated partition ids of the faulty (or absent) clients"
    )
    parser.add_argument("--metric", default="exact_match", help="score to report (default: exact_match)")
    parser.add_argument("--out", type=Path, required=True, help="folder for robustness.md and robustness.csv")
    args = parser.parse_args()
    try:
        faulty = [int(c) for c in args.faulty_clients.split(",") if c.strip()]
    except ValueError:
        parser.error(
            f"--faulty-clients: {args.faulty_clients!r} is not allowed; expected comma-separated partition ids"
        )
    conditions = {}
    for label, folders in args.condition:
        runs_dirs = [folder / "runs" for folder in folders]
        missing = [str(d) for d in runs_dirs if not d.is_dir()]
        if missing:
            parser.error(f"--condition {label}: {missing[0]} is not a folder; expected scripts/compare.py output")
        conditions[label] = [
            load_run(run) for d in runs_dirs for run in sorted(d.iterdir()) if (run / "results.json").is_file()
        ]
    rows = robustness_rows(conditions, faulty, args.metric)
    labels = list(conditions)
    reference = labels[0]
    differences = labels[1:]
    header = ["strategy", "seed", "clients", *labels, *(f"{label} − {reference}" for label in differences)]
    lines = [
        f"Final {args.metric} of the other clients (faulty: client {', '.join(map(str, faulty))}); "
        f"*others, other tasks* also leaves out the faulty client's task partners.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    table = []
    for row in rows:
        deltas = [
            None if row[label] is None or row[reference] is None else row[label] - row[reference]
            for label in differences
        ]
        cells = [
            row["strategy"],
            str(row["seed"]),
            row["clients"],
            *map(_cell, (row[label] for label in labels)),
            *("–" if d is None else f"{d:+.3f}" for d in deltas),
        ]
        lines.append("| " + " | ".join(cells) + " |")
        table.append(
            dict(
                zip(header, [row["strategy"], row["seed"], row["clients"], *(row[label] for label in labels), *deltas])
            )
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "robustness.md").write_text("\n".join(lines) + "\n")
    with (args.out / "robustness.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(table)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
