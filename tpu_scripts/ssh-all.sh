#!/usr/bin/env bash
# Run one command on every worker (every slice).  Usage: ./ssh-all.sh 'uptime'
exec "$(dirname "$0")/tpu" ssh "$@"
