#!/bin/sh
# What containers that trace themselves in a loop cost the supervisor (README, "Security": "A
# process cannot make the supervisor its debugger"): each of P processes calls PTRACE_TRACEME and
# signals itself, again and again, for S seconds; every stop is a let-go by the supervisor, held
# to a pace after a process's first 16 (TraceeLetGoPace). Prints, for each P, the stops made and
# the supervisor's CPU (user + system, from /proc) over the run, per second and per stop.
#
#   bench/tracee-loop.sh [path/to/holdfast]     (as root, with python3)
#   PROCS="1 20" SECONDS_EACH=10 by default
set -e
H=${1:-.build/release/holdfast}
PROCS=${PROCS:-1 20}
S=${SECONDS_EACH:-10}
. "$(dirname "$0")/dev-daemon.sh"
for p in $PROCS; do
    before=$(ticks)
    i=0
    pids=""
    while [ $i -lt "$p" ]; do
        "$H" host run --id "loop-$p-$i" -- python3 -c "
import ctypes, os, signal, time
libc = ctypes.CDLL(None)
signal.signal(signal.SIGUSR1, lambda *_: None)
rounds = 0
end = time.monotonic() + $S
while time.monotonic() < end:
    libc.ptrace(0, 0, None, None)  # PTRACE_TRACEME
    os.kill(os.getpid(), signal.SIGUSR1)
    rounds += 1
print(rounds)
" > "$HOLDFAST_RUN_DIR/rounds-$p-$i" &
        pids="$pids $!"
        i=$((i + 1))
    done
    wait $pids
    after=$(ticks)
    stops=$(cat "$HOLDFAST_RUN_DIR"/rounds-$p-* | awk '{s += $1} END {print s}')
    awk -v p="$p" -v s="$S" -v n="$stops" -v b="$before" -v a="$after" -v hz="$(getconf CLK_TCK)" 'BEGIN {
        cpu = (a - b) / hz
        printf "%d process(es), %d s: %d stops (%.0f per second); supervisor CPU %.2f s (%.1f %% of a CPU, %.0f us per stop)\n",
            p, s, n, n / s, cpu, cpu / s * 100, (n > 0 ? cpu / n * 1e6 : 0)
    }'
done
echo "log lines about it: $(grep -c 'tracee\|its tracer' "$HOLDFAST_RUN_DIR/daemon.out" || true)"
