#!/usr/bin/env bash
# Start `jaxft train CONFIG [--set ...]` on all workers at once; multi-host
# initialisation is automatic on TPU VMs.  Logs go to ~/jaxft-train.log per worker.
# Usage: ./launch.sh configs/experiments/x.yaml --set train.steps=1000
set -euo pipefail
. "$(dirname "$0")/common.sh"
[ $# -ge 1 ] || { echo "usage: launch.sh CONFIG [--set key=value ...]" >&2; exit 2; }
args=$(printf ' %q' "$@")
"$(dirname "$0")/ssh-all.sh" "cd $REMOTE_DIR && nohup .venv/bin/jaxft train$args > ~/jaxft-train.log 2>&1 &"
