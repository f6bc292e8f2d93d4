# Shared by the start scripts (sourced, not run): settings, start in the background, wait for health,
# stop exactly our process, status. One implementation so the three servers are operated identically.
#
# Environment (CAPIBARA_<KIND>_<NAME>, e.g. CAPIBARA_STREAMING_PORT, wins over CAPIBARA_<NAME>, so
# start_all.sh can place three servers):
#   CAPIBARA_CONFIG         config file (default configs/embedded.json)
#   CAPIBARA_HOST, _PORT    bind address (default: server.host and server.ports.<kind> of the config)
#   CAPIBARA_RUN_DIR        where the log and pid files go (default /tmp)
#   CAPIBARA_LOG            log file (default $CAPIBARA_RUN_DIR/multi_model_server.log and the like)
#   CAPIBARA_PID_FILE       pid file (default $CAPIBARA_RUN_DIR/capibara6_<kind>.pid)
#   CAPIBARA_START_TIMEOUT  seconds to wait for /health (default 300)
#   CAPIBARA_STOP_TIMEOUT   seconds to wait after SIGTERM before SIGKILL (default 60; the server drains for 30)
#   CAPIBARA_LOG_LEVEL      server log level (default INFO)
#   CAPIBARA_TAIL_LINES     log lines shown when a start fails (default 30)
#   CAPIBARA_PYTHON         interpreter (default the repository's .venv/bin/python)

CAPIBARA_SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CAPIBARA_REPO=$(dirname "$CAPIBARA_SCRIPTS_DIR")
CAPIBARA_KINDS=(standard streaming consensus)
declare -rA CAPIBARA_SCRIPTS=([standard]=start_all_models_server.sh [streaming]=start_streaming_server.sh
                              [consensus]=start_consensus_server.sh)
declare -rA CAPIBARA_LOG_NAMES=([standard]=multi_model_server.log [streaming]=streaming_server.log
                                [consensus]=consensus_server.log)

# Prints "host port" from the config, or the configuration error (exit 2). The server would refuse
# the same bad config, but failing here means nothing is spawned and the operator sees why at once.
read -r -d '' _CAPIBARA_ADDRESS <<'PYTHON' || true
import sys
from core.config import ConfigError, load_config
try:
    server = load_config(sys.argv[1]).server
except ConfigError as error:
    print(f"configuration error: {error}")
    sys.exit(2)
print(server.host, server.ports[sys.argv[2]])
PYTHON

capibara_setting() {  # kind name default
    local specific="CAPIBARA_${1^^}_$2" generic="CAPIBARA_$2"
    printf '%s' "${!specific:-${!generic:-$3}}"
}

capibara_pid_file() { capibara_setting "$1" PID_FILE "${CAPIBARA_RUN_DIR:-/tmp}/capibara6_$1.pid"; }
capibara_log_file() { capibara_setting "$1" LOG "${CAPIBARA_RUN_DIR:-/tmp}/${CAPIBARA_LOG_NAMES[$1]}"; }

# Alive means present and not a zombie: an orphaned server that exited stays a zombie until reaped,
# and `kill -0` would still succeed on it.
capibara_alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != [ZX] ]]
}

# True if pid is a live capibara6 server of this kind: a pid file can outlive its process and the
# pid can be reused by anything else, which stop must never signal.
capibara_is_ours() {  # pid kind
    [[ $1 =~ ^[0-9]+$ ]] && capibara_alive "$1" || return 1
    local args
    args=$(tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline") || return 1
    [[ $args == *" -m servers.$2 "* ]]
}

capibara_running_pid() {  # kind -> prints the pid of our running server, fails if there is none
    local pid_file pid
    pid_file=$(capibara_pid_file "$1")
    [[ -f $pid_file ]] || return 1
    pid=$(<"$pid_file")
    capibara_is_ours "$pid" "$1" || return 1
    printf '%s' "$pid"
}

capibara_url() {  # host port -> the URL a client on this machine uses (a wildcard bind answers on loopback)
    local host=$1
    case $host in
        0.0.0.0 | "" | :: | "[::]") host=127.0.0.1 ;;
        *:*) host="[$host]" ;;
    esac
    printf 'http://%s:%s' "$host" "$2"
}

