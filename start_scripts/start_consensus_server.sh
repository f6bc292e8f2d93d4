#!/usr/bin/env bash
# The consensus server (port 8084): several experts answer, one synthesised reply.
# Usage: start_consensus_server.sh [start|stop|status|restart]   (settings from the environment: see lib.sh)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
capibara_main consensus "$@"
