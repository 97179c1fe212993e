#!/usr/bin/env python3
"""Starts a packaged holdfast daemon the way systemd would and checks the conversation.

    packaging/smoke-test.py ROOT      (ROOT: a .deb unpacked with dpkg-deb -x)

The daemon runs ROOT/usr/bin/holdfast with ROOT/etc/holdfast/holdfast.yaml, under a temporary
run directory and a bridge address nobody listens on (the bridge worker redials; readiness does
not wait for the host). A Unix datagram socket stands in for systemd's NOTIFY_SOCKET, with
WATCHDOG_USEC set. Checks: without a bridge key it exits 2 naming bridge.key_file; with one
provisioned (HOLDFAST_BRIDGE_KEY_FILE): READY=1 arrives, `holdfast status` answers, the broker runs under
seccomp as an unprivileged user, WATCHDOG=1 arrives; then a live upgrade while a process
streams: the unpacked binary is replaced by a newer build (a copy with bytes appended, renamed
over it as dpkg does) and `holdfast upgrade` (the unit's ExecReload) must keep the daemon's pid,
report the new binary's sha256 and one upgrade, send READY=1 again, and lose not a line of a
process handed over on the handoff socket (raw mode); SIGTERM gives STOPPING=1 and exit 0.
Needs root (the daemon starts the broker as another user); skips otherwise.
"""
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import streaming  # noqa: E402  (packaging/streaming.py: a handed-over process streaming across the upgrade)


def unused_uid() -> int:
    """A uid of the range Holdfast picks from (65600-99999) with no password entry, no process and
    in no subordinate range of /etc/subuid."""
    used = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                for line in status:
                    if line.startswith("Uid:"):
                        used.update(int(field) for field in line.split()[1:])
        except OSError:
            continue
    subordinate = []
    try:
        with open("/etc/subuid") as subuid:
            for line in subuid:
                fields = line.strip().split(":")
                if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
                    subordinate.append((int(fields[1]), int(fields[2])))
    except OSError:
        pass
    start = 65601 + os.getpid() % 34000
    for uid in list(range(start, 100000)) + list(range(65601, start)):
        if uid in used or any(first <= uid < first + count for first, count in subordinate):
            continue
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
    raise RuntimeError("no unused uid in 65601-99999")


