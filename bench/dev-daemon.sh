# Sourced by the bench scripts that measure the supervisor: starts `holdfast host serve` and a
# daemon on the development configuration, in a run directory of their own, ends both (by pid)
# when the script exits, and defines `ticks`: the daemon's user + system CPU in clock ticks.
# Needs $H, the holdfast binary.
export HOLDFAST_RUN_DIR=$(mktemp -d)
# The broker (its own uid) dials the host's stream socket in this directory.
chmod 755 "$HOLDFAST_RUN_DIR"
setsid "$H" host serve > "$HOLDFAST_RUN_DIR/serve.out" 2>&1 & SERVE=$!
sleep 1
setsid "$H" daemon --config config/holdfast-dev.yaml > "$HOLDFAST_RUN_DIR/daemon.out" 2>&1 & DAEMON=$!
trap 'kill $DAEMON 2>/dev/null; sleep 3; kill $SERVE 2>/dev/null; rm -rf "$HOLDFAST_RUN_DIR"' EXIT
sleep 2
ticks() { awk '{print $14 + $15}' "/proc/$DAEMON/stat"; }
