"""ServerApp logic: read the run config, build the strategy by name, run, record results."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fedbilevel import logs, privacy, protocol
from fedbilevel.checkpoint import STORE, load_checkpoint, save_checkpoint
from fedbilevel.comparison import plot_cross_task
from fedbilevel.config import RESUMABLE_KEYS, ConfigError, RunConfig, saved_run_config
from fedbilevel.models.adapter import initial_adapter_arrays, save_adapter
from fedbilevel.models.zoo import model_digest
from fedbilevel.options import resolve_user_path
from fedbilevel.results import RunRecorder, make_run_dir, package_versions
from fedbilevel.strategies import build_strategy
from fedbilevel.tracking import make_tracker


def _resume_point(config: RunConfig) -> tuple[Path, dict, dict]:
    """The run folder, the checkpoint record to continue from, and the run's config.json; the run
    config must match the run's."""
    run_dir = resolve_user_path(config.resume_from)
    meta = load_checkpoint(run_dir)
    record = json.loads((run_dir / "config.json").read_text())
    saved = saved_run_config(record["run_config"])
    for key, value in config.to_run_config().items():
        if key not in RESUMABLE_KEYS and saved[key] != value:
            was = "" if key in record["run_config"] else " (its default: the run predates the key)"
            raise ConfigError(
                f"run-config key '{key}': value {value!r} differs from the resumed run's {saved[key]!r}{was}; "
                f"a resumed run may only change {', '.join(sorted(RESUMABLE_KEYS))}"
            )
    sensitivity = meta.get("privacy_update_sensitivity")
    if config.privacy.mode == "update" and meta.get("privacy") and sensitivity != privacy.UPDATE_SENSITIVITY:
        raise ConfigError(
            f"run-config key 'resume-from': {str(run_dir)!r} noised its dp='update' rounds at sensitivity "
            f"{sensitivity or 1.0:g}·C, and this version accounts for {privacy.UPDATE_SENSITIVITY:g}·C, so their ε "
            "would be under-counted; start a new run"
        )
    if meta["round"] >= config.num_server_rounds:
        raise ConfigError(
            f"run-config key 'num-server-rounds': value {config.num_server_rounds} is not allowed; "
            f"the run in {run_dir} already completed round {meta['round']} (raise it to continue)"
        )
    return run_dir, meta, record


def check_same_experiment(saved: Mapping[str, Any], experiment: Mapping[str, str]) -> None:
    """Refuse to resume when anything earlier rounds depend on besides the run config has changed:
    a package version, the base model's files, the initial adapter (the clients' data is checked
    when they report it, :class:`~fedbilevel.strategies.base.PersonalizedStrategy`). ``saved`` is
    the resumed run's config.json."""
    for name, version in package_versions().items():
        if name in saved.get("versions", {}) and saved["versions"][name] != version:
            raise ConfigError(
                f"package '{name}': version {version} differs from the resumed run's {saved['versions'][name]}; "
                "a resumed run must be the same experiment (install that version or start a new run)"
            )
    for what, value in experiment.items():
        if what in saved.get("experiment", {}) and saved["experiment"][what] != value:
            raise ConfigError(
                f"{what.replace('_', ' ')}: digest {value} differs from the resumed run's {saved['experiment'][what]}; "
                "a resumed run must be the same experiment (restore it or start a new run)"
            )


