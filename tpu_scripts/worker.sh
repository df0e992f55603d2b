#!/usr/bin/env bash
# Runs ON a worker, in the clone ($REMOTE_DIR): the worker side of tpu_scripts/tpu.
#   worker.sh start CONFIG [ARGS...]  clean up (below), then run `worker.sh run` detached
#                                     (own session; log $STATE_DIR/train.log)
#   worker.sh run CONFIG [ARGS...]    train-loop.sh CONFIG ARGS; its status -> $STATE_DIR/exit_status
#   worker.sh state                   one line for the babysitter: `jaxft-state <worker> <state> <args>`
#   worker.sh status                  one line for people: alive, exit status, last step and loss
#   worker.sh stop                    SIGTERM the trainer (it checkpoints, exits 75), no resume; wait
#   worker.sh clean                   the clean-up alone
# Clean-up: our previous run's session, this user's other trainers (STALE_PATTERN), whatever
# holds the TPU devices (ACCEL_DEVICES), then the libtpu lock file (LIBTPU_LOCKFILE).
# State ($STATE_DIR = ~/$REMOTE_STATE): pid (the session of `run`), args, run_dir, train.log,
# exit_status (written when train-loop.sh ends), stop_requested.
set -uo pipefail
: "${REMOTE_STATE:=jaxft-run}"
: "${STATE_DIR:=$HOME/$REMOTE_STATE}"
: "${JAXFT:=.venv/bin/jaxft}"
: "${LIBTPU_LOCKFILE:=/tmp/libtpu_lockfile}"
: "${STALE_PATTERN:=jaxft(\.cli)? (train|suite)|tpu_scripts/(train-loop|run-queue)\.sh}"
: "${ACCEL_DEVICES=/dev/accel* /dev/vfio/[0-9]*}"  # globs; empty: leave device holders alone
: "${STALE_GRACE:=30}"  # seconds a SIGTERMed stale process gets before SIGKILL
: "${STOP_TIMEOUT:=900}"
here=$(cd "$(dirname "$0")" && pwd)

stamp() { date -u +%Y-%m-%dT%H:%M:%SZ; }

# This worker's name: "worker N" (N from the TPU metadata), "slice S worker N" on a multi-slice.
label() {
  if [ -n "${_label:-}" ]; then echo "$_label"; return; fi
  local w=${JAXFT_WORKER_ID:-} s=${JAXFT_SLICE_ID:-}
  local md=http://metadata.google.internal/computeMetadata/v1/instance/attributes
  if [ -z "$w" ]; then
    w=$(curl -sf -m 2 -H 'Metadata-Flavor: Google' "$md/agent-worker-number" 2>/dev/null) || w=""
    s=$(curl -sf -m 2 -H 'Metadata-Flavor: Google' "$md/tpu-env" 2>/dev/null |
        sed -n "s/^MEGASCALE_SLICE_ID: *'\{0,1\}\([0-9]*\).*/\1/p") || s=""
  fi
  [ -n "$w" ] || w=$(hostname)
  _label="${s:+slice $s }worker $w"
  echo "$_label"
}

