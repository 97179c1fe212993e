#!/usr/bin/env bash
# Single-stream relay throughput: producer -> pipe -> RELAY -> Unix socket -> sink, for three
# relays with the same producer and sink: the C read/write loop, socat -b 131072, and holdfast.
# Usage: bench/run.sh HOLDFAST_BINARY   (BENCH_BYTES, BENCH_RUNS override the defaults)
set -euo pipefail
holdfast=${1:?usage: bench/run.sh path/to/holdfast}
here=$(cd "$(dirname "$0")" && pwd)
bin=$here/bin
bytes=${BENCH_BYTES:-4294967296}
runs=${BENCH_RUNS:-5}
work=$(mktemp -d /tmp/holdfast-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
sock=$work/sink.sock

mkdir -p "$bin"
for tool in producer sink relay; do
    cc -O2 -Wall -o "$bin/$tool" "$here/$tool.c"
done

# One timed run of a relay command; prints seconds. The sink is started first and waited for by pid.
one_run() {
    local relay_cmd=$1
    rm -f "$sock"
    "$bin/sink" "$sock" > "$work/sink.out" &
    local sink_pid=$!
    for _ in $(seq 1 200); do [[ -S $sock ]] && break; sleep 0.01; done
    local start end
    start=$(date +%s.%N)
    "$bin/producer" "$bytes" | eval "$relay_cmd"
    wait "$sink_pid"
    end=$(date +%s.%N)
    local got
    got=$(cat "$work/sink.out")
    if [[ $got != "$bytes" ]]; then echo "sink received $got of $bytes bytes" >&2; exit 1; fi
    echo "$end - $start" | bc -l
}

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

declare -A gbps
names=("C read/write loop" "socat -b 131072" "holdfast pipe")
cmds=("\"$bin/relay\" \"$sock\""
      "socat -b 131072 -u - UNIX-CONNECT:\"$sock\""
      "\"$holdfast\" pipe --to unix:\"$sock\"")
for i in 0 1 2; do
    times=()
    for _ in $(seq 1 "$runs"); do times+=("$(one_run "${cmds[$i]}")"); done
    m=$(printf '%s\n' "${times[@]}" | median)
    gbps[$i]=$(echo "$bytes / $m / 1000000000" | bc -l)
done

printf '\nsingle stream, %s bytes, median of %s runs\n' "$bytes" "$runs"
printf '%-22s %10s %14s\n' relay GB/s "vs holdfast"
for i in 0 1 2; do
    printf '%-22s %10.2f %13.2fx\n' "${names[$i]}" "${gbps[$i]}" "$(echo "${gbps[2]} / ${gbps[$i]}" | bc -l)"
done
printf '\nholdfast / socat = %.2f (target >= 1.0); holdfast / C loop = %.2f (target >= 0.8)\n' \
    "$(echo "${gbps[2]} / ${gbps[1]}" | bc -l)" "$(echo "${gbps[2]} / ${gbps[0]}" | bc -l)"
