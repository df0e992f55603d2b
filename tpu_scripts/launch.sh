#!/usr/bin/env bash
# Kept for old instructions: `tpu launch CONFIG [--set key=value ...]`: `jaxft train` on every
# worker through train-loop.sh (resumed on exit 75), after cleaning up stale processes; log
# ~/jaxft-run/train.log, exit status ~/jaxft-run/exit_status per worker.  `tpu babysit` also
# relaunches after a preemption.
exec "$(dirname "$0")/tpu" launch "$@"
