#!/usr/bin/env bash
# Start an OpenAI-compatible model server in the background and wait until it answers /health.
#
#   bash evaluation/launch_sglang_server.sh MODEL [PORT] [DP] [TP] [MEM_FRACTION] [-- EXTRA SERVER FLAGS]
#   bash evaluation/launch_sglang_server.sh FreedomIntelligence/HuatuoGPT-o1-8B 30000 1 1 0.8
#   bash evaluation/launch_sglang_server.sh --backend vllm FreedomIntelligence/HuatuoGPT-o1-8B 30000 2 1
#   bash evaluation/launch_sglang_server.sh --backend transformers tiny_models/policy 30000   # CPU, no GPU
#
# Options (before MODEL):
#   --backend sglang|vllm|transformers   server to run (default sglang)
#   --run_dir DIR     where the log and pid files go (default $HUATUO_RUN_DIR or evaluation/logs)
#   --timeout SEC     how long to wait for /health (default 1800: a 70B model takes minutes to load)
#   --host HOST       address to listen on (default 127.0.0.1)
#
# Defaults: PORT 30000 (eval.py's default --port), DP 1, TP 1, MEM_FRACTION 0.8. DP/TP/MEM_FRACTION
# map to --dp/--tp/--mem-fraction-static (sglang) and --data-parallel-size/--tensor-parallel-size/
# --gpu-memory-utilization (vllm; on a CPU vLLM's KV cache takes $VLLM_CPU_KVCACHE_SPACE GiB, default 2
# here). The transformers backend, the fallback where vLLM is not installed, serves one copy on the CPU
# (or the GPU when present) in bf16 where the device supports it ($HUATUO_SERVE_DTYPE overrides:
# float32, bfloat16, auto), and ignores them. Flags after `--` go to the server unchanged.
#
# The server runs in a process group of its own, recorded in RUN_DIR/server_PORT.pid, so that
# kill_sglang_server.sh stops it and everything it spawned, and nothing else. Its output goes to
# RUN_DIR/server_PORT.log. On failure the script prints the log's tail and exits non-zero.
set -euo pipefail

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }
# Field N (1-based, as in proc(5)) of /proc/PID/stat; the command name in field 2 may hold spaces.
stat_field() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f$(($2 - 2)); }
# A dead child stays a zombie until this shell exits, and kill -0 still succeeds on a zombie.
alive() { local state; state=$(stat_field "$1" 3); [[ -n "$state" && "$state" != Z ]]; }

backend=sglang
run_dir="${HUATUO_RUN_DIR:-evaluation/logs}"
timeout=1800
host=127.0.0.1
positional=()
extra=()
while (($#)); do
    case "$1" in
        --backend) backend="$2"; shift 2 ;;
        --run_dir) run_dir="$2"; shift 2 ;;
        --timeout) timeout="$2"; shift 2 ;;
        --host) host="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        -*) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) positional+=("$1"); shift ;;
    esac
done
if ((${#positional[@]} < 1 || ${#positional[@]} > 5)); then
    echo "error: expected MODEL [PORT] [DP] [TP] [MEM_FRACTION]" >&2
    usage >&2
    exit 2
fi
model="${positional[0]}"
port="${positional[1]:-30000}"
dp="${positional[2]:-1}"
tp="${positional[3]:-1}"
mem="${positional[4]:-0.8}"
[[ "$port" =~ ^[0-9]+$ ]] || { echo "error: PORT must be a number, got '$port'" >&2; exit 2; }

case "$backend" in
    sglang)
        cmd=(python -m sglang.launch_server --model-path "$model" --host "$host" --port "$port"
            --mem-fraction-static "$mem" --dp "$dp" --tp "$tp") ;;
    vllm)
        # The module, not the `vllm` console script: the CPU build's distribution is named vllm-cpu, and the
        # script looks up `vllm` and exits with PackageNotFoundError.
        cmd=(python -m vllm.entrypoints.openai.api_server --model "$model" --host "$host" --port "$port"
            --data-parallel-size "$dp" --tensor-parallel-size "$tp")
        if command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; then
            cmd+=(--gpu-memory-utilization "$mem")
        else
            # On a CPU the KV cache is a fixed share of RAM in GiB (vLLM's default, 4, is more than a small
            # model needs), and vLLM keeps one core for its API server unless told otherwise.
            export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
        fi ;;
    transformers)
        if [[ "$dp" != 1 || "$tp" != 1 ]]; then
            echo "note: the transformers backend serves a single copy; DP=$dp TP=$tp ignored" >&2
        fi
        # bf16 where the device computes it natively (a bf16 GPU, or a CPU with AVX512-BF16 or AMX), unless
        # HUATUO_SERVE_DTYPE says otherwise (float32 opts out). No --continuous-batching: in transformers
        # 5.17 a chat request under it never answers on a CPU.
        dtype="${HUATUO_SERVE_DTYPE:-$(PYTHONPATH="$(dirname "$0")/.." python -c \
            'from huatuo.models import bf16_supported; print("bfloat16" if bf16_supported() else "auto")')}"
        # Passing MODEL pins the server to it: it is loaded before /health answers, as with sglang.
        cmd=(transformers serve "$model" --host "$host" --port "$port" --dtype "$dtype") ;;
    *) echo "error: --backend must be sglang, vllm or transformers, got '$backend'" >&2; exit 2 ;;
esac
cmd+=("${extra[@]}")

mkdir -p "$run_dir"
pid_file="$run_dir/server_$port.pid"
log_file="$run_dir/server_$port.log"
url="http://$host:$port/health"

if [[ -f "$pid_file" ]]; then
    read -r old_pgid old_start _ < "$pid_file" || true
    if [[ "${old_pgid:-}" =~ ^[0-9]+$ ]] && alive "$old_pgid" && [[ "$(stat_field "$old_pgid" 22)" == "${old_start:-}" ]]; then
        echo "error: a server started by this script is already running on port $port (process group" \
            "$old_pgid); stop it with: bash evaluation/kill_sglang_server.sh --run_dir $run_dir $port" >&2
        exit 1
    fi
    rm -f "$pid_file"
fi
if curl -s -o /dev/null --max-time 2 "http://$host:$port/"; then
    echo "error: port $port is already in use by another program" >&2
    exit 1
fi

# setsid makes the server the leader of a new process group (its pid is the group id), so every
# worker it forks or spawns can be stopped together without matching command lines.
setsid "${cmd[@]}" > "$log_file" 2>&1 < /dev/null &
pgid=$!
# Start time (clock ticks since boot) guards the kill script against a recycled pid.
start_ticks=$(stat_field "$pgid" 22)
printf '%s %s %s %s\n' "$pgid" "$start_ticks" "$port" "$backend" > "$pid_file"
echo "started $backend (process group $pgid) on port $port; log: $log_file"

deadline=$((SECONDS + timeout))
until curl -sf -o /dev/null --max-time 5 "$url"; do
    if ! alive "$pgid"; then
        echo "error: the server exited before answering $url; last lines of $log_file:" >&2
        tail -n 40 "$log_file" >&2
        rm -f "$pid_file"
        exit 1
    fi
    if ((SECONDS >= deadline)); then
        echo "error: no answer from $url after ${timeout}s; last lines of $log_file:" >&2
        tail -n 40 "$log_file" >&2
        echo "the server is still running; stop it with: bash evaluation/kill_sglang_server.sh --run_dir $run_dir $port" >&2
        exit 1
    fi
    sleep 1
done
echo "ready: http://$host:$port/v1 serves $model"
