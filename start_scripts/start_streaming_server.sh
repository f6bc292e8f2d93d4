#!/usr/bin/env bash
# The streaming server (port 8083): token-by-token Server-Sent Events.
# Usage: start_streaming_server.sh [start|stop|status|restart]   (settings from the environment: see lib.sh)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
capibara_main streaming "$@"
