#!/usr/bin/env bash
# Single-stream relay cost and throughput: producer -> pipe -> RELAY -> Unix socket -> SINK.
#
# For each run: the wall time from the producer's start to the sink's exit, and the CPU time
# (user + system, every thread, from wait4's rusage: bench/cputime.c) of the relay and of the
# sink, reported as seconds per GiB moved. Every row runs once per repetition, round-robin, so
# drift in the machine's speed hits all rows alike; BENCH_RUNS repetitions, medians printed.
#
# Rows, for each pipe size: a splice(2) loop (the limit: the bytes never enter the relay), the
# C read/write loop, socat, holdfast pipe in raw mode (all four to the C sink), and holdfast pipe
# in resumable mode to holdfast receive (whose CPU is the host's receiving side, set against the
# C sink's). Then the floors of a reactor, the way Holdfast waits (epoll_wait, then non-blocking
# I/O) done in C: two receivers fed by the C loop like the C sink — a C sink waiting in epoll_wait
# (bench/epoll-sink.c) and holdfast receive in raw mode (Holdfast's reactor, no protocol on top) —
# and the splice loop waiting in epoll_wait (bench/epoll-splice.c), raw mode's floor.
# Pipe sizes: 1 MiB, what the daemon gives a container's stdout (the production data path), and
# 64 KiB, the kernel's default (a shell's pipe); the targets are judged at both.
#
# Usage: bench/run.sh HOLDFAST_BINARY [RESULTS_FILE]
#   BENCH_BYTES (2 GiB), BENCH_RUNS (7), BENCH_PIPE_SIZES ("1048576 65536") override the
#   conditions; BENCH_BASELINE (an older holdfast binary) adds its two rows, for before/after.
#   RESULTS_FILE receives key=value lines of the first pipe size's figures (make bench hands the
#   resumable relay's CPU per GiB to the scale benchmark, for its ratio).
set -euo pipefail
holdfast=${1:?usage: bench/run.sh path/to/holdfast [results-file]}
results=${2:-}
here=$(cd "$(dirname "$0")" && pwd)
bin=$here/bin
bytes=${BENCH_BYTES:-2147483648}
runs=${BENCH_RUNS:-7}
read -r -a pipe_sizes <<< "${BENCH_PIPE_SIZES:-1048576 65536}"
work=$(mktemp -d /tmp/holdfast-bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
sock=$work/sink.sock

mkdir -p "$bin"
for tool in producer sink epoll-sink relay splice epoll-splice cputime; do
    cc -O2 -Wall -o "$bin/$tool" "$here/$tool.c"
done

# One run; prints "WALL RELAY_CPU SINK_CPU" in seconds. The sink is started first, waited for by
# pid, and must report (C sink, holdfast receive --count) exactly the bytes sent.
one_run() {
    local pipe_size=$1 sink_cmd=$2 relay_cmd=$3
    rm -f "$sock" "$work/relay.cpu" "$work/sink.cpu"
    eval "\"$bin/cputime\" \"$work/sink.cpu\" $sink_cmd" > "$work/sink.out" &
    local sink_pid=$!
    for _ in $(seq 1 500); do [[ -S $sock ]] && break; sleep 0.01; done
    local start end
    start=$(date +%s.%N)
    "$bin/producer" "$bytes" "$pipe_size" | eval "\"$bin/cputime\" \"$work/relay.cpu\" $relay_cmd"
    wait "$sink_pid"
    end=$(date +%s.%N)
    local got
    got=$(tr -d ' ' < "$work/sink.out")
    if [[ $got != "$bytes" ]]; then echo "sink received $got of $bytes bytes" >&2; exit 1; fi
    echo "$(echo "$end - $start" | bc -l) $(awk '{print $1 + $2}' "$work/relay.cpu") $(awk '{print $1 + $2}' "$work/sink.cpu")"
}

median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

c_sink="\"$bin/sink\" \"$sock\""
key=$work/stream.key  # the resumable stream's secret: holdfast receive makes it, holdfast pipe reads it
hf_sink="\"$holdfast\" receive --count --mode resumable --listen unix:\"$sock\" --secret-file \"$key\""
names=("splice(2) loop (the limit)" "C read/write loop" "socat -b 131072" "holdfast pipe, raw"
       "holdfast pipe, resumable")
sink_names=("C sink" "C sink" "C sink" "C sink" "holdfast receive")
sinks=("$c_sink" "$c_sink" "$c_sink" "$c_sink" "$hf_sink")
relays=("\"$bin/splice\" \"$sock\""
        "\"$bin/relay\" \"$sock\""
        "socat -b 131072 -u - UNIX-CONNECT:\"$sock\""
        "\"$holdfast\" pipe --to unix:\"$sock\""
        "\"$holdfast\" pipe --mode resumable --to unix:\"$sock\" --secret-file \"$key\"")
# The receivers' floor: the C loop feeding a reactor-style C sink, and holdfast receive in raw mode.
names+=("C read/write loop" "C read/write loop")
sink_names+=("C epoll sink" "holdfast receive, raw")
sinks+=("\"$bin/epoll-sink\" \"$sock\"" "\"$holdfast\" receive --count --listen unix:\"$sock\"")
relays+=("\"$bin/relay\" \"$sock\"" "\"$bin/relay\" \"$sock\"")
# Raw mode's floor: the splice loop waiting in epoll_wait.
names+=("splice(2) loop, epoll")
sink_names+=("C sink")
sinks+=("$c_sink")
relays+=("\"$bin/epoll-splice\" \"$sock\"")
# Before and after: BENCH_BASELINE=path/to/an/older/holdfast adds its raw and resumable rows,
# interleaved with the rest (a binary from before stream secrets runs without a secret file).
if [[ -n ${BENCH_BASELINE:-} ]]; then
    base_secret=""
    if "$BENCH_BASELINE" pipe --help 2>&1 | grep -q -- --secret-file; then base_secret=" --secret-file \"$key\""; fi
    names+=("baseline pipe, raw" "baseline pipe, resumable")
    sink_names+=("C sink" "baseline receive")
    sinks+=("$c_sink" "\"$BENCH_BASELINE\" receive --count --mode resumable --listen unix:\"$sock\"$base_secret")
    relays+=("\"$BENCH_BASELINE\" pipe --to unix:\"$sock\""
             "\"$BENCH_BASELINE\" pipe --mode resumable --to unix:\"$sock\"$base_secret")
fi
declare -A walls relay_cpus sink_cpus
for r in $(seq 1 "$runs"); do
    for pipe_size in "${pipe_sizes[@]}"; do
        for i in "${!names[@]}"; do
            read -r wall relay_cpu sink_cpu < <(one_run "$pipe_size" "${sinks[$i]}" "${relays[$i]}")
            walls[$pipe_size,$i]+="$wall "
            relay_cpus[$pipe_size,$i]+="$relay_cpu "
            sink_cpus[$pipe_size,$i]+="$sink_cpu "
        done
    done
    echo "run $r of $runs done" >&2
done

gib=$(echo "$bytes / 1073741824" | bc -l)
ratio() { echo "$1 / $2" | bc -l; }
judge() {  # judge NAME VALUE OP LIMIT
    local verdict
    verdict=$(echo "$2 $3 $4" | bc -l)
    printf '%-56s %5.2f  (target %s %s) %s\n' "$1" "$2" "$3" "$4" "$([[ $verdict == 1 ]] && echo ok || echo MISS)"
}
for pipe_size in "${pipe_sizes[@]}"; do
    declare -a gbps=() relay_per_gib=() sink_per_gib=()
    for i in "${!names[@]}"; do
        gbps[$i]=$(echo "$bytes / $(printf '%s\n' ${walls[$pipe_size,$i]} | median) / 1000000000" | bc -l)
        relay_per_gib[$i]=$(echo "$(printf '%s\n' ${relay_cpus[$pipe_size,$i]} | median) / $gib" | bc -l)
        sink_per_gib[$i]=$(echo "$(printf '%s\n' ${sink_cpus[$pipe_size,$i]} | median) / $gib" | bc -l)
    done
    printf '\nsingle stream, pipe of %s bytes: %s bytes per run, median of %s interleaved runs\n' "$pipe_size" "$bytes" "$runs"
    printf '| %-28s | %-21s | %6s | %18s | %17s |\n' "relay" "sink" "GB/s" "relay CPU s / GiB" "sink CPU s / GiB"
    printf '|%s|%s|%s|%s|%s|\n' "------------------------------" "-----------------------" "-------:" "-------------------:" "------------------:"
    for i in "${!names[@]}"; do
        printf '| %-28s | %-21s | %6.2f | %18.3f | %17.3f |\n' "${names[$i]}" "${sink_names[$i]}" "${gbps[$i]}" \
            "${relay_per_gib[$i]}" "${sink_per_gib[$i]}"
    done
    echo
    judge "raw: relay CPU per GiB / the splice loop's" "$(ratio "${relay_per_gib[3]}" "${relay_per_gib[0]}")" "<=" 1.2
    judge "raw: throughput / the C loop's" "$(ratio "${gbps[3]}" "${gbps[1]}")" ">=" 1.0
    judge "resumable: relay CPU per GiB / the C loop's" "$(ratio "${relay_per_gib[4]}" "${relay_per_gib[1]}")" "<=" 1.3
    judge "resumable: throughput / raw's" "$(ratio "${gbps[4]}" "${gbps[3]}")" ">=" 0.9
    judge "resumable: holdfast receive CPU per GiB / the C sink's" "$(ratio "${sink_per_gib[4]}" "${sink_per_gib[1]}")" "<=" 1.3
    printf '%-56s %5.2f  (no target)\n' "raw: relay CPU per GiB / socat's" "$(ratio "${relay_per_gib[3]}" "${relay_per_gib[2]}")"
    printf '%-56s %5.2f  (no target: waiting in epoll_wait)\n' "receiving: C epoll sink CPU per GiB / the C sink's" \
        "$(ratio "${sink_per_gib[5]}" "${sink_per_gib[1]}")"
    printf '%-56s %5.2f  (no target: the reactor, no protocol)\n' "receiving: holdfast receive, raw / the C sink's" \
        "$(ratio "${sink_per_gib[6]}" "${sink_per_gib[1]}")"
    printf '%-56s %5.2f  (no target: waiting in epoll_wait)\n' "splice: the epoll splice loop's CPU / the splice loop's" \
        "$(ratio "${relay_per_gib[7]}" "${relay_per_gib[0]}")"
    printf '%-56s %5.2f  (no target)\n' "raw: relay CPU per GiB / the epoll splice loop's" \
        "$(ratio "${relay_per_gib[3]}" "${relay_per_gib[7]}")"
    if [[ -n $results && $pipe_size == "${pipe_sizes[0]}" ]]; then
        mkdir -p "$(dirname "$results")"
        {
            echo "pipe_size=$pipe_size"
            printf 'resumable_relay_cpu_per_gib=%.4f\n' "${relay_per_gib[4]}"
            printf 'raw_relay_cpu_per_gib=%.4f\n' "${relay_per_gib[3]}"
        } > "$results"
    fi
done
