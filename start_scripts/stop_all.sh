#!/usr/bin/env bash
# Stop the three servers in parallel (each drains its in-flight requests first), each through its
# own script so only the processes named by their pid files are signalled.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

pids=()
for kind in "${CAPIBARA_KINDS[@]}"; do
    "$CAPIBARA_SCRIPTS_DIR/${CAPIBARA_SCRIPTS[$kind]}" stop &
    pids+=("$!")
done
failed=0
for pid in "${pids[@]}"; do
    wait "$pid" || failed=1
done
# The model host stops its runners and exits server.host_linger_s after the last server; wait for it, so that
# `make stop` returns with the engines' memory given back.
capibara_wait_hosts "$(realpath -m "${CAPIBARA_CONFIG:-$CAPIBARA_REPO/configs/embedded.json}")" || failed=1
exit "$failed"
