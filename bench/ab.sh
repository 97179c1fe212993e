#!/usr/bin/env bash
# Before/after for one change: two holdfast binaries, alternating run by run (ABBA...),
# producer -> pipe -> holdfast pipe -> Unix socket -> receiver. Resumable mode (the default): the
# receiver is holdfast receive --count from the same binary; raw mode (AB_MODE=raw): the C sink.
# Prints, per measure (wall time, the relay's CPU, the receiver's CPU), the medians of each binary
# and the median of the per-round ratios after / before with how many rounds came out better:
# pairing runs taken seconds apart cancels most of the machine's drift, which moves medians of
# separate runs by more than a small change.
#
# Usage: [AB_MODE=raw|resumable] bench/ab.sh BEFORE_BINARY AFTER_BINARY [ROUNDS (12)]
#        [PIPE_SIZE (65536)] [BYTES (2 GiB)]
set -euo pipefail
before=${1:?usage: bench/ab.sh BEFORE AFTER [ROUNDS] [PIPE_SIZE] [BYTES]}
after=${2:?usage: bench/ab.sh BEFORE AFTER [ROUNDS] [PIPE_SIZE] [BYTES]}
rounds=${3:-12}
pipe_size=${4:-65536}
bytes=${5:-2147483648}
mode=${AB_MODE:-resumable}
case $mode in raw|resumable) ;; *) echo "AB_MODE must be raw or resumable, not '$mode'" >&2; exit 2 ;; esac
here=$(cd "$(dirname "$0")" && pwd)
bin=$here/bin
work=$(mktemp -d /tmp/holdfast-ab.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$bin"
for tool in producer sink cputime; do
    cc -O2 -Wall -o "$bin/$tool" "$here/$tool.c"
done

# One run of BINARY; appends "ROUND WHICH WALL RELAY_CPU SINK_CPU" to the results.
one_run() {
    local round=$1 which=$2 holdfast=$3 run=$work/run
    rm -rf "$run"; mkdir "$run"
    if [[ $mode == raw ]]; then
        "$bin/cputime" "$run/sink.cpu" "$bin/sink" "$run/s" > "$run/out" &
    else
        "$bin/cputime" "$run/sink.cpu" "$holdfast" receive --count --mode resumable --listen "unix:$run/s" \
            --secret-file "$run/key" > "$run/out" &
    fi
    local sink_pid=$!
    for _ in $(seq 1 500); do [[ -S $run/s ]] && break; sleep 0.01; done
    local start end
    start=$(date +%s.%N)
    if [[ $mode == raw ]]; then
        "$bin/producer" "$bytes" "$pipe_size" | "$bin/cputime" "$run/relay.cpu" "$holdfast" pipe --to "unix:$run/s"
    else
        "$bin/producer" "$bytes" "$pipe_size" | "$bin/cputime" "$run/relay.cpu" "$holdfast" pipe --mode resumable \
            --to "unix:$run/s" --secret-file "$run/key"
    fi
    wait "$sink_pid"
    end=$(date +%s.%N)
    if [[ $(tr -d ' ' < "$run/out") != "$bytes" ]]; then echo "receiver got $(cat "$run/out") of $bytes bytes" >&2; exit 1; fi
    echo "$round $which $(echo "$end - $start" | bc -l) $(awk '{print $1 + $2}' "$run/relay.cpu") $(awk '{print $1 + $2}' "$run/sink.cpu")" >> "$work/results"
}

for round in $(seq 1 "$rounds"); do
    if (( round % 2 )); then one_run "$round" before "$before"; one_run "$round" after "$after"
    else one_run "$round" after "$after"; one_run "$round" before "$before"; fi
    echo "round $round of $rounds done" >&2
done

printf 'before: %s\nafter:  %s\n%s mode, %s rounds, pipe of %s bytes, %s bytes per run\n' "$before" "$after" "$mode" "$rounds" "$pipe_size" "$bytes"
awk -v gib="$(echo "$bytes / 1073741824" | bc -l)" '
    function median(list, count,   i, j, t) {
        for (i = 1; i <= count; i++) for (j = i + 1; j <= count; j++) if (list[j] < list[i]) { t = list[i]; list[i] = list[j]; list[j] = t }
        return count % 2 ? list[(count + 1) / 2] : (list[count / 2] + list[count / 2 + 1]) / 2
    }
    { v[$1, $2, 3] = $3; v[$1, $2, 4] = $4 / gib; v[$1, $2, 5] = $5 / gib; if ($1 > n) n = $1 }
    END {
        split("wall s per run|relay CPU s per GiB|receiver CPU s per GiB", label, "|")
        for (m = 3; m <= 5; m++) {
            delete b; delete a; delete r; better = 0
            for (i = 1; i <= n; i++) { b[i] = v[i, "before", m]; a[i] = v[i, "after", m]; r[i] = a[i] / b[i]; if (r[i] < 1) better++ }
            printf "%-24s before %.3f  after %.3f  paired after/before %.3f (after better in %d of %d)\n",
                label[m - 2], median(b, n), median(a, n), median(r, n), better, n
        }
    }' "$work/results"