def main() -> int:
    root = sys.argv[1]
    binary = f"{root}/usr/bin/holdfast"
    config = f"{root}/etc/holdfast/holdfast.yaml"
    if os.geteuid() != 0:
        print("smoke test: skipped (needs root: the daemon starts the broker as another user)")
        return 0
    directory = tempfile.mkdtemp(prefix="holdfast-smoke.")
    os.chmod(directory, 0o755)  # the broker, unprivileged, reaches its sockets in here
    daemon = None
    try:
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(f"{directory}/notify.sock")
        received: list[str] = []

        def wait_for(assignment: str, seconds: float) -> bool:
            deadline = time.monotonic() + seconds
            while assignment not in received:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                notify.settimeout(left)
                try:
                    received.extend(notify.recv(4096).decode().split("\n"))
                except socket.timeout:
                    return False
            return True

        run = f"{directory}/run"
        environment = dict(
            os.environ,
            NOTIFY_SOCKET=f"{directory}/notify.sock",
            WATCHDOG_USEC="1000000",
            HOLDFAST_RUN_DIR=run,
            HOLDFAST_BRIDGE_ADDRESS=f"unix:{run}/host-bridge.sock",
        )
        try:
            pwd.getpwnam("holdfast")
        except KeyError:
            # The package's postinst creates 'holdfast'; this machine has not installed it. The
            # broker's uid must be its own (the daemon refuses one a process runs as): a free one.
            uid = unused_uid()
            environment["HOLDFAST_BROKER_USER"] = f"uid:{uid}"
            print(f"smoke test: no user 'holdfast' here (postinst creates it): the broker runs as uid {uid}")
        # The package ships no bridge key (each VM gets its own): an unsafe one stops the daemon
        # from starting, and it says why (one not there yet is waited for: the bridge stays down
        # until it is written, a key provisioned after boot).
        unsafe = f"{directory}/unsafe.key"
        with open(unsafe, "w") as handle:
            handle.write(os.urandom(32).hex() + "\n")
        os.chmod(unsafe, 0o644)
        refused = subprocess.run(
            [binary, "daemon", "--config", config], env=dict(environment, HOLDFAST_BRIDGE_KEY_FILE=unsafe),
            capture_output=True, text=True, timeout=20)
        if refused.returncode != 2 or "bridge.key_file" not in refused.stdout + refused.stderr:
            print(f"smoke test: FAIL: with a bridge key others can read: exit {refused.returncode}: {refused.stdout} {refused.stderr}")
            return 1
        # As a VM builder provisions it: 64 hex digits, root-only.
        key = f"{directory}/bridge.key"
        descriptor = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(descriptor, os.urandom(32).hex().encode() + b"\n")
        os.close(descriptor)
        environment["HOLDFAST_BRIDGE_KEY_FILE"] = key
        log = open(f"{directory}/daemon.log", "w")
        started = time.monotonic()
        daemon = subprocess.Popen([binary, "daemon", "--config", config], env=environment, stdout=log, stderr=subprocess.STDOUT)

        def fail(why: str) -> int:
            print(f"smoke test: FAIL: {why}\nnotifications: {received}\n--- daemon log ---")
            with open(f"{directory}/daemon.log") as text:
                print(text.read())
            return 1

        if not wait_for("READY=1", 20):
            return fail("no READY=1 within 20 s")
        ready_ms = (time.monotonic() - started) * 1000
        status = subprocess.run(
            [binary, "status", "--json", "--socket", f"{run}/control.sock"], capture_output=True, text=True, timeout=10)
        if status.returncode != 0:
            return fail(f"holdfast status: exit {status.returncode}: {status.stdout} {status.stderr}")
        roles = {role["name"]: role.get("pid") for role in json.loads(status.stdout)["roles"]}
        broker_pid = roles.get("broker")
        if broker_pid is None or roles.get("bridge") is None:
            return fail(f"holdfast status shows roles {roles}")
        with open(f"/proc/{broker_pid}/status") as text:
            fields = dict(line.split(":", 1) for line in text.read().splitlines() if ":" in line)
        seccomp = fields["Seccomp"].strip()
        uid = fields["Uid"].split()[0]
        if seccomp != "2" or uid == "0":
            return fail(f"the broker runs with Seccomp {seccomp}, uid {uid}")
        if not wait_for("WATCHDOG=1", 3):
            return fail("no WATCHDOG=1 within 3 s at WATCHDOG_USEC=1000000")

        # A live upgrade while a process streams. The process is a runtime's, handed over on the
        # handoff socket with its stdout in raw mode to a listener here (no host bridge needed).
        lines = 3000
        counter = streaming.HandedCounter(run, directory, lines, "smoke")
        time.sleep(0.3)
        newer = open(binary, "rb").read() + b"\nholdfast smoke test: a newer build\n"
        with open(binary + ".new", "wb") as new_file:
            new_file.write(newer)
        os.chmod(binary + ".new", 0o755)
        os.rename(binary + ".new", binary)
        received.clear()
        upgrade_started = time.monotonic()
        upgrade = subprocess.run(
            [binary, "upgrade", "--socket", f"{run}/control.sock"], capture_output=True, text=True, timeout=90)
        upgrade_ms = (time.monotonic() - upgrade_started) * 1000
        if upgrade.returncode != 0:
            counter.kill()
            return fail(f"holdfast upgrade: exit {upgrade.returncode}: {upgrade.stdout} {upgrade.stderr}")
        after = json.loads(subprocess.run(
            [binary, "status", "--json", "--socket", f"{run}/control.sock"], capture_output=True, text=True, timeout=10).stdout)
        if after["pid"] != daemon.pid or after.get("upgrades") != 1:
            return fail(f"after the upgrade: pid {after['pid']} (daemon {daemon.pid}), upgrades {after.get('upgrades')}")
        if after.get("executableSHA256") != hashlib.sha256(newer).hexdigest():
            return fail(f"after the upgrade the daemon runs sha256 {after.get('executableSHA256')}, not the newer build's")
        if not wait_for("READY=1", 20):
            return fail("no READY=1 from the upgraded daemon")
        problems = counter.finish(timeout=60)
        if problems:
            return fail("; ".join(problems))
        stopping_started = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        try:
            code = daemon.wait(timeout=40)
        except subprocess.TimeoutExpired:
            return fail("still running 40 s after SIGTERM")
        stop_ms = (time.monotonic() - stopping_started) * 1000
        if not wait_for("STOPPING=1", 1):
            return fail("no STOPPING=1")
        if code != 0:
            return fail(f"exit status {code} after SIGTERM")
        print(
            f"smoke test: PASS: READY=1 after {ready_ms:.0f} ms; status answered; broker pid {broker_pid} uid {uid} "
            f"Seccomp {seccomp}; WATCHDOG=1 seen; live upgrade onto a newer build in {upgrade_ms:.0f} ms, same pid, "
            f"{lines} lines streamed across it exactly; STOPPING=1; exit 0 {stop_ms:.0f} ms after SIGTERM")
        return 0
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
