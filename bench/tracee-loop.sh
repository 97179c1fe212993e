#!/bin/sh
# What a container that traces itself in a loop costs the supervisor (README, "Security": "A
# process cannot make the supervisor its debugger"): a process calls PTRACE_TRACEME and signals
# itself N times; each stop is one let-go by the supervisor. Prints the supervisor's CPU seconds
# (user + system, from /proc) over the loop and the loop's wall time.
#
#   bench/tracee-loop.sh [path/to/holdfast]     (as root, with python3; N=20000 by default)
set -e
H=${1:-.build/release/holdfast}
N=${N:-20000}
export HOLDFAST_RUN_DIR=$(mktemp -d)
# The broker (its own uid) dials the host's stream socket in this directory.
chmod 755 "$HOLDFAST_RUN_DIR"
setsid "$H" host serve > "$HOLDFAST_RUN_DIR/serve.out" 2>&1 & SERVE=$!
sleep 1
setsid "$H" daemon --config config/holdfast-dev.yaml > "$HOLDFAST_RUN_DIR/daemon.out" 2>&1 & DAEMON=$!
trap 'kill $DAEMON 2>/dev/null; sleep 3; kill $SERVE 2>/dev/null; rm -rf "$HOLDFAST_RUN_DIR"' EXIT
sleep 2
ticks() { awk '{print $14 + $15}' "/proc/$DAEMON/stat"; }
before=$(ticks)
t0=$(date +%s.%N)
"$H" host run --id loop -- python3 -c "
import ctypes, os, signal
libc = ctypes.CDLL(None)
signal.signal(signal.SIGUSR1, lambda *_: None)
for i in range($N):
    libc.ptrace(0, 0, None, None)  # PTRACE_TRACEME
    os.kill(os.getpid(), signal.SIGUSR1)
print('done', $N)
"
t1=$(date +%s.%N)
after=$(ticks)
awk -v n="$N" -v b="$before" -v a="$after" -v hz="$(getconf CLK_TCK)" -v t0="$t0" -v t1="$t1" 'BEGIN {
    cpu = (a - b) / hz
    printf "stops %d; supervisor CPU %.2f s (%.0f us per stop); wall %.2f s\n", n, cpu, cpu / n * 1e6, t1 - t0
}'
echo "log lines about it: $(grep -c 'made the supervisor its tracer' "$HOLDFAST_RUN_DIR/daemon.out" || true)"
