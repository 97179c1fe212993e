#!/bin/sh
# What a stray signal sent in a loop costs the supervisor (README, "The daemon", Signals): a
# direct process (root, the supervisor its parent) runs `kill -s SIG $PPID` COUNT times. Prints
# the loop's wall time, the supervisor's CPU (user + system, from /proc) over it, and how long a
# create takes while it runs and when nothing else does. Past 20 within a second the supervisor
# leaves the signal to the kernel for 10 s (SignalBurstLimit), so nearly all of them cost it
# nothing.
#
#   bench/signal-flood.sh [path/to/holdfast]     (as root)
#   COUNT=100000 SIGNAL=USR1 by default
set -e
H=${1:-.build/release/holdfast}
COUNT=${COUNT:-100000}
SIGNAL=${SIGNAL:-USR1}
. "$(dirname "$0")/dev-daemon.sh"
now() { date +%s.%N; }
hz=$(getconf CLK_TCK)
start=$(now); "$H" host run --id quiet -- true; quiet=$(echo "$(now) - $start" | bc)
( sleep 0.5; start=$(now); "$H" host run --id during -- true; echo "$(now) - $start" | bc > "$HOLDFAST_RUN_DIR/during" ) &
CREATE=$!
before=$(ticks)
start=$(now)
"$H" host run --id flood -- sh -c "n=0; while [ \$n -lt $COUNT ]; do kill -s $SIGNAL \$PPID; n=\$((n+1)); done"
took=$(echo "$(now) - $start" | bc)
wait $CREATE
after=$(ticks)
echo "$COUNT × SIG$SIGNAL from a child in ${took}s: supervisor CPU $(echo "scale=2; ($after - $before) / $hz" | bc)s;" \
    "a create took ${quiet}s alone, $(cat "$HOLDFAST_RUN_DIR/during")s during the flood"
grep -h "came more than" "$HOLDFAST_RUN_DIR/daemon.out" | head -3 || true
