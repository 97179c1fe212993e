#!/usr/bin/env python3
"""Writes the seed corpus of each fuzz target (fuzz/corpus/<target>/): a handful of valid inputs
(and a few near-misses) for libFuzzer to mutate. Run from anywhere; output is deterministic.

Formats (Sources/HoldfastFuzzing/FuzzTarget.swift says what each target does with its input):
  bridge  a mode byte, then: (even) control frames back to back, as the host writes them on
          the bridge, or (odd) one frame without its length field
  broker  one selector byte (low 3 bits: fds attached; bit 3: sent by the supervisor; bit 4:
          no length field), then one control frame (a SOCK_SEQPACKET message)
  stream  resumable stream frames back to back
  config  a configuration file (JSON if it starts with '{', YAML otherwise)
"""
import json
import os
import shutil
import struct

ROOT = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(ROOT, "corpus")


def control(type_, id_, body):
    if not isinstance(body, bytes):
        body = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return struct.pack(">IIQ", type_, len(body), id_) + body


def unframed(type_, id_, body):
    """A control frame without its length field (the harness inserts it)."""
    frame = control(type_, id_, body)
    return frame[:4] + frame[8:]


def stream_frame(type_, value, body=b""):
    return struct.pack(">BBHIQ", type_, 0, 0, len(body), value) + body


def hello(role, token, received, attempt=1):
    # Protocol version 2: the token, then a 16-byte nonce and a 32-byte proof (zeros here: the
    # parsers do not check proofs; the session mode's harness signs the peer's hello itself).
    body = b"HFST" + struct.pack(">HBBQH", 2, role, 0, attempt, len(token)) + token + bytes(16) + bytes(32)
    return stream_frame(1, received, body)


def session_seed(mode, attempt, offset, frames):
    """The stream target's session mode: the mode byte (high bit set; bit 0 guest end, bit 1
    sending end), the peer hello's attempt and received offset, then the peer's frames."""
    return bytes([0x80 | mode]) + struct.pack(">QQ", attempt, offset) + b"".join(frames)


def write(target, name, data):
    directory = os.path.join(CORPUS, target)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)


def bridge():
    def wire(name, data):
        write("bridge", name, b"\x00" + data)

    def request(name, type_, id_, body):
        wire(name, control(type_, id_, body))
        write("bridge", name + ".unframed", b"\x01" + unframed(type_, id_, body))

    streams = {
        "stdin": {"address": "tcp://127.0.0.1:7000", "mode": "resumable", "token": "in-1", "secret": "5a" * 32},
        "stdout": {"address": "vsock://host:7001", "mode": "resumable", "token": "out-1", "secret": "5a" * 32},
        "stderr": {"address": "unix:/run/holdfast/err.sock", "mode": "raw"},
    }
    create = {"id": "p1", "argv": ["/bin/sh", "-c", "echo hi"], "env": ["PATH=/bin"], "cwd": "/", "tty": False, **streams}
    tty = {"id": "t1", "argv": ["/bin/sh"], "tty": True, "rows": 24, "columns": 80, "user": "0",
           "stdin": streams["stdin"], "stdout": streams["stdout"]}
    runc = {"id": "c1", "argv": [], "runtime": "runc", "bundle": "/var/lib/bundles/c1", "tty": False, "stdout": streams["stdout"]}
    exec_ = {"id": "e1", "argv": ["/bin/ls"], "runtime": "runc", "container": "c1", "user": "1000:1000", "tty": False}
    request("create-direct", 0x1101, 1, create)
    request("create-tty", 0x1101, 2, tty)
    request("create-runc", 0x1101, 3, runc)
    request("create-runc-exec", 0x1101, 4, exec_)
    request("signal", 0x1102, 5, {"id": "p1", "signal": 15})
    request("resize", 0x1103, 6, {"id": "t1", "rows": 50, "columns": 132})
    request("close-stdin", 0x1104, 7, {"id": "p1"})
    request("list", 0x1105, 8, {})
    request("stats", 0x1106, 9, b"")
    request("acknowledge-exit", 0x1107, 10, {"id": "p1"})
    request("stray-ok", 0x0001, 11, {})
    request("unknown-type", 0x7777, 12, {})
    request("id-zero", 0x1105, 0, {})
    request("bad-json", 0x1101, 13, b'{"id": "p1", "argv": [1]}')
    wire("oversized", struct.pack(">IIQ", 0x1101, 0x10001, 14))
    wire("session", b"".join([
        control(0x1101, 21, create), control(0x1105, 22, {}), control(0x1102, 23, {"id": "p1", "signal": 9}),
        control(0x1107, 24, {"id": "p1"}),
    ]))