# The pid of our `worker.sh run` if it is alive, else nothing.
alive_pid() {
  local pid
  pid=$(cat "$STATE_DIR/pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && is_alive "$pid" || return 1
  ps -ww -o args= -p "$pid" 2>/dev/null | grep -q 'worker\.sh run' || return 1
  echo "$pid"
}

# running | exit:N | stopped:N | gone (started, died without a status) | none
run_state() {
  if alive_pid > /dev/null; then echo running
  elif [ -f "$STATE_DIR/exit_status" ]; then
    local rc
    rc=$(cat "$STATE_DIR/exit_status")
    if [ -e "$STATE_DIR/stop_requested" ]; then echo "stopped:$rc"; else echo "exit:$rc"; fi
  elif [ -f "$STATE_DIR/pid" ]; then echo gone
  else echo none
  fi
}

# is_alive PID: running (a zombie is not)
is_alive() { kill -0 "$1" 2>/dev/null && [[ $(ps -o stat= -p "$1" 2>/dev/null) != Z* ]]; }

# wait_gone SECONDS PID...: wait until none of PIDS is alive; 1 if some still are
wait_gone() {
  local deadline=$((SECONDS + $1)) p left
  shift
  while :; do
    left=0
    for p in "$@"; do is_alive "$p" && left=1; done
    [ "$left" = 0 ] && return 0
    [ "$SECONDS" -ge "$deadline" ] && return 1
    sleep 0.2
  done
}

# terminate WHAT PID...: SIGTERM, STALE_GRACE seconds, SIGKILL (sudo for another user's process)
terminate() {
  local what=$1
  shift
  [ $# -gt 0 ] || return 0
  echo "$(label): stopping $what: $*"
  kill -TERM "$@" 2>/dev/null || sudo -n kill -TERM "$@" 2>/dev/null
  wait_gone "$STALE_GRACE" "$@" && return 0
  kill -KILL "$@" 2>/dev/null || sudo -n kill -KILL "$@" 2>/dev/null
  wait_gone 5 "$@" || true
}

clean() {
  local pid pids=() p dev
  if pid=$(alive_pid); then
    # shellcheck disable=SC2207  # pids are single words
    pids=($(pgrep -s "$pid"))
    terminate "the previous run (session $pid)" "${pids[@]}"
  fi
  # this user's processes that match, but not this script and the shells that started it
  local mine=" " q=$$
  while [ -n "$q" ] && [ "$q" -gt 1 ]; do mine+="$q "; q=$(ps -o ppid= -p "$q" | tr -d ' '); done
  pids=()
  for p in $(pgrep -u "$(id -u)" -f "$STALE_PATTERN"); do
    [[ $mine == *" $p "* ]] || pids+=("$p")
  done
  terminate "stale processes" "${pids[@]}"
  if [ -n "$ACCEL_DEVICES" ] && command -v lsof > /dev/null; then
    pids=()
    for dev in $ACCEL_DEVICES; do  # unquoted: the globs expand here
      [ -e "$dev" ] || continue
      for p in $(lsof -t "$dev" 2>/dev/null; sudo -n lsof -t "$dev" 2>/dev/null); do
        [ "$p" = "$$" ] || pids+=("$p")
      done
    done
    # shellcheck disable=SC2207  # pids are single words
    pids=($(printf '%s\n' "${pids[@]}" | sort -u))
    terminate "processes holding the TPU" "${pids[@]}"
  fi
  if [ -e "$LIBTPU_LOCKFILE" ]; then
    rm -f "$LIBTPU_LOCKFILE" 2>/dev/null || sudo -n rm -f "$LIBTPU_LOCKFILE"
    echo "$(label): removed $LIBTPU_LOCKFILE"
  fi
}

start() {
  [ $# -ge 1 ] || { echo "usage: worker.sh start CONFIG [ARGS...]" >&2; exit 2; }
  mkdir -p "$STATE_DIR"
  clean
  [ -z "${JAX_COMPILATION_CACHE_DIR:-}" ] || [[ $JAX_COMPILATION_CACHE_DIR == *://* ]] ||
    mkdir -p "$JAX_COMPILATION_CACHE_DIR"
  rm -f "$STATE_DIR/exit_status" "$STATE_DIR/stop_requested" "$STATE_DIR/run_dir"
  printf '%q ' "$@" > "$STATE_DIR/args"
  # own session (setsid): survives the ssh, and `clean` finds all of it
  setsid nohup "$here/worker.sh" run "$@" > "$STATE_DIR/train.log" 2>&1 < /dev/null &
  echo $! > "$STATE_DIR/pid"
  echo "$(label): started (pid $!, log $STATE_DIR/train.log, compilation cache ${JAX_COMPILATION_CACHE_DIR:-none})"
}

run() {
  export STOP_FILE=$STATE_DIR/stop_requested  # train-loop.sh: do not resume after a stop
  echo "[$(stamp)] worker.sh: jaxft train $*"
  echo "[$(stamp)] worker.sh: JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-}"
  if [ -n "${RUN_DIR:-}" ]; then
    echo "$RUN_DIR" > "$STATE_DIR/run_dir"
  else  # the config's run_dir, for `status` (CONFIG and its --set overrides only)
    local show=("$1") a shift_set=0
    for a in "${@:2}"; do
      if [ "$shift_set" = 1 ]; then show+=(--set "$a"); shift_set=0
      elif [ "$a" = --set ]; then shift_set=1
      elif [[ $a == --set=* ]]; then show+=("$a")
      fi
    done
    "$JAXFT" config show "${show[@]}" 2>/dev/null | sed -n "s/^run_dir: *//p" |
      sed "s/^['\"]//; s/['\"]\$//" > "$STATE_DIR/run_dir"
  fi
  "$here/train-loop.sh" "$@"
  local rc=$?
  # log first: whoever sees exit_status (status, logs, tests) then also sees the closing line
  echo "[$(stamp)] worker.sh: train-loop.sh exited $rc"
  echo "$rc" > "$STATE_DIR/exit_status.tmp" && mv -f "$STATE_DIR/exit_status.tmp" "$STATE_DIR/exit_status"
  exit "$rc"
}

args_sum() { cksum < "$STATE_DIR/args" 2>/dev/null | cut -d' ' -f1; }

state() { echo "jaxft-state $(label | tr ' ' _) $(run_state) $(args_sum)"; }

# step and loss of the last metrics.jsonl line that has a "loss"
last_metrics() {
  local dir line
  dir=$(cat "$STATE_DIR/run_dir" 2>/dev/null)
  [ -n "${RUN_DIR:-}" ] && dir=$RUN_DIR
  [ -n "$dir" ] && [ -f "$dir/metrics.jsonl" ] || { echo "no metrics here"; return; }
  line=$(tac "$dir/metrics.jsonl" | grep -m1 -E '[{,] *"loss": *')
  [ -n "$line" ] || { echo "no loss logged yet"; return; }
  printf 'step %s loss %s' "$(sed -n 's/.*[{,] *"step": *\([0-9]*\).*/\1/p' <<< "$line")" \
    "$(sed -n 's/.*[{,] *"loss": *\([^,}]*\).*/\1/p' <<< "$line")"
}

status() {
  local st what restarts
  st=$(run_state)
  case $st in
    running) what="running (pid $(alive_pid))" ;;
    exit:0) what="finished (exit 0)" ;;
    exit:*) what="ended (exit ${st#exit:})" ;;
    stopped:*) what="stopped (exit ${st#stopped:})" ;;
    gone) what="died without an exit status" ;;
    *) what="not started"; echo "$(label): $what"; return ;;
  esac
  restarts=$(grep -c '^train-loop: preempted' "$STATE_DIR/train.log" 2>/dev/null)
  echo "$(label): $what, $(last_metrics), resumed ${restarts:-0} time(s)"
}

