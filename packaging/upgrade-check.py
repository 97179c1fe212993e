#!/usr/bin/env python3
"""Installs a newer holdfast package over a running daemon while a process streams, and checks
that the package upgraded the daemon live (`make deb-install-check`, throwaway machines only).

    packaging/upgrade-check.py NEWER_DEB [RUN_DIRECTORY]

The daemon must be running from the installed package (RUN_DIRECTORY: /run/holdfast). A
process is handed over on its handoff socket with its stdout in raw mode to a listener here
(examples/handoff.py); then `dpkg -i NEWER_DEB`, whose postinst reloads the daemon (systemd) or
runs `holdfast upgrade` (no systemd). Checks: dpkg succeeds, the daemon has the same pid, one
live upgrade more, the sha256 of the newly installed /usr/bin/holdfast, and every line the
process printed arrived exactly once, in order.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import streaming  # noqa: E402  (packaging/streaming.py)


def status(run: str) -> dict:
    result = subprocess.run(
        ["/usr/bin/holdfast", "status", "--json", "--socket", f"{run}/control.sock"], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"holdfast status: exit {result.returncode}: {result.stderr}")
    return json.loads(result.stdout)


def main() -> int:
    directory = tempfile.mkdtemp(prefix="holdfast-upgrade-check.")
    try:
        return check(directory)
    finally:
        # The counter's listener socket stays in it otherwise.
        shutil.rmtree(directory, ignore_errors=True)


def check(directory: str) -> int:
    newer = sys.argv[1]
    run = sys.argv[2] if len(sys.argv) > 2 else "/run/holdfast"
    os.chmod(directory, 0o755)  # the broker, unprivileged, dials the listener in here
    before = status(run)
    lines = 5000
    counter = streaming.HandedCounter(run, directory, lines, "upgrade-check")
    installed = subprocess.run(["dpkg", "-i", newer], capture_output=True, text=True, timeout=300)
    print(installed.stdout + installed.stderr, end="")
    if installed.returncode != 0:
        counter.kill()
        print(f"FAIL: dpkg -i {newer}: exit {installed.returncode}")
        return 1
    after = status(run)
    with open("/usr/bin/holdfast", "rb") as binary:
        sha = hashlib.sha256(binary.read()).hexdigest()
    problems = []
    if after["pid"] != before["pid"]:
        problems.append(f"the daemon's pid changed ({before['pid']} -> {after['pid']}): it was restarted, not upgraded")
    if after.get("upgrades", 0) != before.get("upgrades", 0) + 1:
        problems.append(f"live upgrades {before.get('upgrades', 0)} -> {after.get('upgrades', 0)}")
    if after.get("executableSHA256") != sha:
        problems.append(f"the daemon runs sha256 {after.get('executableSHA256')}, /usr/bin/holdfast is {sha}")
    problems += counter.finish(timeout=120)
    for problem in problems:
        print(f"FAIL: {problem}")
    if problems:
        return 1
    print(f"ok: dpkg -i of a newer package upgraded the running daemon live (pid {after['pid']}, "
          f"upgrade {after.get('upgrades')}), {lines} lines streamed across it exactly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
