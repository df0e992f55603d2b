#!/usr/bin/env bash
# Kept for old instructions: `tpu setup` (uv, Python >= 3.11, the clone and jaxft[tpu] on every worker).
exec "$(dirname "$0")/tpu" setup "$@"
