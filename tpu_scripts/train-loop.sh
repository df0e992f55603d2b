#!/usr/bin/env bash
# Runs ON a worker: `jaxft train CONFIG ...`, relaunched while it exits 75
# (EX_TEMPFAIL: stopped by SIGTERM after writing a checkpoint, "resume me").
# Any other status ends the loop with that status: 0 done, 2 bad input,
# 3 diverged (train.nonfinite), 130 Ctrl-C.  MAX_RESTARTS (default 100) bounds it.
# STOP_FILE (optional): while that file exists, a 75 ends the loop too (a stop asked for, not a
# preemption: tpu_scripts/worker.sh stop), and no new attempt starts.
# Usage: tpu_scripts/train-loop.sh CONFIG [--set key=value ...]
set -uo pipefail
: "${MAX_RESTARTS:=100}"
: "${JAXFT:=.venv/bin/jaxft}"
restarts=0
stop_asked() { [ -n "${STOP_FILE:-}" ] && [ -e "$STOP_FILE" ]; }
while :; do
  if stop_asked; then
    echo "train-loop: stop asked ($STOP_FILE); not starting jaxft train" >&2
    exit 75
  fi
  "$JAXFT" train "$@"
  rc=$?
  if [ "$rc" -ne 75 ]; then
    echo "train-loop: jaxft train exited $rc" >&2
    exit "$rc"
  fi
  if stop_asked; then
    echo "train-loop: stopped on request (exit 75); not resuming" >&2
    exit 75
  fi
  restarts=$((restarts + 1))
  if [ "$restarts" -gt "$MAX_RESTARTS" ]; then
    echo "train-loop: preempted $restarts times; giving up (MAX_RESTARTS=$MAX_RESTARTS)" >&2
    exit 75
  fi
  echo "train-loop: preempted (exit 75); resuming (restart $restarts)" >&2
  sleep "${RESTART_DELAY:-5}"
done
