#!/usr/bin/env bash
# Run one command on every worker of the slice.  Usage: ./ssh-all.sh 'nvidia-smi || true'
set -euo pipefail
. "$(dirname "$0")/common.sh"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"
