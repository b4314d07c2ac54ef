#!/usr/bin/env bash
# A local Ray head with token authentication whose every listening socket is on 127.0.0.1, for
# trying `launch/submit.sh`. Only this machine can reach it, and no other node can join it.
#
#   launch/local_cluster.sh start     # start the head (generates ~/.ray/auth_token if missing)
#   launch/local_cluster.sh status    # is it up? (ray status + the job list)
#   launch/local_cluster.sh stop      # stop exactly the processes this script started
#
# Settings (environment): DT_RAY_PORT (GCS, default 6379; the Ray client server, dashboard agent,
# runtime-env agent and metrics take the next five ports, so that two heads on one machine never
# share a port), DT_DASHBOARD_PORT (Jobs API/dashboard, default 8265), DT_NUM_CPUS (default: all
# cores), DT_RAY_TEMP_DIR (Ray session files, default /tmp/dt_ray_<port>), DT_CLUSTER_STATE (pid and
# log files, default ~/.cache/dist_tempnet/ray-<port>), DT_START_TIMEOUT (seconds, default 180).
# Needs curl (readiness check).
#
# Exposure: `ray start --node-ip-address 127.0.0.1` alone is not enough, because Ray swaps a loopback
# node IP for the machine's routable one, and the GCS, raylet, agents and client server bind to the
# node IP. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (Ray's single-node mode, the default on macOS)
# keeps 127.0.0.1. Everything the script writes is private to the user (umask 077): the token file
# is 0600, and Ray's session files (whose folders Ray makes world-writable) sit in a 0700 folder.
#
# The head runs as `ray start --block` in its own process group, so `stop` signals that group
# only and leaves any other Ray on this machine alone (`ray stop` would kill every Ray of the user).
set -euo pipefail

port="${DT_RAY_PORT:-6379}"
dashboard_port="${DT_DASHBOARD_PORT:-8265}"
num_cpus="${DT_NUM_CPUS:-$(nproc)}"
temp_dir="${DT_RAY_TEMP_DIR:-/tmp/dt_ray_${port}}"
state="${DT_CLUSTER_STATE:-${XDG_CACHE_HOME:-$HOME/.cache}/dist_tempnet/ray-${port}}"
pid_file="$state/head.pid"
log_file="$state/head.log"
address="http://127.0.0.1:${dashboard_port}"

# Token auth everywhere: the head, its job drivers (they inherit this environment) and clients.
export RAY_AUTH_MODE=token
# Keep the node IP 127.0.0.1 (see the top of this file), for the head and the jobs it runs.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Files and folders this script and the head create are the user's only (logs, token, job files).
umask 077

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

find_ray() {
    if command -v ray >/dev/null 2>&1; then command -v ray; return; fi
    local repo_ray
    repo_ray="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin/ray"
    [[ -x "$repo_ray" ]] || die "'ray' not found: activate the project's virtual environment (ray[default] is needed)"
    echo "$repo_ray"
}

head_pid() {
    [[ -f "$pid_file" ]] || return 1
    local pid
    pid="$(cat "$pid_file")"
    kill -0 "$pid" 2>/dev/null || return 1
    echo "$pid"
}

