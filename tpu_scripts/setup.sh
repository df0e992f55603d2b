#!/usr/bin/env bash
# Clone the repository and install jaxft[tpu] on every worker.
set -euo pipefail
. "$(dirname "$0")/common.sh"
[ -n "$REPO_URL" ] || { echo "setup.sh: set REPO_URL to this repository's git URL" >&2; exit 2; }
"$(dirname "$0")/ssh-all.sh" "set -e; [ -d $REMOTE_DIR ] || git clone $REPO_URL $REMOTE_DIR; \
  cd $REMOTE_DIR && git pull --ff-only && python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e '.[tpu]'"
