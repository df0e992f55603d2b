#!/usr/bin/env bash
# Runs ON a worker (suite-queue.sh starts it on all of them): every run of an experiment suite,
# one after another, each through train-loop.sh (resumed while `jaxft train` exits 75).
# The queue is `jaxft suite run SUITE --emit-commands`: per run a `# run <id> [needs <id> ...]`
# line and its `jaxft train` command, in dependency order.  Every worker runs the same queue
# in the same order, so each multi-host run starts on all workers together.
#   - a run that finished (exit 0) is marked in $QUEUE_STATE/<id>.done and skipped next time;
#   - a run that failed is recorded in $QUEUE_STATE/<id>.failed (its exit status) and the
#     queue goes on; runs that need it are skipped (marked .blocked);
#   - preempted again and again (train-loop gave up, exit 75): the queue stops with 75, so a
#     relaunch resumes it here.
# Usage: tpu_scripts/run-queue.sh SUITE [--only GLOB]
set -uo pipefail
: "${JAXFT:=.venv/bin/jaxft}"
[ $# -ge 1 ] || { echo "usage: run-queue.sh SUITE [--only GLOB]" >&2; exit 2; }
suite=$1; shift
: "${QUEUE_STATE:=$HOME/jaxft-queue/$(basename "$suite" .yaml)}"
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$QUEUE_STATE"
queue=$("$JAXFT" suite run "$suite" --emit-commands "$@") || { echo "run-queue: $suite: cannot expand" >&2; exit 2; }
id="" needs=() cmd=() failed=0
while IFS= read -r line; do
  if [[ $line == "# run "* ]]; then
    read -r -a words <<< "${line#\# run }"
    id=${words[0]} needs=("${words[@]:2}")
    continue
  fi
  [ -n "$line" ] && [ -n "$id" ] || continue
  if [ -e "$QUEUE_STATE/$id.done" ]; then
    echo "run-queue: $id: done, skipped"; continue
  fi
  missing=()
  for n in "${needs[@]}"; do [ -e "$QUEUE_STATE/$n.done" ] || missing+=("$n"); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "run-queue: $id: blocked (needs ${missing[*]})" | tee "$QUEUE_STATE/$id.blocked" >&2; failed=1; continue
  fi
  eval "cmd=($line)"  # the command was quoted by shlex.join: POSIX shell words
  echo "run-queue: $id: ${cmd[*]}"
  "$here/train-loop.sh" "${cmd[@]:2}"  # drop "jaxft train"
  rc=$?
  rm -f "$QUEUE_STATE/$id.failed" "$QUEUE_STATE/$id.blocked"
  case $rc in
    0) touch "$QUEUE_STATE/$id.done" ;;
    75) echo "run-queue: $id: still preempted; stopping the queue (relaunch to resume)" >&2; exit 75 ;;
    130) echo "run-queue: $id: interrupted" >&2; exit 130 ;;
    *) echo "$rc" > "$QUEUE_STATE/$id.failed"; echo "run-queue: $id: failed (exit $rc)" >&2; failed=1 ;;
  esac
done <<< "$queue"
exit $failed
