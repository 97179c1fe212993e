"""A process that streams across a live upgrade, for the package checks (smoke-test.py,
upgrade-check.py): a runtime's process handed over on the daemon's handoff socket, its stdout
in raw mode to a Unix listener of ours, printing `line 1` ... `line N` (100 lines, then 50 ms).
"""
import os
import socket
import subprocess
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import handoff  # noqa: E402  (examples/handoff.py: the handoff socket's client)


class HandedCounter:
    def __init__(self, run: str, directory: str, lines: int, process: str) -> None:
        """Starts the counter and hands it to the broker of the daemon whose run directory is
        `run`; the listener is made in `directory` (which the unprivileged broker must reach)."""
        self.lines = lines
        self.expected = "".join(f"line {i}\n" for i in range(1, lines + 1)).encode()
        self.collected = bytearray()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = f"{directory}/out.sock"
        self.listener.bind(address)
        os.chmod(address, 0o666)  # the broker, unprivileged, dials it
        self.listener.listen(8)
        self.reader = threading.Thread(target=self._collect, daemon=True)
        self.reader.start()
        read_end, write_end = os.pipe()
        self.child = subprocess.Popen(
            ["sh", "-c", f"i=0; while [ $i -lt {lines} ]; do i=$((i+1)); echo line $i; [ $((i % 100)) -ne 0 ] || sleep 0.05; done"],
            stdout=write_end, start_new_session=True)
        os.close(write_end)
        with handoff.Client(f"{run}/broker.sock") as broker:
            broker.adopt(process, [handoff.Stream("stdout", read_end, f"unix:{address}", mode="raw")])
        os.close(read_end)

    def _collect(self) -> None:
        # Connections in order: the old broker's ends (at its exit) before the new one dials.
        while len(self.collected) < len(self.expected):
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with connection:
                while chunk := connection.recv(65536):
                    self.collected.extend(chunk)

    def finish(self, timeout: float) -> list:
        """Waits for the counter to end and its output to arrive: the problems found (none: every
        line once, in order)."""
        problems = []
        try:
            if self.child.wait(timeout=timeout) != 0:
                problems.append("the streaming process failed")
        except subprocess.TimeoutExpired:
            self.child.kill()
            problems.append(f"the streaming process still ran after {timeout} s")
        self.reader.join(timeout=timeout)
        self.listener.close()
        if bytes(self.collected) != self.expected:
            problems.append(f"the process's output across the upgrade: {len(self.collected)} of {len(self.expected)} bytes, not exact")
        return problems

    def kill(self) -> None:
        if self.child.poll() is None:
            self.child.kill()
