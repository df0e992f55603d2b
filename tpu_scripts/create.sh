#!/usr/bin/env bash
# Create a TPU VM (or pod slice).  Usage: TPU_NAME=x ACCELERATOR_TYPE=v5p-32 ./create.sh [--spot]
set -euo pipefail
. "$(dirname "$0")/common.sh"
gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
  --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION" "$@"
