#!/usr/bin/env bash
# Syscalls per GiB of each relay, and of holdfast receive, over the single-stream path of
# bench/run.sh (producer -> pipe -> RELAY -> Unix socket -> SINK), counted with perf stat's
# syscall tracepoints: exact counts, steadier than CPU time on a shared machine.
#
# Usage: bench/syscalls.sh HOLDFAST_BINARY
#   SYSCALL_BYTES (512 MiB) per run, BENCH_PIPE_SIZES ("1048576 65536") and BENCH_BASELINE (an
#   older holdfast binary: its rows too) as in bench/run.sh.
#   Needs perf (linux-perf) and root (tracepoints); says so and exits 0 without them.
set -euo pipefail
holdfast=${1:?usage: bench/syscalls.sh path/to/holdfast}
here=$(cd "$(dirname "$0")" && pwd)
bin=$here/bin
bytes=${SYSCALL_BYTES:-536870912}
read -r -a pipe_sizes <<< "${BENCH_PIPE_SIZES:-1048576 65536}"
if ! command -v perf > /dev/null || ! perf stat -e 'syscalls:sys_enter_splice' true > /dev/null 2>&1; then
    echo "syscall counts skipped: needs perf and its syscall tracepoints (root)"
    exit 0
fi
work=$(mktemp -d /tmp/holdfast-syscalls.XXXXXX)
trap 'rm -rf "$work"' EXIT
sock=$work/sink.sock
key=$work/stream.key
mkdir -p "$bin"
for tool in producer sink relay splice; do
    cc -O2 -Wall -o "$bin/$tool" "$here/$tool.c"
done

columns=(splice "read+readv" "of which EAGAIN" "write+sendto+sendmsg" epoll_wait epoll_ctl poll futex "context switches")
events=splice,read,readv,write,sendto,sendmsg,epoll_wait,epoll_pwait,epoll_ctl,poll,futex
perf_events=$(printf 'syscalls:sys_enter_%s,' ${events//,/ })context-switches
# Reads that found nothing (EAGAIN, -11): the probes after a wake-up whose bytes were already taken.
perf_stat=(perf stat -x, -e "$perf_events" -e syscalls:sys_exit_read --filter 'ret == -11'
           -e syscalls:sys_exit_readv --filter 'ret == -11')

# Prints one table row from a perf stat -x, file: each column per GiB.
row() {
    local name=$1 file=$2
    awk -F, -v name="$name" -v gib="$(echo "$bytes / 1073741824" | bc -l)" '
        { sub(/^syscalls:sys_enter_/, "", $3); n[$3] = ($1 ~ /^[0-9]+$/) ? $1 : 0 }
        function f(x) { x = int(x / gib + 0.5); return x == 0 ? "" : x }
        END {
            printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", name, f(n["splice"]),
                f(n["read"] + n["readv"]), f(n["syscalls:sys_exit_read"] + n["syscalls:sys_exit_readv"]),
                f(n["write"] + n["sendto"] + n["sendmsg"]),
                f(n["epoll_wait"] + n["epoll_pwait"]), f(n["epoll_ctl"]), f(n["poll"]), f(n["futex"]),
                f(n["context-switches"])
        }' "$file"
}

# One run: the sink (optionally counted) first, then producer | relay (counted).
one_run() {
    local pipe_size=$1 sink_cmd=$2 relay_cmd=$3 count_sink=$4
    rm -f "$sock" "$work/relay.perf" "$work/sink.perf"
    if [[ $count_sink == yes ]]; then
        eval "${perf_stat[*]@Q} -o \"$work/sink.perf\" $sink_cmd" > "$work/sink.out" &
    else
        eval "$sink_cmd" > "$work/sink.out" &
    fi
    local sink_pid=$!
    for _ in $(seq 1 500); do [[ -S $sock ]] && break; sleep 0.01; done
    "$bin/producer" "$bytes" "$pipe_size" | eval "${perf_stat[*]@Q} -o \"$work/relay.perf\" $relay_cmd"
    wait "$sink_pid"
    local got
    got=$(tr -d ' ' < "$work/sink.out")
    if [[ $got != "$bytes" ]]; then echo "sink received $got of $bytes bytes" >&2; exit 1; fi
}

c_sink="\"$bin/sink\" \"$sock\""
hf_sink="\"$holdfast\" receive --count --mode resumable --listen unix:\"$sock\" --secret-file \"$key\""
for pipe_size in "${pipe_sizes[@]}"; do
    printf '\nsyscalls per GiB, pipe of %s bytes, %s bytes per run\n' "$pipe_size" "$bytes"
    printf '| relay |'; printf ' %s |' "${columns[@]}"; printf '\n|---|'; printf -- '---:|%.0s' "${columns[@]}"; echo
    one_run "$pipe_size" "$c_sink" "\"$bin/splice\" \"$sock\"" no
    row "splice(2) loop" "$work/relay.perf"
    one_run "$pipe_size" "$c_sink" "\"$bin/relay\" \"$sock\"" no
    row "C read/write loop" "$work/relay.perf"
    one_run "$pipe_size" "$c_sink" "\"$holdfast\" pipe --to unix:\"$sock\"" no
    row "holdfast pipe, raw" "$work/relay.perf"
    one_run "$pipe_size" "$hf_sink" "\"$holdfast\" pipe --mode resumable --to unix:\"$sock\" --secret-file \"$key\"" yes
    row "holdfast pipe, resumable" "$work/relay.perf"
    row "holdfast receive (its sink)" "$work/sink.perf"
    if [[ -n ${BENCH_BASELINE:-} ]]; then
        base_secret=""
        if "$BENCH_BASELINE" pipe --help 2>&1 | grep -q -- --secret-file; then base_secret=" --secret-file \"$key\""; fi
        one_run "$pipe_size" "$c_sink" "\"$BENCH_BASELINE\" pipe --to unix:\"$sock\"" no
        row "baseline pipe, raw" "$work/relay.perf"
        one_run "$pipe_size" "\"$BENCH_BASELINE\" receive --count --mode resumable --listen unix:\"$sock\"$base_secret" \
            "\"$BENCH_BASELINE\" pipe --mode resumable --to unix:\"$sock\"$base_secret" yes
        row "baseline pipe, resumable" "$work/relay.perf"
        row "baseline receive (its sink)" "$work/sink.perf"
    fi
done
