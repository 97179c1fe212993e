#!/usr/bin/env bash
# Single-stream relay throughput: producer -> pipe -> RELAY -> Unix socket -> SINK.
#  1. against other relays, same producer and C sink: the C read/write loop, socat -b 131072,
#     and holdfast pipe (raw mode);
#  2. raw against resumable mode, both with holdfast receive as the sink (the resumable sink must
#     speak the protocol, so both use it for a fair comparison).
# Usage: bench/run.sh HOLDFAST_BINARY   (BENCH_BYTES, BENCH_RUNS override size and repetitions)
set -euo pipefail
holdfast=${1:?usage: bench/run.sh path/to/holdfast}
here=$(cd "$(dirname "$0")" && pwd)
bin=$here/bin
bytes=${BENCH_BYTES:-2147483648}
runs=${BENCH_RUNS:-7}
work=$(mktemp -d /tmp/holdfast-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
sock=$work/sink.sock

mkdir -p "$bin"
for tool in producer sink relay; do
    cc -O2 -Wall -o "$bin/$tool" "$here/$tool.c"
done

# One timed run; prints seconds. The sink is started first, waited for by pid, and must report
# (C sink, holdfast receive --count) exactly the bytes sent.
one_run() {
    local sink_cmd=$1 relay_cmd=$2
    rm -f "$sock"
    eval "$sink_cmd" > "$work/sink.out" &
    local sink_pid=$!
    for _ in $(seq 1 500); do [[ -S $sock ]] && break; sleep 0.01; done
    local start end
    start=$(date +%s.%N)
    "$bin/producer" "$bytes" | eval "$relay_cmd"
    wait "$sink_pid"
    end=$(date +%s.%N)
    local got
    got=$(tr -d ' ' < "$work/sink.out")
    if [[ $got != "$bytes" ]]; then echo "sink received $got of $bytes bytes" >&2; exit 1; fi
    echo "$end - $start" | bc -l
}

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

c_sink="\"$bin/sink\" \"$sock\""
hf_sink_raw="\"$holdfast\" receive --count --listen unix:\"$sock\""
hf_sink_res="\"$holdfast\" receive --count --mode resumable --listen unix:\"$sock\""
names=("C read/write loop" "socat -b 131072" "holdfast pipe (raw)"
       "holdfast raw -> holdfast receive" "holdfast resumable -> holdfast receive")
sinks=("$c_sink" "$c_sink" "$c_sink" "$hf_sink_raw" "$hf_sink_res")
relays=("\"$bin/relay\" \"$sock\""
        "socat -b 131072 -u - UNIX-CONNECT:\"$sock\""
        "\"$holdfast\" pipe --to unix:\"$sock\""
        "\"$holdfast\" pipe --to unix:\"$sock\""
        "\"$holdfast\" pipe --mode resumable --to unix:\"$sock\"")
# Round-robin: each repetition runs every configuration once, so drift in the machine's speed
# (a shared VM) hits all of them alike; the median of each is reported.
declare -a gbps
declare -A times
for r in $(seq 1 "$runs"); do
    for i in "${!names[@]}"; do
        times[$i]+="$(one_run "${sinks[$i]}" "${relays[$i]}") "
    done
done
for i in "${!names[@]}"; do
    m=$(printf '%s\n' ${times[$i]} | median)
    gbps[$i]=$(echo "$bytes / $m / 1000000000" | bc -l)
done

printf '\nsingle stream, %s bytes per run, median of %s runs\n' "$bytes" "$runs"
printf '%-40s %8s\n' "relay -> sink" "GB/s"
for i in "${!names[@]}"; do printf '%-40s %8.2f\n' "${names[$i]}" "${gbps[$i]}"; done
ratio() { echo "$1 / $2" | bc -l; }
printf '\nholdfast raw / socat       = %.2f  (target >= 1.0)\n' "$(ratio "${gbps[2]}" "${gbps[1]}")"
printf 'holdfast raw / C loop      = %.2f  (target >= 0.8)\n' "$(ratio "${gbps[2]}" "${gbps[0]}")"
printf 'resumable / raw, same sink = %.2f  (target >= 0.9)\n' "$(ratio "${gbps[4]}" "${gbps[3]}")"
