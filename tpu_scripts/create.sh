#!/usr/bin/env bash
# Kept for old instructions: `tpu create` (see tpu_scripts/tpu and docs/tpu.md).
# Usage: ./create.sh [more gcloud flags]   (SPOT=1, QUEUED=1, NUM_SLICES=N in the env file)
exec "$(dirname "$0")/tpu" create "$@"