def run_server(grid: Grid, config: RunConfig) -> Path:
    """Run ``config.num_server_rounds`` rounds of ``config.strategy``; return the run folder.

    With ``resume-from``, continue that run from its checkpoint, in its folder.
    """
    logs.configure(config.log_level, client=False)
    tracker = make_tracker(config.tracker)  # first: a missing [tensorboard] extra stops the run before any work
    resumed = _resume_point(config) if config.resume_from else None
    initial = initial_adapter_arrays(config.model.name, config.lora, seed=config.seed)
    experiment = {"model": model_digest(config.model.name), "initial_adapter": protocol.adapter_digest(initial)}
    if resumed:
        check_same_experiment(resumed[2], experiment)
    run_dir = resumed[0] if resumed else make_run_dir(config)
    resumed_after = resumed[1]["round"] if resumed else 0
    recorder = RunRecorder(config, run_dir, resumed_round=resumed_after if resumed else None, experiment=experiment)
    tracker.start(run_dir, recorder.results)  # a resumed run: event files rewritten from the rounds kept
    log(INFO, "fedbilevel: strategy %s, %d rounds, results in %s", config.strategy, config.num_server_rounds, run_dir)
    started = time.time()

    def on_round_end(record: dict[str, Any]) -> None:
        # The store files first (the heavy part, timed and recorded), then the round, then the record
        # naming the files: a crash in between resumes from the previous checkpoint.
        checkpoint_started = time.time()
        checkpoint = strategy.checkpoint()
        record["seconds_checkpoint"] = time.time() - checkpoint_started
        recorder.set_clients(strategy.clients)
        recorder.record_round(record)
        tracker.log_round(recorder.results)
        save_checkpoint(run_dir, checkpoint)
        done = record["round"]
        eta = (time.time() - started) / (done - resumed_after) * (config.num_server_rounds - done)
        mean = recorder.results["rounds"][-1].get("personalized_mean")
        scores = ", ".join(f"{k} {v:.3f}" for k, v in mean.items()) if mean else "not evaluated"
        split = record["time_split"]
        log(
            INFO,
            "round %d/%d done in %.0f s (of %d clients %d trained, %d evaluated; %d failures); "
            "personalized mean: %s; ETA %.0f s",
            done,
            config.num_server_rounds,
            record["seconds"],
            len(strategy.clients),
            len(record["train"]),
            len(record["eval"]),
            len(record["failures"]),
            scores,
            eta,
        )
        log(
            INFO,
            "round %d time: clients training %.1f s, evaluating %.1f s, aggregation %.2f s, "
            "other (Flower) %.1f s = %.1f%%; then checkpoint %.2f s",
            done,
            split["client_train"],
            split["client_evaluate"],
            split["aggregation"],
            split["other"],
            100 * split["other_fraction"],
            record["seconds_checkpoint"],
        )

    strategy = build_strategy(
        config,
        initial_adapter=initial,
        on_round_end=on_round_end,
        evaluate_round=config.evaluates_in_round,
        evaluate_global=config.eval.include_global,
        evaluate_cross=config.cross_evaluates_in_round,
    )
    strategy.store.attach(run_dir / STORE)
    if config.privacy.enabled:
        strategy.privacy.attach(run_dir / privacy.JOURNAL)  # each DP release on disk as it arrives
    if resumed:
        strategy.restore(resumed[1])
        log(INFO, "resuming %s after round %d (checkpoint in %s)", config.strategy, strategy.round_offset, run_dir)
        if config.strategy == "fedala":
            log(
                WARNING,
                "FedALA keeps each client's local model and mixing weights on the client; "
                "a resumed run starts them afresh",
            )
    try:
        strategy.start(
            grid,
            protocol.adapter_to_record(initial),
            num_rounds=config.num_server_rounds - strategy.round_offset,
            timeout=config.round_timeout,
            train_config=ConfigRecord(),
            evaluate_config=ConfigRecord(),
        )
    finally:
        tracker.close()
    for partition_id in sorted(strategy.clients):
        for folder, adapter in strategy.saved_adapters(partition_id).items():
            save_adapter(adapter, run_dir / "clients" / str(partition_id) / folder, config.model.name, config.lora)
    log(INFO, "final personalized scores (%s):\n%s", config.strategy, recorder.table())
    if config.eval.cross:
        write_cross_task_plot(recorder, run_dir)
    log(INFO, "results: %s", run_dir / "results.json")
    return run_dir


def write_cross_task_plot(recorder: RunRecorder, run_dir: Path) -> None:
    """``cross_task.png`` in the run folder: the final round's cross-task matrix (eval-cross), or a warning
    saying why there is none."""
    final = recorder.results["rounds"][-1] if recorder.results["rounds"] else {}
    cross = final.get("cross_task")
    if cross is None or all(row is None for row in cross["items"]):
        log(WARNING, "eval-cross: no client sent usable cross-task scores in the final round (see its failures)")
        return
    config = recorder.config
    title = f"{config.strategy}, seed {config.seed}"
    path = plot_cross_task(cross, recorder.primary_metric, title, run_dir / "cross_task.png", split=config.eval.split)
    log(INFO, "cross-task heatmap: %s", path)


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """The fedbilevel ServerApp; ``overrides`` replace run-config values (for tests and scripts)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, RunConfig.from_run_config(context.run_config, overrides))

    return app
