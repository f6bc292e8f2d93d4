#!/usr/bin/env bash
# Start the standard, streaming and consensus servers (each through its own script), then show what
# to curl. Per-server settings: CAPIBARA_STANDARD_PORT, CAPIBARA_STREAMING_LOG, ... (see lib.sh).
# Exits non-zero if any server did not come up; the others are left running.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

for name in PORT LOG PID_FILE; do
    generic="CAPIBARA_$name"
    if [[ -n ${!generic:-} ]]; then
        echo "start_all.sh: $generic would apply to all three servers; set CAPIBARA_STANDARD_$name," \
            "CAPIBARA_STREAMING_$name, CAPIBARA_CONSENSUS_$name instead" >&2
        exit 2
    fi
done

failed=0
declare -A urls
for kind in "${CAPIBARA_KINDS[@]}"; do
    if "$CAPIBARA_SCRIPTS_DIR/${CAPIBARA_SCRIPTS[$kind]}" start && pid=$(capibara_running_pid "$kind"); then
        urls[$kind]=$(capibara_server_url "$pid")
    else
        failed=1
    fi
done

if [[ -n ${urls[standard]:-} ]]; then
    # The warm pool comes up in the background; wait for it, so that the first request is not a cold start.
    python=${CAPIBARA_PYTHON:-$CAPIBARA_REPO/.venv/bin/python}
    config=$(realpath -m "${CAPIBARA_CONFIG:-$CAPIBARA_REPO/configs/embedded.json}")
    warm=$(cd "$CAPIBARA_REPO" && "$python" -c 'import sys; from core.config import load_config
print(" ".join(load_config(sys.argv[1]).server.warmup))' "$config")
    echo "waiting for the warm pool: ${warm:-(none)}"
    # shellcheck disable=SC2086
    (cd "$CAPIBARA_REPO" && "$python" -m core.harness.ready "${urls[standard]}" $warm) || failed=1
fi

messages='"messages": [{"role": "user", "content": "Write a haiku about capybaras"}]'
auth=${CAPIBARA_API_KEY:+ -H \"Authorization: Bearer \$CAPIBARA_API_KEY\"}
echo
echo "Try (no \"model\" lets the router choose; name one from /v1/models to pick it):"
for kind in "${CAPIBARA_KINDS[@]}"; do
    [[ -n ${urls[$kind]:-} ]] || continue
    url=${urls[$kind]}
    flags="" body="{$messages}"
    [[ $kind == streaming ]] && flags=" -N" body="{\"stream\": true, $messages}"
    echo "  # $kind"
    echo "  curl $url/health"
    echo "  curl$flags$auth $url/v1/chat/completions -H 'Content-Type: application/json' -d '$body'"
done
[[ -n ${urls[standard]:-} ]] && echo "  curl$auth ${urls[standard]}/v1/models; curl$auth ${urls[standard]}/metrics"
echo "Stop them with: make stop (start_scripts/stop_all.sh)"
exit "$failed"