stop() {
  local pid deadline signalled=" " c t
  if ! pid=$(alive_pid); then echo "$(label): not running ($(run_state))"; return 0; fi
  touch "$STATE_DIR/stop_requested"
  deadline=$((SECONDS + STOP_TIMEOUT))
  while is_alive "$pid"; do
    # the trainer: a child of train-loop.sh (itself the child of `run`); new ones too (a resume
    # that raced the stop file), each signalled once
    for c in $(pgrep -P "$pid"); do
      for t in $(pgrep -P "$c"); do
        [[ $signalled == *" $t "* ]] && continue
        kill -TERM "$t" 2>/dev/null && echo "$(label): SIGTERM to $(ps -ww -o args= -p "$t" | cut -c1-60) (pid $t)"
        signalled+="$t "
      done
    done
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "$(label): still running after ${STOP_TIMEOUT}s (pid $pid)" >&2
      return 1
    fi
    sleep 0.2
  done
  echo "$(label): stopped (exit $(cat "$STATE_DIR/exit_status" 2>/dev/null || echo '?'))"
}

cmd=${1:-}
shift || true
case $cmd in
  run) run "$@" ;;
  start|state|status|stop|clean) _label=$(label); "$cmd" "$@" ;;
  *) echo "usage: worker.sh start|run|state|status|stop|clean [ARGS...]" >&2; exit 2 ;;
esac