ensure_token() {
    # RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH win over the file; only generate when there is nothing.
    local file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
    if [[ -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" && ! -s "$file" ]]; then
        "$RAY" get-auth-token --generate >/dev/null
        echo "generated a Ray auth token in $file"
    fi
    # Whoever reads the token controls the cluster: owner-only, also for a token file made earlier.
    if [[ -f "$file" && -O "$file" && -n "$(find "$file" -perm /077)" ]]; then
        chmod 600 "$file"
        echo "made $file readable by you only (mode 0600)"
    fi
}

private_temp_dir() {
    # Ray makes its temp dir and session folders world-writable (0777): put them in a folder only
    # we can enter. It must be ours: a folder someone else created there could be swapped under us.
    mkdir -p "$temp_dir"
    [[ -O "$temp_dir" && ! -L "$temp_dir" ]] || die "$temp_dir is not owned by you: choose DT_RAY_TEMP_DIR"
    chmod 700 "$temp_dir"
}

auth_header() {
    # `ray get-auth-token` resolves RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH and ~/.ray/auth_token like Ray does.
    echo "Authorization: Bearer $("$RAY" get-auth-token 2>/dev/null)"
}

wait_for_jobs_api() {
    local deadline=$((SECONDS + ${DT_START_TIMEOUT:-180})) header
    header="$(auth_header)"
    until curl -fsS -o /dev/null -H "$header" "$address/api/version" 2>/dev/null; do
        if ! head_pid >/dev/null; then
            tail -n 40 "$log_file" >&2 || true
            echo "local_cluster.sh: the Ray head exited during startup (log: $log_file)" >&2
            return 1
        fi
        if (( SECONDS >= deadline )); then
            echo "local_cluster.sh: the Jobs API at $address did not come up (log: $log_file)" >&2
            return 1
        fi
        sleep 1
    done
}

start() {
    if pid="$(head_pid)"; then
        echo "a head started by this script is already running (pid $pid, $address)"
        return
    fi
    local p
    for p in "$port" "$dashboard_port"; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            die "port $p on 127.0.0.1 is already in use (another Ray?): choose DT_RAY_PORT / DT_DASHBOARD_PORT"
        fi
    done
    mkdir -p "$state"
    ensure_token
    private_temp_dir
    # setsid: the head and everything it spawns share a new process group we can stop as a unit.
    # No drain wait on SIGTERM: a local head serves no traffic that needs draining.
    RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 setsid "$RAY" start --head --block \
        --node-ip-address 127.0.0.1 --port "$port" \
        --dashboard-host 127.0.0.1 --dashboard-port "$dashboard_port" --include-dashboard true \
        --num-cpus "$num_cpus" --temp-dir "$temp_dir/ray" --disable-usage-stats \
        --ray-client-server-port "$((port + 1))" --dashboard-agent-listen-port "$((port + 2))" \
        --dashboard-agent-grpc-port "$((port + 3))" --runtime-env-agent-port "$((port + 4))" \
        --metrics-export-port "$((port + 5))" \
        >"$log_file" 2>&1 < /dev/null &
    echo $! >"$pid_file"
    if ! wait_for_jobs_api || ! head_pid >/dev/null; then
        stop >/dev/null  # leave nothing half-started behind
        exit 1
    fi
    echo "Ray head up: GCS 127.0.0.1:$port, Jobs API $address, $num_cpus CPUs, token auth on"
    echo "use it with:  launch/submit.sh --address $address -- dist-tempnet train ..."
}

wait_for_exit() {
    # wait_for_exit SECONDS PID | wait_for_exit SECONDS -g PGID
    local seconds="$1"; shift
    for _ in $(seq 1 "$seconds"); do
        if [[ "$1" == "-g" ]]; then
            pgrep -g "$2" >/dev/null 2>&1 || return 0
        else
            kill -0 "$1" 2>/dev/null || return 0
        fi
        sleep 1
    done
}

stop() {
    local pid
    pid="$(cat "$pid_file" 2>/dev/null || true)"
    # The head may have died and left processes of its group behind: those are stopped too.
    if [[ -z "$pid" ]] || ! { kill -0 "$pid" 2>/dev/null || pgrep -g "$pid" >/dev/null 2>&1; }; then
        rm -f "$pid_file"
        echo "no head started by this script is running"
        return
    fi
    # `ray start --block` tears down the processes it started on SIGTERM; the group id is its pid
    # (setsid made it a group leader), so whatever is left afterwards can be killed as a group.
    kill -TERM "$pid" 2>/dev/null || true
    wait_for_exit 30 "$pid"
    # Agents whose raylet is gone linger; they are ours (same group): TERM, then KILL.
    if pgrep -g "$pid" >/dev/null 2>&1; then
        kill -TERM -- "-$pid" 2>/dev/null || true
        wait_for_exit 5 "-g" "$pid"
    fi
    if pgrep -g "$pid" >/dev/null 2>&1; then
        echo "still running after SIGTERM: $(pgrep -g "$pid" -d ' ' -l | head -c 300); sending SIGKILL" >&2
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$pid_file"
    echo "Ray head stopped (process group $pid)"
}

status() {
    local pid
    if ! pid="$(head_pid)"; then
        echo "not running"
        return 1
    fi
    echo "running: pid $pid, GCS 127.0.0.1:$port, Jobs API $address"
    "$RAY" status --address "127.0.0.1:$port" || true
    RAY_ADDRESS="$address" "$RAY" job list 2>/dev/null || true
}

RAY="$(find_ray)"
case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
