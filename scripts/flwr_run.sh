#!/usr/bin/env bash
# `flwr run .` against a private local SuperLink that uses THIS environment (.venv):
# Flower's default local SuperLink installs the app's dependencies into a fresh
# environment per run (network, CUDA torch). Extra arguments go to `flwr run`, e.g.
#   scripts/flwr_run.sh --run-config "strategy='fedbip-l' num-server-rounds=5"
# Environment: FEDBILEVEL_NUM_SUPERNODES (default 8), FEDBILEVEL_CPUS_PER_CLIENT (1),
# FEDBILEVEL_GPUS_PER_CLIENT (0; 0.5 puts two clients on each GPU), FEDBILEVEL_SUPERLINK_PORT
# (39191); RAY_ADDRESS attaches the simulation to an existing Ray cluster (README).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
export FLWR_HOME="$PWD/.flwr"
export FEDBILEVEL_OUTPUT_ROOT="$PWD"  # relative output-dir = ./outputs here
PORT="${FEDBILEVEL_SUPERLINK_PORT:-39191}"
# The federation's size and resources, checked before anything starts (a bad value: one line naming it).
FEDERATION_CONFIG="$(python -m fedbilevel.federation)"
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "fedbilevel-local"

[superlink.fedbilevel-local]
address = "127.0.0.1:$PORT"
insecure = true
TOML

flower-superlink --insecure --simulation --disable-runtime-dependency-installation \
  --host 127.0.0.1 --port "$PORT" --log-file "$FLWR_HOME/superlink.log" >/dev/null 2>&1 &
SUPERLINK_PID=$!
trap 'kill "$SUPERLINK_PID" 2>/dev/null; wait "$SUPERLINK_PID" 2>/dev/null || true' EXIT
for _ in $(seq 1 60); do
  if python -c "import httpx,sys; sys.exit(0 if httpx.get('http://127.0.0.1:$PORT/health', timeout=1).is_success else 1)" 2>/dev/null; then
    break
  fi
  kill -0 "$SUPERLINK_PID" 2>/dev/null || { echo "SuperLink failed to start; see $FLWR_HOME/superlink.log" >&2; exit 1; }
  sleep 1
done

flwr run . fedbilevel-local --stream --federation-config "$FEDERATION_CONFIG" "$@"

# `flwr run --stream` exits 0 even when the ServerApp failed: ask the SuperLink (private to this
# script, so its last run is ours) how the run ended, and fail with the reason as the last line.
flwr ls fedbilevel-local --format json | python -c '
import json, sys
runs = json.load(sys.stdin).get("runs", [])
if not runs:
    sys.exit("fedbilevel: the SuperLink knows no run; see .flwr/superlink.log")
run = max(runs, key=lambda r: int(r["run-id"]))
run_id, status = run["run-id"], run["status"]
if status != "finished:completed":
    details = " ".join(str(run.get("status-details") or "").split()) or "no details; see the log above"
    sys.exit(f"fedbilevel: run {run_id} ended {status}: {details}")
'
