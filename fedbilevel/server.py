"""ServerApp logic: read the run config, build the strategy by name, run, record results."""

from __future__ import annotations

import time
from collections.abc import Mapping
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fedbilevel import protocol
from fedbilevel.client.model import initial_adapter_arrays, lora_settings, save_adapter
from fedbilevel.config import RunConfig
from fedbilevel.results import RunRecorder, make_run_dir
from fedbilevel.strategies import build_strategy


def run_server(grid: Grid, config: RunConfig) -> Path:
    """Run ``config.num_server_rounds`` rounds of ``config.strategy``; return the run folder."""
    run_dir = make_run_dir(config)
    recorder = RunRecorder(config, run_dir)
    log(INFO, "fedbilevel: strategy %s, %d rounds, results in %s", config.strategy, config.num_server_rounds, run_dir)
    lora = lora_settings(config)
    initial = initial_adapter_arrays(config.model_name, lora, seed=config.seed)
    started = time.time()

    def on_round_end(record: Mapping[str, Any]) -> None:
        recorder.set_clients(strategy.clients)
        recorder.record_round(record)
        done = record["round"]
        eta = (time.time() - started) / done * (config.num_server_rounds - done)
        mean = recorder.results["rounds"][-1].get("personalized_mean")
        scores = ", ".join(f"{k} {v:.3f}" for k, v in mean.items()) if mean else "not evaluated"
        split = record["time_split"]
        log(INFO, "round %d/%d done in %.0f s (%d clients, %d failures); personalized mean: %s; ETA %.0f s",
            done, config.num_server_rounds, record["seconds"], len(record["train"]), len(record["failures"]), scores, eta)
        log(INFO, "round %d time: clients training %.1f s, evaluating %.1f s, aggregation %.2f s, other (Flower) %.1f s = %.1f%%",
            done, split["client_train"], split["client_evaluate"], split["aggregation"], split["other"], 100 * split["other_fraction"])

    strategy = build_strategy(
        config,
        initial_adapter=initial,
        on_round_end=on_round_end,
        evaluate_round=config.evaluates_in_round,
    )
    strategy.start(
        grid,
        protocol.adapter_to_record(initial),
        num_rounds=config.num_server_rounds,
        timeout=config.round_timeout,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
    )
    for partition_id in sorted(strategy.clients):
        save_adapter(strategy.personalized_adapter(partition_id), run_dir / "clients" / str(partition_id), config.model_name, lora)
    log(INFO, "final personalized scores (%s):\n%s", config.strategy, recorder.table())
    log(INFO, "results: %s", run_dir / "results.json")
    return run_dir


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """The fedbilevel ServerApp; ``overrides`` replace run-config values (for tests and scripts)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, RunConfig.from_run_config(context.run_config, overrides))

    return app
