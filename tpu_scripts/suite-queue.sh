#!/usr/bin/env bash
# Run an experiment suite on the TPU VM: every worker runs tpu_scripts/run-queue.sh, the
# suite's `jaxft train` commands (`jaxft suite run --emit-commands`) one after another, each
# resumed after preemption.  Logs: ~/jaxft-suite.log per worker; progress: `jaxft suite status`
# on worker 0 (./ssh-all.sh is all workers; use gcloud ... --worker=0 for one).
# Usage: ./suite-queue.sh configs/suites/x.yaml [--only 'stage.*']   (paths on the workers,
# relative to $REMOTE_DIR)
set -euo pipefail
. "$(dirname "$0")/common.sh"
[ $# -ge 1 ] || { echo "usage: suite-queue.sh SUITE [--only GLOB]" >&2; exit 2; }
args=$(printf ' %q' "$@")
"$(dirname "$0")/ssh-all.sh" "cd $REMOTE_DIR && nohup tpu_scripts/run-queue.sh$args > ~/jaxft-suite.log 2>&1 &"
