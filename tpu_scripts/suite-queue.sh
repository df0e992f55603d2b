#!/usr/bin/env bash
# Run an experiment suite on the TPU VM: every worker runs tpu_scripts/run-queue.sh, the
# suite's `jaxft train` commands (`jaxft suite run --emit-commands`) one after another, each
# resumed after preemption.  Logs: ~/jaxft-suite.log per worker; progress: `jaxft suite status`
# on worker 0 (`tpu ssh CMD` is all workers; use gcloud ... --worker=0 for one).
# Usage: ./suite-queue.sh configs/suites/x.yaml [--only 'stage.*']   (paths on the workers,
# relative to $REMOTE_DIR)
set -euo pipefail
# shellcheck source=tpu_scripts/common.sh
. "$(dirname "$0")/common.sh"
[ $# -ge 1 ] || { echo "usage: suite-queue.sh SUITE [--only GLOB]" >&2; exit 2; }
args=$(printf ' %q' "$@")
# stale trainers and the libtpu lock file go first (worker.sh clean); the compilation cache is shared
on_clone "tpu_scripts/worker.sh clean > /dev/null; nohup tpu_scripts/run-queue.sh$args > ~/jaxft-suite.log 2>&1 &"
