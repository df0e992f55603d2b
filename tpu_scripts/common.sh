# shellcheck shell=bash
# Shared settings and helpers of the TPU scripts (sourced by `tpu` and the *.sh wrappers).
#
# Settings come from one env file, ${JAXFT_TPU_ENV:-tpu_scripts/jaxft-tpu.env} (a bash file
# of NAME=value lines; see jaxft-tpu.env.example), and the environment: a variable set in the
# environment wins over the file (`TPU_NAME=other tpu_scripts/tpu status`).

_tpu_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# Every setting (the env file may set others; these are the ones the environment overrides).
_tpu_settings=(TPU_NAME ZONE PROJECT ACCELERATOR_TYPE RUNTIME_VERSION SPOT QUEUED QR_NAME NUM_SLICES
               CREATE_ARGS SSH_FLAGS WORKERS REPO_URL REF REMOTE_DIR PYTHON_VERSION EXTRAS RUN_CONFIG
               RUN_SET RUN_DIR JAX_CACHE_DIR WORKER_ENV REMOTE_STATE LOG_DIR POLL MAX_RELAUNCHES
               READY_TIMEOUT STOP_TIMEOUT SSH_FAILURES)

_tpu_env_file=${JAXFT_TPU_ENV:-$_tpu_here/jaxft-tpu.env}
if [ -e "$_tpu_env_file" ]; then
  declare -A _tpu_from_env=()
  for _v in "${_tpu_settings[@]}"; do
    if [ -n "${!_v+x}" ] && [[ $(declare -p "$_v" 2>/dev/null) != "declare -a"* ]]; then
      _tpu_from_env[$_v]=${!_v}
    fi
  done
  # shellcheck source=/dev/null  # the user's env file
  . "$_tpu_env_file"
  for _v in "${!_tpu_from_env[@]}"; do
    unset "$_v"  # may have become an array in the file
    printf -v "$_v" '%s' "${_tpu_from_env[$_v]}"
  done
  unset _v _tpu_from_env
elif [ -n "${JAXFT_TPU_ENV:-}" ]; then
  echo "tpu: JAXFT_TPU_ENV=$JAXFT_TPU_ENV: no such file" >&2
  exit 2
fi

: "${TPU_NAME:=jaxft}"
: "${ZONE:=us-central2-b}"
: "${PROJECT:=}"                # empty: gcloud's default project
: "${ACCELERATOR_TYPE:=v4-8}"
: "${RUNTIME_VERSION:=}"        # empty: chosen from ACCELERATOR_TYPE (runtime_version below)
: "${SPOT:=0}"
: "${QUEUED:=0}"                # 1: create through a queued resource
: "${NUM_SLICES:=1}"            # >1: multi-slice (always a queued resource)
: "${QR_NAME:=$TPU_NAME-qr}"    # the queued resource's id
: "${WORKERS:=}"                # hosts per slice; empty: asked from gcloud (logs only)
: "${REPO_URL:=}"               # git URL of this repository, cloned on every worker
: "${REF:=}"                    # branch, tag or commit to check out; empty: pull the default branch
: "${REMOTE_DIR:=jaxft}"        # the clone, relative to the worker's home
: "${PYTHON_VERSION:=3.11}"
: "${EXTRAS:=tpu}"
: "${RUN_CONFIG:=}"             # the config of `launch` / `babysit` without a CONFIG argument
: "${RUN_DIR:=}"                # the run dir `status` reads; empty: the config's run_dir
: "${JAX_CACHE_DIR:=.cache/jaxft/jax-compilation-cache}"  # on the workers, relative to the home (or gs://...)
: "${REMOTE_STATE:=jaxft-run}"  # per-worker log, pid and exit status, relative to the home
: "${LOG_DIR:=tpu-logs/$TPU_NAME}"  # local: `logs` and the babysitter's log
: "${POLL:=60}"
: "${MAX_RELAUNCHES:=20}"
: "${READY_TIMEOUT:=0}"         # seconds `create` waits for READY/ACTIVE; 0: no limit
: "${STOP_TIMEOUT:=900}"
: "${SSH_FAILURES:=10}"         # consecutive failed polls of a READY TPU before the babysitter recreates it

# words NAME: the setting as words (a bash array in the env file, or a string split at spaces)
words() {
  local decl
  decl=$(declare -p "$1" 2>/dev/null) || { _words=(); return; }
  if [[ $decl == "declare -a"* ]]; then
    local -n _ref=$1
    _words=("${_ref[@]}")
  else
    read -r -a _words <<< "${!1}"
  fi
}

die() { echo "tpu: $*" >&2; exit 2; }

qr_mode() { [ "$QUEUED" = 1 ] || [ "$NUM_SLICES" -gt 1 ]; }

# The TPU VM image of a generation (RUNTIME_VERSION wins).
runtime_version() {
  if [ -n "$RUNTIME_VERSION" ]; then echo "$RUNTIME_VERSION"; return; fi
  case $ACCELERATOR_TYPE in
    v2-*|v3-*|v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo "tpu: no runtime image known for ACCELERATOR_TYPE=$ACCELERATOR_TYPE; set RUNTIME_VERSION" >&2
       return 2 ;;
  esac
}

# gcloud with the project of the env file
gc() {
  if [ -n "$PROJECT" ]; then gcloud "$@" --project "$PROJECT"; else gcloud "$@"; fi
}

# rq PATH: PATH quoted for the worker's shell; relative to the worker's home unless absolute or
# a URL (gs://...).  A leading ~/ (quoted in the env file) is the home too.
rq() {
  local p=${1#\~}
  p=${p#/}
  case $1 in
    \~|\~/*|[!/]*) [[ $1 == *://* ]] && { printf '%q' "$1"; return; }
      # shellcheck disable=SC2016  # $HOME is expanded on the worker, not here
      if [ -n "$p" ]; then printf '"$HOME"/%q' "$p"; else printf '"$HOME"'; fi ;;
    *) printf '%q' "$1" ;;
  esac
}

# on_workers CMD [WORKER]: run CMD on every worker of every slice (or on worker WORKER).
on_workers() {
  words SSH_FLAGS
  if qr_mode; then
    gc compute tpus queued-resources ssh "$QR_NAME" --zone "$ZONE" --node=all --worker="${2:-all}" \
      "${_words[@]}" --command "$1"
  else
    gc compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker="${2:-all}" "${_words[@]}" --command "$1"
  fi
}

# The exports every worker-side command gets (compilation cache, state dir, RUN_DIR, WORKER_ENV).
remote_env() {
  local kv
  printf 'export REMOTE_STATE=%q JAX_COMPILATION_CACHE_DIR=%s' "$REMOTE_STATE" "$(rq "$JAX_CACHE_DIR")"
  [ -z "$RUN_DIR" ] || printf ' RUN_DIR=%q' "$RUN_DIR"
  words WORKER_ENV
  for kv in "${_words[@]}"; do
    [[ $kv == [A-Za-z_]*=* ]] || die "WORKER_ENV: $kv is not NAME=value"
    printf ' %s=%q' "${kv%%=*}" "${kv#*=}"
  done
  printf '; '
}

# on_clone CMD [FALLBACK]: run CMD in the clone on every worker, with remote_env; where there
# is no clone, FALLBACK (default: say so and fail)
on_clone() {
  local env
  env=$(remote_env) || return 2
  on_workers "cd $(rq "$REMOTE_DIR") 2> /dev/null || { ${2:-echo \"\$(hostname): no $REMOTE_DIR here (tpu setup)\"; exit 3}; }; $env$1"
}