def broker():
    def message(name, selector, type_, id_, body):
        write("broker", name, bytes([selector]) + control(type_, id_, body))
        write("broker", name + ".unframed", bytes([selector | 0x10]) + unframed(type_, id_, body))

    raw = {"kind": "stdout", "fd": 0, "address": "tcp://127.0.0.1:7001", "mode": "raw"}
    resumable = {"kind": "stderr", "fd": 1, "address": "vsock://2:7002", "mode": "resumable", "token": "err-1", "secret": "5a" * 32}
    stdin = {"kind": "stdin", "fd": 2, "address": "unix:///run/holdfast/in.sock", "mode": "resumable", "token": "in-1", "secret": "5a" * 32}
    tty = {"kind": "tty", "fd": 0, "address": "tcp://[::1]:7003", "mode": "resumable", "token": "tty-out",
           "inputAddress": "tcp://[::1]:7004", "inputToken": "tty-in", "secret": "5a" * 32, "inputSecret": "a5" * 32}
    supervisor, handoff = 0x08, 0x00
    message("adopt-three", supervisor | 3, 0x0101, 1, {"process": "p1", "streams": [raw, resumable, stdin]})
    message("adopt-tty", handoff | 1, 0x0101, 2, {"process": "t1", "streams": [tty]})
    message("adopt-fd-out-of-range", handoff | 1, 0x0101, 3, {"process": "p2", "streams": [resumable]})
    message("release", supervisor, 0x0102, 4, {"process": "p1"})
    message("list", handoff, 0x0103, 5, {})
    message("disconnect-all", supervisor, 0x0104, 6, {})
    message("bridge-up-from-handoff", handoff, 0x0105, 7, {})
    message("stats", supervisor, 0x0106, 8, {})
    message("process-exited", supervisor, 0x0107, 9, {"process": "p1", "drainTimeoutMilliseconds": 500})
    message("close-stdin", supervisor, 0x0108, 10, {"process": "p1"})
    message("resize", handoff, 0x0109, 11, {"process": "t1", "rows": 24, "columns": 80})
    message("metrics", supervisor, 0x010A, 12, {})
    message("fds-with-list", supervisor | 2, 0x0103, 13, {})
    message("not-a-request", supervisor, 0x0201, 14, {})


def stream():
    write("stream", "hello-guest", hello(0, b"stream-token-1", 0))
    write("stream", "hello-host", hello(1, b"fuzz", 4096, attempt=7))
    write("stream", "hello-empty-token", hello(1, b"", 0))
    write("stream", "session", b"".join([
        hello(1, b"fuzz", 0), stream_frame(2, 0, b"hello, world\n"), stream_frame(3, 13), stream_frame(2, 13, b"more"),
        stream_frame(4, 17),
    ]))
    write("stream", "refusal", stream_frame(5, 2, b"wrong stream token"))
    write("stream", "refusal-unknown-code", stream_frame(5, 99, "d\u00e9j\u00e0 vu".encode()))
    write("stream", "ack-end", stream_frame(3, 1 << 40) + stream_frame(4, 1 << 40))
    # Sessions through a real ResumableStream (host/guest end, receiving/sending).
    data = [stream_frame(2, 0, b"hello, world\n"), stream_frame(2, 13, b"more"), stream_frame(4, 17), stream_frame(3, 0)]
    write("stream", "session-host-receives", session_seed(0, 1, 0, data))
    write("stream", "session-guest-receives", session_seed(1, 0, 0, data))
    acks = [stream_frame(3, 4096), stream_frame(3, 65536), stream_frame(4, 98304), stream_frame(3, 98304)]
    write("stream", "session-host-sends", session_seed(2, 1, 0, acks))
    write("stream", "session-guest-sends", session_seed(3, 0, 1024, acks))
    write("stream", "session-ack-beyond", session_seed(2, 1, 0, [stream_frame(3, 1 << 40)]))
    write("stream", "session-gap", session_seed(0, 1, 0, [stream_frame(2, 100, b"gap")]))


