#!/usr/bin/env bash
# The standard server (port 8082): whole completions in one JSON body.
# Usage: start_all_models_server.sh [start|stop|status|restart]   (settings from the environment: see lib.sh)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
capibara_main standard "$@"