capibara_server_url() {  # pid -> URL, read from the --host/--port the server was started with
    local -a args
    local host="" port="" i
    mapfile -d '' args <"/proc/$1/cmdline"
    for ((i = 0; i < ${#args[@]} - 1; i++)); do
        case ${args[i]} in
            --host) host=${args[i + 1]} ;;
            --port) port=${args[i + 1]} ;;
        esac
    done
    capibara_url "$host" "$port"
}

capibara_healthy() { curl --silent --fail --max-time 2 --output /dev/null "$1/health"; }

capibara_terminate() {  # pid -> SIGTERM, then SIGKILL after CAPIBARA_STOP_TIMEOUT
    local deadline=$((SECONDS + ${CAPIBARA_STOP_TIMEOUT:-60}))
    kill -TERM "$1" 2>/dev/null || return 0
    while capibara_alive "$1" && ((SECONDS < deadline)); do sleep 0.2; done
    if capibara_alive "$1"; then
        echo "pid $1 still running after ${CAPIBARA_STOP_TIMEOUT:-60} s; sending SIGKILL" >&2
        kill -KILL "$1" 2>/dev/null || true
        while capibara_alive "$1"; do sleep 0.1; done
    fi
}

capibara_host_pids() {  # config -> pids of the model hosts serving it
    local entry args
    for entry in /proc/[0-9]*; do
        args=$(tr '\0' ' ' 2>/dev/null <"$entry/cmdline") || continue
        [[ $args == *" -m core.host --config $1 "* ]] && capibara_alive "${entry#/proc/}" && echo "${entry#/proc/}"
    done
    return 0
}

capibara_wait_hosts() {  # config -> waits up to CAPIBARA_STOP_TIMEOUT for its model host to stop its runners and exit
    local deadline=$((SECONDS + ${CAPIBARA_STOP_TIMEOUT:-60})) pids
    while pids=$(capibara_host_pids "$1") && [[ -n $pids ]]; do
        if ((SECONDS >= deadline)); then
            echo "model host $pids still running after ${CAPIBARA_STOP_TIMEOUT:-60} s" >&2
            return 1
        fi
        sleep 0.5
    done
    echo "model host stopped (runners stopped)"
}

capibara_fail() {  # kind log message -> the reason and the end of the log, on stderr
    {
        echo "$1 server did not come up: $3"
        if [[ -s $2 ]]; then
            echo "last lines of $2:"
            tail -n "${CAPIBARA_TAIL_LINES:-30}" "$2" | sed 's/^/  | /'
        else
            echo "(nothing in $2 yet)"
        fi
    } >&2
}

capibara_start() {  # kind
    local kind=$1 pid_file log config address host port url pid
    pid_file=$(capibara_pid_file "$kind")
    log=$(capibara_log_file "$kind")
    if pid=$(capibara_running_pid "$kind"); then
        echo "$kind server already running: $(capibara_server_url "$pid") (pid $pid, $pid_file)"
        return 0
    fi
    if [[ ! -x $CAPIBARA_PYTHON ]]; then
        echo "$kind: no interpreter at $CAPIBARA_PYTHON; run 'make install' first" >&2
        return 2
    fi
    config=$(realpath -m "${CAPIBARA_CONFIG:-$CAPIBARA_REPO/configs/embedded.json}")
    if ! address=$(cd "$CAPIBARA_REPO" && "$CAPIBARA_PYTHON" -c "$_CAPIBARA_ADDRESS" "$config" "$kind"); then
        echo "$kind server not started: $address" >&2
        return 2
    fi
    read -r host port <<<"$address"
    host=$(capibara_setting "$kind" HOST "$host")
    port=$(capibara_setting "$kind" PORT "$port")
    url=$(capibara_url "$host" "$port")
    if capibara_healthy "$url"; then
        echo "$kind server not started: another server already answers on $url" >&2
        return 1
    fi

    mkdir -p "$(dirname "$log")" "$(dirname "$pid_file")"
    : >"$log"
    # setsid detaches the server from this terminal; exec keeps the pid we record.
    (cd "$CAPIBARA_REPO" && exec setsid "$CAPIBARA_PYTHON" -m "servers.$kind" --config "$config" \
        --host "$host" --port "$port" --log-file "$log" --log-level "${CAPIBARA_LOG_LEVEL:-INFO}" \
        </dev/null >>"$log" 2>&1) &
    pid=$!
    echo "$pid" >"$pid_file"

    local timeout=${CAPIBARA_START_TIMEOUT:-300}
    local deadline=$((SECONDS + timeout))
    until capibara_healthy "$url"; do
        if ! capibara_alive "$pid"; then
            rm -f "$pid_file"
            capibara_fail "$kind" "$log" "the process exited"
            return 1
        fi
        if ((SECONDS >= deadline)); then
            capibara_terminate "$pid"
            rm -f "$pid_file"
            capibara_fail "$kind" "$log" "no answer from $url/health after $timeout s (stopped it)"
            return 1
        fi
        sleep 0.5
    done
    echo "$kind server up: $url (pid $pid)"
    echo "  config: $config"
    echo "  log:    $log"
    echo "  pid:    $pid_file"
}

capibara_stop() {  # kind
    local kind=$1 pid_file pid
    pid_file=$(capibara_pid_file "$kind")
    if [[ ! -f $pid_file ]]; then
        echo "$kind server not running (no $pid_file)"
        return 0
    fi
    pid=$(<"$pid_file")
    if ! capibara_is_ours "$pid" "$kind"; then
        echo "$kind server not running: pid '$pid' in $pid_file is not a capibara6 $kind server;" \
            "removed the stale pid file"
        rm -f "$pid_file"
        return 0
    fi
    capibara_terminate "$pid"
    rm -f "$pid_file"
    echo "$kind server stopped (pid $pid)"
}

capibara_status() {  # kind -> exit 0 running and healthy, 1 running but not answering, 3 not running
    local kind=$1 pid url
    if ! pid=$(capibara_running_pid "$kind"); then
        echo "$kind server not running"
        return 3
    fi
    url=$(capibara_server_url "$pid")
    if capibara_healthy "$url"; then
        echo "$kind server running: $url (pid $pid), /health ok"
    else
        echo "$kind server running (pid $pid) but $url/health does not answer"
        return 1
    fi
}

capibara_main() {  # kind [start|stop|status|restart]
    local kind=$1 action=${2:-start}
    CAPIBARA_PYTHON=${CAPIBARA_PYTHON:-$CAPIBARA_REPO/.venv/bin/python}
    case $action in
        start) capibara_start "$kind" ;;
        stop) capibara_stop "$kind" ;;
        status) capibara_status "$kind" ;;
        restart) capibara_stop "$kind" && capibara_start "$kind" ;;
        *)
            echo "usage: $(basename "$0") [start|stop|status|restart]" >&2
            return 2
            ;;
    esac
}
