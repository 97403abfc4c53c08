"""Compare strategies × seeds on one federation and budget, in simulation.

Every run uses the same run config except ``strategy`` and ``seed``. Runs go one after
another, each in a fresh process (``python -m fedbilevel.simulation``), into
``<out>/runs/<label>-seed<k>/`` (``<label>``: the strategy, or its ``--variants`` table) with its log
beside it; a finished run with the same config is reused, so an interrupted comparison continues where
it stopped. Then:

    <out>/comparison.csv, per_client.csv, comparison.md     tables (mean ± std over seeds)
    <out>/scores_per_round.png, per_client.png, similarity_<label>.png, cross_task_<label>.png (eval-cross)
    <out>/separation.csv, separation.png                     with task groups (clients-per-task > 1) and
                                                             similarity/weight matrices: same- vs cross-task
                                                             cosine, its AUROC, weight on same-task partners

Example (the synthetic comparison in docs/BENCHMARKS.md):

    .venv/bin/python scripts/compare.py --strategies fedavg,local,fedprox,fedamp,fedala,fedbip,fedbip-l \\
        --seeds 0,1 --out outputs/compare-synthetic

``--variants FILE.toml`` adds labelled variants, one TOML table each (a label and its
run-config overrides, e.g. ``[softmax-t0.05]`` with ``strategy = "fedbip"``,
``weighting = "softmax"``, ``weighting-temperature = 0.05``): an ablation is a
comparison of variants (conf/ablation-weighting.toml). ``--labels a,b`` runs only those tables
of the file (e.g. one arm of an ablation on more seeds).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fedbilevel.comparison import load_run, markdown, write_plots, write_tables
from fedbilevel.config import ConfigError, RunConfig, parse_assignment, resolve, saved_run_config
from fedbilevel.strategies import strategy_names

POLL_S = 2.0


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"


def _names(text: str, allowed: tuple[str, ...] | None, what: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if allowed is not None and n not in allowed]
    if not names or unknown:
        raise SystemExit(
            f"--{what}: {unknown[0] if unknown else text!r} is not allowed; choose from {', '.join(allowed or ())}"
        )
    return names


def _variants(path: Path, labels: str | None = None) -> list[tuple[str, dict]]:
    """The [label] tables of ``path`` in file order; only those named in ``labels`` (comma-separated) if given."""
    import tomllib

    with path.open("rb") as handle:
        tables = tomllib.load(handle)
    bad = [
        label
        for label, table in tables.items()
        if not isinstance(table, dict)
        or any(isinstance(v, dict) for v in table.values())
        or not re.fullmatch(r"[A-Za-z0-9_.+-]+", label)
    ]
    if not tables or bad:
        raise SystemExit(
            f"--variants {path}: {bad[0] if bad else 'no tables'!r} is not allowed; expected [label] tables "
            '(letters, digits, . _ + -; quote a label with dots: ["t0.1"]) of run-config overrides'
        )
    if labels is None:
        return list(tables.items())
    chosen = _names(labels, tuple(tables), "labels")
    return [(label, table) for label, table in tables.items() if label in chosen]


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds: {text!r} is not allowed; expected distinct integers ≥ 0, e.g. 0,1,2")
    return seeds


def _rounds_done(run_dir: Path) -> list[dict]:
    try:
        return json.loads((run_dir / "results.json").read_text())["rounds"]
    except (OSError, ValueError, KeyError):
        return []


def _config_differences(saved: dict, wanted: dict) -> list[str]:
    """The keys on which a saved run's config (a key it lacks counts as its default, ``saved_run_config``)
    and the wanted one disagree."""
    full = saved_run_config(saved)
    return sorted(key for key in full.keys() | wanted.keys() if full.get(key) != wanted.get(key))


def _check_federation_size(out: Path, num_clients: int) -> None:
    """Refuse ``--num-clients`` other than the one the folder's runs had (recorded in its compare.json):
    the run configs do not hold it, so finished runs of another federation would be reused silently."""
    record = out / "compare.json"
    before = json.loads(record.read_text()).get("num_clients") if record.exists() else None
    if before is not None and before != num_clients and (out / "runs").exists():
        raise SystemExit(
            f"--num-clients {num_clients}: {out} holds runs of {before} clients ({record}); "
            f"use --num-clients {before}, or another --out"
        )


def _is_complete(run_dir: Path, config: dict) -> bool:
    """A finished run of exactly this config (an unfinished one is removed, a different one is an error)."""
    if not run_dir.exists():
        return False
    saved = (
        json.loads((run_dir / "config.json").read_text())["run_config"] if (run_dir / "config.json").exists() else None
    )
    if saved is not None:
        wanted = RunConfig.from_run_config(config).to_run_config()
        differences = _config_differences(saved, wanted)
        if differences:
            key = differences[0]
            raise SystemExit(
                f"{run_dir} holds a run with a different config ({len(differences)} key(s), e.g. {key!r}: "
                f"{saved.get(key, '(absent)')!r} there, {wanted.get(key, '(absent)')!r} now); "
                "use another --out or --force"
            )
    if (
        saved is not None
        and len(_rounds_done(run_dir)) == config["num-server-rounds"]
        and (run_dir / "clients").exists()
    ):
        return True
    print(f"removing the unfinished run {run_dir}", flush=True)
    shutil.rmtree(run_dir)
    return False


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument(
        "--strategies", help="comma-separated (default: all registered, or none when --variants is given)"
    )
    parser.add_argument(
        "--variants", type=Path, metavar="FILE.toml", help="labelled variants: [label] tables of run-config overrides"
    )
    parser.add_argument("--labels", metavar="LABELS", help="comma-separated: only these tables of --variants")
    parser.add_argument("--seeds", default="0", help="comma-separated run seeds (default: 0)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--run-config", action="append", default=[], metavar="FILE.toml", help="run-config file(s) applied to every run"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="run-config override for every run (repeatable)"
    )
    parser.add_argument("--num-clients", type=int, default=8, help="simulated SuperNodes = clients (default: 8)")
    parser.add_argument("--cpus-per-client", type=float, default=1.0, help="Ray CPUs per client (default: 1)")
    parser.add_argument(
        "--faulty-clients",
        default="",
        metavar="IDS",
        help="robustness: these partition ids send random updates (see python -m fedbilevel.simulation -h)",
    )
    parser.add_argument(
        "--faulty-scale", type=float, default=10.0, help="norm of a faulty update / the real one's (default: 10)"
    )
    parser.add_argument(
        "--absent-clients",
        default="",
        metavar="IDS",
        help="robustness: these partition ids fail every training round (the reference for --faulty-clients)",
    )
    parser.add_argument("--force", action="store_true", help="rerun runs that already finished")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only rebuild tables and plots from the runs of the plan that finished",
    )
    args = parser.parse_args()

    variants = (
        [(name, {"strategy": name}) for name in _names(args.strategies, strategy_names(), "strategies")]
        if args.strategies
        else []
    )
    if args.labels and not args.variants:
        raise SystemExit("--labels: not allowed without --variants (it picks tables of that file)")
    if args.variants:
        variants += _variants(args.variants, args.labels)
    elif not args.strategies:
        variants = [(name, {"strategy": name}) for name in strategy_names()]
    labels = [label for label, _ in variants]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"variant labels must be distinct; got {', '.join(labels)}")
    seeds = _seeds(args.seeds)
    overrides = dict(parse_assignment(a) for a in args.set)
    for key in ("strategy", "seed", "output-dir", "run-name"):
        if key in overrides or any(key in variant and key != "strategy" for _, variant in variants):
            raise SystemExit(
                f"{key}: not allowed in --set or variants; "
                "compare.py sets it for every run (use --strategies / --seeds / --out)"
            )
    out = args.out.resolve()
    runs_dir = out / "runs"
    plan = []
    try:
        for label, variant in variants:
            for seed in seeds:
                name = f"{label}-seed{seed}"
                config = resolve(
                    {**overrides, **variant, "seed": seed, "output-dir": str(runs_dir), "run-name": name},
                    args.run_config,
                )
                plan.append((label, name, config))
    except ConfigError as error:
        raise SystemExit(str(error)) from None
    rounds = plan[0][2]["num-server-rounds"]
    _check_federation_size(out, args.num_clients)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(
        json.dumps(
            {
                "command": sys.argv,
                "variants": dict(variants),
                "seeds": seeds,
                "num_clients": args.num_clients,
                "run_configs": {n: c for _, n, c in plan},
            },
            indent=2,
        )
    )

    started, round_seconds = time.time(), []
    if not args.report_only:
        todo = []
        for _, name, config in plan:
            if args.force and (runs_dir / name).exists():
                shutil.rmtree(runs_dir / name)
            if _is_complete(runs_dir / name, config):
                print(f"{name}: finished earlier, reused", flush=True)
            else:
                todo.append((name, config))
        print(
            f"{len(todo)} of {len(plan)} runs to do ({rounds} rounds each, {args.num_clients} clients); "
            f"logs in {runs_dir}",
            flush=True,
        )
        for index, (name, config) in enumerate(todo, start=1):
            runs_dir.mkdir(parents=True, exist_ok=True)
            (runs_dir / f"{name}.config.json").write_text(json.dumps(config, indent=2))
            command = [
                sys.executable,
                "-m",
                "fedbilevel.simulation",
                "--config-json",
                str(runs_dir / f"{name}.config.json"),
                "--num-supernodes",
                str(args.num_clients),
                "--cpus-per-client",
                str(args.cpus_per_client),
                "--faulty-clients",
                args.faulty_clients,
                "--faulty-scale",
                str(args.faulty_scale),
                "--absent-clients",
                args.absent_clients,
            ]
            run_started, seen = time.time(), 0
            with (runs_dir / f"{name}.log").open("w") as log:
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
                while process.poll() is None or seen < len(_rounds_done(runs_dir / name)):
                    time.sleep(POLL_S if process.poll() is None else 0)
                    done = _rounds_done(runs_dir / name)
                    for record in done[seen:]:
                        round_seconds.append(record["seconds"])
                        remaining = (len(todo) - index) * rounds + rounds - record["round"]
                        mean = record.get("personalized_mean")
                        score = ", ".join(f"{k} {v:.3f}" for k, v in mean.items()) if mean else "not evaluated"
                        print(
                            f"[{index}/{len(todo)}] {name}: round {record['round']}/{rounds} "
                            f"in {record['seconds']:.0f} s "
                            f"({len(record['failures'])} failures); {score}; "
                            f"ETA {_duration(remaining * sum(round_seconds) / len(round_seconds))}",
                            flush=True,
                        )
                    seen = len(done)
            if process.returncode != 0 or seen != rounds:
                raise SystemExit(
                    f"{name} failed (exit code {process.returncode}, {seen}/{rounds} rounds); "
                    f"see {runs_dir / f'{name}.log'}"
                )
            print(f"[{index}/{len(todo)}] {name} finished in {_duration(time.time() - run_started)}", flush=True)

    finished = [
        (label, name)
        for label, name, config in plan
        if len(_rounds_done(runs_dir / name)) == config["num-server-rounds"]
    ]
    missing = [name for _, name, _ in plan if name not in {n for _, n in finished}]
    if missing:  # only with --report-only: a run that fails stops the comparison above
        print(f"not finished, left out of the report: {', '.join(missing)}", flush=True)
    if not finished:
        raise SystemExit(f"no finished runs in {runs_dir}")
    runs = [load_run(runs_dir / name, label) for label, name in finished]
    paths = write_tables(runs, out) + write_plots(runs, out)
    print(markdown(runs))
    print(f"{len(runs)} runs in {_duration(time.time() - started)}; wrote:\n  " + "\n  ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
