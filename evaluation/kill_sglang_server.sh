#!/usr/bin/env bash
# Stop the server(s) that launch_sglang_server.sh started, and nothing else.
#
#   bash evaluation/kill_sglang_server.sh            # every server recorded in the run dir
#   bash evaluation/kill_sglang_server.sh 30000      # only the one on port 30000
#
# Options: --run_dir DIR (default $HUATUO_RUN_DIR or evaluation/logs, as for the launch script),
#          --grace SEC (seconds between SIGTERM and SIGKILL, default 30).
#
# Each server's process group id and start time are read from RUN_DIR/server_PORT.pid. The whole
# group is stopped (SGLang's data-parallel and tokenizer workers included), plus any descendant
# that moved to a group of its own; then the script waits until the port is free and GPU memory
# released, and removes the pid file. Processes it did not start are never matched by name, so
# another user's SGLang job on the same machine is left alone. Running it twice is harmless.
set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }
stat_field() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f$(($2 - 2)); }
alive() { local state; state=$(stat_field "$1" 3); [[ -n "$state" && "$state" != Z ]]; }

run_dir="${HUATUO_RUN_DIR:-evaluation/logs}"
grace=30
ports=()
while (($#)); do
    case "$1" in
        --run_dir) run_dir="$2"; shift 2 ;;
        --grace) grace="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) ports+=("$1"); shift ;;
    esac
done

# Members of process group $1 started no earlier than clock tick $2, and all their descendants.
our_processes() {
    local pgid=$1 since=$2 pid ppid group start
    local -A mine=()
    while read -r pid group; do
        [[ "$group" == "$pgid" ]] || continue
        start=$(stat_field "$pid" 22)
        [[ -n "$start" ]] && ((start >= since)) && mine[$pid]=1
    done < <(ps -e -o pid=,pgid=)
    local grew=1
    while ((grew)); do
        grew=0
        while read -r pid ppid; do
            if [[ -n "${mine[$ppid]:-}" && -z "${mine[$pid]:-}" ]]; then
                mine[$pid]=1
                grew=1
            fi
        done < <(ps -e -o pid=,ppid=)
    done
    for pid in "${!mine[@]}"; do alive "$pid" && echo "$pid"; done
    return 0
}

port_in_use() { [[ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]]; }

stop_one() {
    local pid_file=$1 pgid since port backend
    local -a pids
    read -r pgid since port backend < "$pid_file" || true
    if [[ ! "${pgid:-}" =~ ^[0-9]+$ || ! "${since:-}" =~ ^[0-9]+$ ]]; then
        echo "warning: $pid_file is not a pid file written by launch_sglang_server.sh; removing it" >&2
        rm -f "$pid_file"
        return
    fi
    mapfile -t pids < <(our_processes "$pgid" "$since")
    if ((${#pids[@]} == 0)); then
        echo "$backend server on port $port (process group $pgid) is not running"
    else
        echo "stopping $backend server on port $port: ${#pids[@]} process(es) in group $pgid"
        kill -TERM "${pids[@]}" 2>/dev/null || true
        local deadline=$((SECONDS + grace))
        while ((SECONDS < deadline)); do
            mapfile -t pids < <(our_processes "$pgid" "$since")
            ((${#pids[@]} == 0)) && break
            sleep 0.5
        done
        mapfile -t pids < <(our_processes "$pgid" "$since")
        if ((${#pids[@]})); then
            echo "still running after ${grace}s, sending SIGKILL to: ${pids[*]}"
            kill -KILL "${pids[@]}" 2>/dev/null || true
            sleep 1
        fi
    fi
    local waited=0
    while port_in_use "$port" && ((waited < 20)); do
        sleep 0.5
        waited=$((waited + 1))
    done
    if port_in_use "$port"; then
        echo "warning: port $port is still in use, by a process this script did not start" >&2
    fi
    rm -f "$pid_file"
}

if ((${#ports[@]})); then
    files=()
    for port in "${ports[@]}"; do
        if [[ -f "$run_dir/server_$port.pid" ]]; then
            files+=("$run_dir/server_$port.pid")
        else
            echo "no server recorded on port $port in $run_dir (already stopped)"
        fi
    done
else
    shopt -s nullglob
    files=("$run_dir"/server_*.pid)
    ((${#files[@]})) || echo "no server recorded in $run_dir (already stopped)"
fi
for pid_file in "${files[@]}"; do
    stop_one "$pid_file"
done
