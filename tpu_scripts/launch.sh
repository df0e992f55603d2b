#!/usr/bin/env bash
# Start `jaxft train CONFIG [--set ...]` on all workers at once; multi-host
# initialisation is automatic on TPU VMs.  Logs go to ~/jaxft-train.log per worker.
# Each worker runs it through train-loop.sh, which resumes the run whenever
# `jaxft train` exits 75 (SIGTERM: checkpoint written, "resume me").
# Usage: ./launch.sh configs/experiments/x.yaml --set train.steps=1000
set -euo pipefail
. "$(dirname "$0")/common.sh"
[ $# -ge 1 ] || { echo "usage: launch.sh CONFIG [--set key=value ...]" >&2; exit 2; }
args=$(printf ' %q' "$@")
"$(dirname "$0")/ssh-all.sh" "cd $REMOTE_DIR && nohup tpu_scripts/train-loop.sh$args > ~/jaxft-train.log 2>&1 &"