def config():
    shutil.copy(os.path.join(ROOT, "..", "config", "holdfast.yaml"), os.path.join(CORPUS, "config", "holdfast.yaml"))
    shutil.copy(os.path.join(ROOT, "..", "config", "holdfast-dev.yaml"), os.path.join(CORPUS, "config", "holdfast-dev.yaml"))
    write("config", "minimal.yaml", b"bridge:\n  address: tcp://127.0.0.1:5000\nbroker:\n  user: \"\"\n")
    write("config", "full.json", json.dumps({
        "bridge": {"address": "unix:/run/host.sock", "reconnect_initial": "250ms", "reconnect_max": "1m"},
        "broker": {"user": "uid:65600", "seccomp": "log", "allow_shared_uid": "false"},
        "handoff": {"socket": "", "mode": "0600", "allowed_uids": [0, 1000], "allowed_gids": "0, 5"},
        "streams": {"redial_attempts": 10, "redial_interval": "1.5s", "connect_timeout": "2s", "drain_timeout": "1h",
                    "ring_capacity": "64KiB"},
        "shutdown": {"signal": "15", "grace": "1s", "timeout": "2s"},
        "control": {"socket": "/tmp/hf/control.sock"},
        "runc": {"path": "/usr/bin/runc", "root": "/tmp/hf/runc"},
        "metrics": {"address": "vsock://any:9100"},
        "run_directory": "/tmp/hf",
    }, indent=2).encode())
    write("config", "flow.yaml", b"{bridge: {address: 'vsock://3:5000'}, broker: {user: ''}, streams: {ring_capacity: 1048576}}\n")
    write("config", "misspelt.yaml", b"bridge:\n  adress: tcp://127.0.0.1:5000\n")
    write("config", "anchors.yaml", b"base: &b {address: tcp://h:1}\nbridge: *b\nbroker:\n  user: ''\n")


def dictionaries():
    """libFuzzer dictionaries (fuzz/dict/<target>.dict): keys and words a mutation cannot guess."""
    words = {
        "bridge": ["id", "argv", "runtime", "bundle", "container", "env", "cwd", "user", "group", "tty", "rows",
                   "columns", "stdin", "stdout", "stderr", "address", "mode", "token", "secret", "signal", "direct", "runc",
                   "raw", "resumable", "vsock://", "unix:", "tcp://", "host", "any", "true", "false", "null"],
        "broker": ["process", "streams", "kind", "fd", "address", "mode", "token", "secret", "inputAddress", "inputToken", "inputSecret",
                   "drainTimeoutMilliseconds", "rows", "columns", "stdin", "stdout", "stderr", "tty", "raw",
                   "resumable", "vsock://", "unix:", "unix://", "tcp://", "[::1]", "host", "any", "null"],
        "stream": ["HFST"],
        "config": ["bridge", "address", "reconnect_initial", "reconnect_max", "broker", "user", "seccomp",
                   "allow_shared_uid", "uid:", "true", "false", "handoff",
                   "socket", "mode", "allowed_uids", "allowed_gids", "streams", "redial_attempts", "redial_interval",
                   "connect_timeout", "drain_timeout", "ring_capacity", "shutdown", "signal", "grace", "timeout",
                   "control", "runc", "path", "root", "metrics", "run_directory", "{run}", "ms", "KiB", "MiB", "GiB",
                   "SIG", "vsock://", "unix:", "tcp://", "kill", "log", "off", "&a", "*a", "!!str", "---", "..."],
    }
    directory = os.path.join(ROOT, "dict")
    os.makedirs(directory, exist_ok=True)
    for target, entries in words.items():
        with open(os.path.join(directory, f"{target}.dict"), "w") as f:
            for word in entries:
                f.write(json.dumps(word) + "\n")


if __name__ == "__main__":
    for target in ["bridge", "broker", "stream", "config"]:
        shutil.rmtree(os.path.join(CORPUS, target), ignore_errors=True)
        os.makedirs(os.path.join(CORPUS, target))
    bridge()
    broker()
    stream()
    config()
    dictionaries()
    for target in sorted(os.listdir(CORPUS)):
        print(f"fuzz/corpus/{target}: {len(os.listdir(os.path.join(CORPUS, target)))} inputs")
