#!/usr/bin/env python3
"""Hand a process's stdio to Holdfast, and take it back: a client of the broker's handoff socket.

A runtime on the guest that starts processes itself (rather than asking Holdfast to) can give
the Holdfast broker the runtime-side ends of a process's stdio pipes. The broker then relays them
to the host like its own streams, across lost connections. The protocol is in docs/PROTOCOL.md,
"Handoff socket". Standard library only; Python 3.9+ (socket.send_fds, socket.recvmsg).

As a library (put examples/ on sys.path):

    import os, subprocess, handoff
    r, w = os.pipe()
    child = subprocess.Popen(["my-server"], stdout=w)    # the process writes into w
    os.close(w)
    handoff.adopt("/run/holdfast/broker.sock", "c1",     # settled if the broker dies inside
                  [handoff.Stream("stdout", r, "vsock://host:6000", token="c1-stdout",
                                  secret=SECRET_HEX_FROM_THE_HOST)])
    os.close(r)                                          # the broker holds its own copy now
    ...
    for description, fd in handoff.release("/run/holdfast/broker.sock", "c1"):
        ...                                              # the same pipe ends, back to us
                                                         # (asked again if the broker died inside)

As a command:

    handoff.py --socket PATH adopt --process c1 --stdout vsock://host:6000 --secret-file c1.key -- my-server --flag
    handoff.py --socket PATH adopt --process c1 --mode raw --stdout unix:/run/h.sock --stdout-fd 3
    handoff.py --socket PATH adopt --process c2 --tty vsock://host:6001 --tty-input vsock://host:6002 \
        --secret-file c2.key --console-socket -- runc create --bundle /b/c2 --console-socket {console-socket} c2
    handoff.py --socket PATH list
    handoff.py --socket PATH resize --process c2 --rows 40 --columns 120
    handoff.py --socket PATH close-stdin --process c1
    handoff.py --socket PATH exited --process c1         # it exited: drain its output, let it go
    handoff.py --socket PATH release --process c1
"""

import argparse
import array
import fcntl
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

# Message types (Sources/HoldfastProtocol/BrokerMessages.swift): what a runtime may ask about the
# processes its uid handed over (the rest of the broker's vocabulary is the supervisor's).
ADOPT = 0x0101
RELEASE = 0x0102
LIST = 0x0103
PROCESS_EXITED = 0x0107
CLOSE_STDIN = 0x0108
RESIZE = 0x0109
OK = 0x0001
ERROR = 0x0002

# Every message is one control frame: type, body length, request id (big-endian), then JSON.
HEADER = struct.Struct(">IIQ")
# The broker refuses a bigger body or more fds per message (and then closes the connection).
MAX_BODY = 64 * 1024
MAX_FDS = 64

# The daemon's default handoff socket: {run}/broker.sock, where HOLDFAST_RUN_DIR moves {run} (as
# it does for the daemon and every holdfast command).
DEFAULT_SOCKET = os.path.join(os.environ.get("HOLDFAST_RUN_DIR") or "/run/holdfast", "broker.sock")


class BrokerError(Exception):
    """The broker answered with an error frame: `code` is stable, `message` says why."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ProtocolError(Exception):
    """The broker's reply was not what the protocol allows (or the connection ended)."""


class UsageError(Exception):
    """The command line asks for something the command cannot do."""


@dataclass
class Stream:
    """One stream of a process, as `adopt` hands it over.

    kind: "stdin", "stdout", "stderr" or "tty" (a pty master, relayed both ways).
    fd: the runtime's end: the read end of a stdout/stderr pipe, the write end of a stdin
        pipe, or a pty master (a socket works too).
    address: where the broker dials the host for this stream: "vsock://CID:PORT",
        "unix:/path" or "tcp://HOST:PORT" (the broker runs as an unprivileged user: it must be
        allowed to connect there).
    mode: "resumable" (exactly once across reconnects; needs `token` and `secret`) or "raw"
        (plain bytes, any listener, unauthenticated).
    secret: a resumable stream's secret, hex (16 to 64 bytes), as the host chose it: every
        hello for the stream proves it, so only the broker and the host can speak for it.
    input_address / input_token / input_secret: a tty's input stream (host -> terminal), if any.
    """

    kind: str
    fd: int
    address: str
    mode: str = "resumable"
    token: Optional[str] = None
    secret: Optional[str] = None
    input_address: Optional[str] = None
    input_token: Optional[str] = None
    input_secret: Optional[str] = None


# What a connection the broker closed without a word means: it was past the broker's budgets
# (docs/PROTOCOL.md, "Handoff socket": every place to serve or refuse one was taken), or the
# broker was restarting.
CLOSED_AT_ONCE = ("the broker closed the connection without an answer (it closes connections beyond its "
                  "budgets at once, and a restarting broker drops them): retry")


@dataclass(frozen=True)
class Adopted:
    """How an adopt was answered: whether the process survives a broker crash, and if not why
    (the broker's log says the same). True or false as `survives`, so `if adopt(...):` reads as
    whether it survives."""
    survives: bool
    reason: Optional[str] = None

    def __bool__(self) -> bool:
        return self.survives


class Client:
    """One connection to the handoff socket. Requests are answered in order, one at a time."""

    def __init__(self, path: str = DEFAULT_SOCKET, timeout: float = 10.0):
        # SOCK_SEQPACKET: one message is one frame, with its fds attached, never split or merged.
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as error:
            self.sock.close()
            raise OSError(error.errno, f"cannot connect to the broker at {path}: {error.strerror}") from None
        self.next_id = 1

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def request(self, kind: int, body: dict, fds: Sequence[int] = ()) -> Tuple[dict, List[int]]:
        """Sends one request and returns the `ok` body and any fds that came with it (ours to
        close). Raises BrokerError for an `error` reply."""
        request_id = self.next_id
        self.next_id += 1
        payload = json.dumps(body).encode()
        if len(payload) > MAX_BODY:
            raise ValueError(f"request body of {len(payload)} bytes exceeds the broker's {MAX_BODY}")
        frame = HEADER.pack(kind, len(payload), request_id) + payload
        try:
            if fds:
                # SCM_RIGHTS: the kernel gives the broker its own copies; ours stay open.
                socket.send_fds(self.sock, [frame], list(fds))
            else:
                self.sock.send(frame)
        except (BrokenPipeError, ConnectionResetError):
            raise ProtocolError(CLOSED_AT_ONCE) from None

        # recvmsg rather than socket.recv_fds, which drops its flags argument: with
        # MSG_CMSG_CLOEXEC the fds handed back cannot leak into a process started meanwhile
        # (like Python's own fds, they are non-inheritable; pass them on explicitly).
        def receive():
            return self.sock.recvmsg(
                HEADER.size + MAX_BODY, socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize),
                socket.MSG_CMSG_CLOEXEC)
        try:
            reply, ancillary, flags, _ = receive()
        except ConnectionResetError:
            # A broker that died with a message of ours unread: the kernel reports that once,
            # ahead of what it wrote before it died (its answer, perhaps). Read on.
            reply, ancillary, flags, _ = receive()
        received = array.array("i")
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received.frombytes(data[:len(data) - len(data) % received.itemsize])
        received = list(received)
        try:
            if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
                # Some fds or bytes were lost in flight: the reply cannot be trusted.
                raise ProtocolError("the broker's reply was truncated")
            if not reply:
                raise ProtocolError(CLOSED_AT_ONCE)
            if len(reply) < HEADER.size:
                raise ProtocolError(f"a reply of {len(reply)} bytes is shorter than a header")
            reply_type, length, reply_id = HEADER.unpack_from(reply)
            if length != len(reply) - HEADER.size:
                raise ProtocolError("the reply's length does not match its header")
            answer = json.loads(reply[HEADER.size:]) if length else {}
            if reply_type == ERROR:
                # A refused peer gets this too (id 0 if it said nothing), then a hang-up.
                raise BrokerError(answer.get("code", "?"), answer.get("message", ""))
            if reply_type != OK or reply_id != request_id:
                raise ProtocolError(f"unexpected reply type 0x{reply_type:04x} id {reply_id}")
            return answer, received
        except BaseException:
            for fd in received:  # a refused reply's fds are nobody's: do not leak them
                os.close(fd)
            raise

    def adopt(self, process: str, streams: Sequence[Stream]) -> Adopted:
        """Hands the streams' fds to the broker, which relays them from now on. Our fds stay
        open: close them once this returns (the broker has its own copies). Returns whether
        the process survives a broker crash (false: the broker could not keep copies of its fds
        or checkpoints for it, and `reason` says why; it is relayed all the same)."""
        described = []
        for index, stream in enumerate(streams):
            # `fd` in the JSON is an index into the fds attached to this message.
            entry = {"kind": stream.kind, "fd": index, "address": stream.address, "mode": stream.mode}
            if stream.token is not None:
                entry["token"] = stream.token
            if stream.secret is not None:
                entry["secret"] = stream.secret
            if stream.input_address is not None:
                entry["inputAddress"] = stream.input_address
            if stream.input_token is not None:
                entry["inputToken"] = stream.input_token
            if stream.input_secret is not None:
                entry["inputSecret"] = stream.input_secret
            described.append(entry)
        answer, fds = self.request(ADOPT, {"process": process, "streams": described}, [s.fd for s in streams])
        for fd in fds:
            os.close(fd)
        # A broker older than this field kept every process it could without saying so.
        return Adopted(bool(answer.get("survivesBrokerCrash", True)), answer.get("reason"))

    def release(self, process: str) -> List[Tuple[dict, int]]:
        """Stops relaying the process's streams and takes their fds back: a list of (stream
        description, fd). A stream whose fd the broker had already closed (stdin the host
        ended) is not in it. The fds are ours to close."""
        answer, fds = self.request(RELEASE, {"process": process})
        streams = answer.get("streams", [])
        if any(not 0 <= s.get("fd", -1) < len(fds) for s in streams):
            for fd in fds:
                os.close(fd)
            raise ProtocolError(f"release described {len(streams)} streams but carried {len(fds)} fds")
        return [(s, fds[s["fd"]]) for s in streams]

    def process_exited(self, process: str, drain_timeout: Optional[float] = None) -> None:
        """Says the process exited: the broker delivers what is left of its output (giving up
        after the drain timeout without progress: `drain_timeout` seconds, or its configured
        one), closes its fds and forgets it. It never learns of an exit otherwise: without this
        (or a release) the process stays in its table, fds and all."""
        body = {"process": process}
        if drain_timeout is not None:
            body["drainTimeoutMilliseconds"] = int(drain_timeout * 1000)
        self.request(PROCESS_EXITED, body)

    def close_stdin(self, process: str) -> None:
        """Ends the process's stdin: it reads end-of-file once what the host sent is written."""
        self.request(CLOSE_STDIN, {"process": process})

    def resize(self, process: str, rows: int, columns: int) -> None:
        """Sets the size of the process's terminal (its `tty` stream); it gets SIGWINCH."""
        self.request(RESIZE, {"process": process, "rows": rows, "columns": columns})

    def list(self) -> List[dict]:
        """Every stream of this runtime's processes the broker holds (a handoff peer sees only
        what its uid handed over), with state and byte counts. The broker answers a page at a
        time (at most 1,000 streams, and what fits one frame) with the `total`: every page is
        asked for."""
        streams: List[dict] = []
        while True:
            answer, fds = self.request(LIST, {"offset": len(streams)})
            for fd in fds:
                os.close(fd)
            page = answer.get("streams", [])
            streams += page
            if not page or len(streams) >= answer.get("total", len(streams)):
                return streams


def adopt(path: str, process: str, streams: Sequence[Stream], within: float = 30.0,
          said=lambda message: None) -> Adopted:
    """`Client.adopt` on a connection of its own, settled if the broker dies inside it.

    A broker that dies while it adopts a process may or may not have taken it: the connection
    ends without an answer (ProtocolError). It hands the process to the supervisor before it
    relays anything, so either the restarted broker has it (and `list` shows it), or the fds it
    had received died with it and nothing of the process was read. So this asks the restarted
    broker's `list` (answered only once every process is back with it), and adopts again, with
    the same fds, if the process is not there — until `within` seconds have passed. The fds stay
    ours throughout: close them once this returns. Any error the broker answers is raised at
    once (`process-exists` too, unless an earlier try may have been taken meanwhile). `said` gets
    a line per retry. Returns whether the process survives a broker crash (`Client.adopt`; one
    the restarted broker had taken did)."""
    deadline = time.monotonic() + within
    unsettled = False  # an earlier try got no answer: it may have been taken
    while True:
        try:
            with Client(path) as broker:
                if unsettled and any(s.get("process") == process for s in broker.list()):
                    said("the broker had taken it before it died: not adopted again")
                    return Adopted(True)
                return broker.adopt(process, streams)
        except BrokerError as error:
            # After a try without an answer, `process-exists` may be that try, answered late
            # (a broker slower than our timeout): `list` settles it on the next round.
            if not (unsettled and error.code == "process-exists") or time.monotonic() >= deadline:
                raise
        except (ProtocolError, ConnectionError, socket.timeout) as error:
            if time.monotonic() >= deadline:
                raise
            said(f"the adopt got no answer ({error}): asking the broker whether it took it")
            unsettled = True
        time.sleep(0.2)


def release(path: str, process: str, within: float = 30.0,
            said=lambda message: None) -> List[Tuple[dict, int]]:
    """`Client.release` on a connection of its own, asked again if the broker dies inside it.

    A broker that dies while it releases a process may or may not have sent the fds: the
    connection ends without an answer (ProtocolError). The restarted broker keeps the fds for
    `handoff.release_kept_for` (60 s by default) and answers the next release of the process
    with them, so this asks again, on a new connection, until `within` seconds have passed (the
    socket stays open while the broker restarts: a connection waits for the next broker, which
    answers once every process is back with it). Any error the broker answers is raised at
    once. `said` gets a line per retry."""
    deadline = time.monotonic() + within
    while True:
        try:
            with Client(path) as broker:
                return broker.release(process)
        except (ProtocolError, ConnectionError, socket.timeout) as error:
            if time.monotonic() >= deadline:
                raise
            said(f"the release got no answer ({error}): asking again")
        time.sleep(0.2)


class ConsoleSocket:
    """A console socket, as runc's `--console-socket PATH` takes one: a Unix stream socket the
    runtime connects to and sends a container's pty master on, in one message (the pty's name as
    the payload, the master by SCM_RIGHTS). Hand what `receive` returns to the broker as a "tty"
    stream and close it here: the broker holds the master from then on (docs/PROTOCOL.md, "adopt").

        with handoff.ConsoleSocket() as console:
            runc = subprocess.Popen(["runc", "create", "--bundle", b, "--console-socket", console.path, "c2"])
            master = console.receive(gave_up=lambda: runc.poll() not in (None, 0))
        handoff.adopt(path, "c2", [handoff.Stream("tty", master, ADDRESS, token=..., secret=...)])
        os.close(master)
    """

    def __init__(self):
        # In a directory only we can enter (mkdtemp makes it 0700): nobody else can connect first
        # and hand us a terminal of theirs.
        self.directory = tempfile.mkdtemp(prefix="handoff-console-")
        self.path = os.path.join(self.directory, "console.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(self.path)
            self.sock.listen(1)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.sock.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "ConsoleSocket":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def receive(self, within: float = 30.0, gave_up=lambda: False) -> int:
        """Waits (at most `within` seconds, or until `gave_up()` says the runtime failed) for the
        runtime's connection, and returns the pty master it sent: ours to close."""
        deadline = time.monotonic() + within
        while True:
            # Asked before looking: a runtime that connected and then ended is seen connected.
            ended = gave_up()
            if select.select([self.sock], [], [], 0 if ended else 0.1)[0]:
                break
            if ended:
                raise ProtocolError("the runtime ended without sending a terminal to the console socket")
            if time.monotonic() >= deadline:
                raise ProtocolError(f"no terminal came to the console socket within {within:g} s")
        connection, _ = self.sock.accept()
        with connection:
            connection.settimeout(max(0.1, deadline - time.monotonic()))
            _, ancillary, flags, _ = connection.recvmsg(
                4096, socket.CMSG_SPACE(4 * array.array("i").itemsize), socket.MSG_CMSG_CLOEXEC)
        received = array.array("i")
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received.frombytes(data[:len(data) - len(data) % received.itemsize])
        if flags & socket.MSG_CTRUNC or len(received) != 1:
            for fd in received:
                os.close(fd)
            raise ProtocolError(f"the runtime sent {len(received)} fds to the console socket, not 1 (a pty master)")
        return received[0]


# ---- command line ---------------------------------------------------------------------------

KINDS = ("stdin", "stdout", "stderr")
MODES = ("resumable", "raw")


def read_secret_file(path: str) -> str:
    """The hex secret in `path`, a file only its owner may read (never on the command line,
    where `ps` would show it)."""
    try:
        info = os.stat(path)
    except OSError as error:
        raise UsageError(f"{path}: {error.strerror} (the stream's secret, hex, from the host)")
    if info.st_mode & 0o077:
        raise UsageError(f"{path}: mode {info.st_mode & 0o777:o} lets others read it (chmod 600 {path})")
    with open(path) as handle:
        text = "".join(handle.read().split())
    try:
        length = len(bytes.fromhex(text))
    except ValueError:
        raise UsageError(f"{path}: a stream secret must be hex digits")
    if not 16 <= length <= 64:
        raise UsageError(f"{path}: a stream secret must be 16 to 64 bytes, not {length}")
    return text


def said_on_stderr(line: str) -> None:
    print(f"handoff.py: {line}", file=sys.stderr, flush=True)


def adoption_report(process: str, survives: Adopted, streams: List[dict]) -> dict:
    """What adopt prints (one JSON line), and the line on stderr for a process the broker could
    not make survive a broker crash."""
    if not survives:
        said_on_stderr("the broker relays the process but could not make it survive a broker crash: "
                       f"{survives.reason or 'its log says why'}")
    report = {"process": process, "survivesBrokerCrash": survives.survives, "streams": streams}
    if survives.reason:
        report["reason"] = survives.reason
    return report


def report_and_wait(report: dict, child: Optional[subprocess.Popen], wait: bool) -> int:
    """Prints the report (with COMMAND's pid, if one was started) and, with --wait, exits with
    COMMAND's status. The broker does not learn of the exit: it relays until end-of-file."""
    if child is not None:
        report["pid"] = child.pid
    print(json.dumps(report), flush=True)
    if child is None or not wait:
        return 0
    code = child.wait()
    return code if code >= 0 else 128 - code


def run_adopt(args: argparse.Namespace) -> int:
    named = [kind for kind in KINDS if getattr(args, kind)]
    if args.tty:
        if named:
            raise UsageError(f"--tty is the process's whole stdio: not with --{named[0]}")
        return run_adopt_tty(args)
    if args.tty_fd is not None or args.console_socket or args.tty_input:
        raise UsageError("--tty-fd, --tty-input and --console-socket go with --tty ADDRESS")
    if not named:
        raise UsageError("name at least one of --stdin, --stdout, --stderr, --tty")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    piped = [kind for kind in named if getattr(args, f"{kind}_fd") is None]
    if piped and not command:
        raise UsageError(f"--{piped[0]} needs --{piped[0]}-fd N or a COMMAND to start")

    streams, ours, theirs = [], [], {}
    for kind in named:
        fd = getattr(args, f"{kind}_fd")
        if fd is None:
            # A pipe between COMMAND and the broker: the process gets one end as its fd 0/1/2,
            # the broker the other; we keep neither.
            r, w = os.pipe()
            fd, theirs[kind] = (w, r) if kind == "stdin" else (r, w)
            ours.append(fd)
        mode = getattr(args, f"{kind}_mode") or args.mode
        token = getattr(args, f"{kind}_token")
        secret = None
        if mode == "resumable":
            if token is None:
                token = f"{args.process}-{kind}"  # the host must open a stream with this token
            secret_file = getattr(args, f"{kind}_secret_file") or args.secret_file
            if secret_file is None:
                raise UsageError(f"--{kind} is resumable: name its secret with --secret-file or --{kind}-secret-file")
            secret = read_secret_file(secret_file)
        streams.append(Stream(kind, fd, getattr(args, kind), mode, token, secret))

    # Adopt before starting the process: if the broker refuses, nothing was started.
    try:
        survives = adopt(args.socket, args.process, streams, said=said_on_stderr)
    except BaseException:
        for fd in theirs.values():
            os.close(fd)
        raise
    finally:
        for fd in ours:
            os.close(fd)  # sent (the broker has its copy) or refused: either way not ours to keep
    report = adoption_report(args.process, survives, [
        dict(kind=s.kind, address=s.address, mode=s.mode, **({"token": s.token} if s.token else {}))
        for s in streams])
    if not command:
        return report_and_wait(report, None, False)

    # COMMAND's stdio without a pipe here is /dev/null, as for a process Holdfast starts itself.
    stdio = {kind: theirs.get(kind, subprocess.DEVNULL) for kind in KINDS}
    try:
        child = subprocess.Popen(command, stdin=stdio["stdin"], stdout=stdio["stdout"],
                                 stderr=stdio["stderr"])
    except OSError:
        # Nothing will ever write to those pipes: take the streams back, not leave them parked.
        for _, fd in release(args.socket, args.process):
            os.close(fd)
        raise
    finally:
        for fd in theirs.values():
            os.close(fd)  # the process has them now; keeping a write end would hide its EOF
    return report_and_wait(report, child, args.wait)


def run_adopt_tty(args: argparse.Namespace) -> int:
    """adopt --tty: the process's terminal, whose master comes from --tty-fd N, from COMMAND (a
    runtime such as `runc create`) over a console socket, or from a pty made here for COMMAND."""
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.console_socket:
        if not any("{console-socket}" in argument for argument in command):
            raise UsageError("--console-socket: say where COMMAND takes the socket's path with {console-socket}, "
                             "e.g. -- runc create --bundle B --console-socket {console-socket} ID")
    elif args.tty_fd is None and not command:
        raise UsageError("--tty needs --tty-fd N (a pty master), --console-socket with a COMMAND that sends one, "
                         "or a COMMAND to start on a new terminal")
    mode = args.tty_mode or args.mode
    token = secret = input_token = input_secret = None
    if mode == "resumable":
        token = args.tty_token or f"{args.process}-tty"  # the host must open streams with these tokens
        secret_file = args.tty_secret_file or args.secret_file
        if secret_file is None:
            raise UsageError("--tty is resumable: name its secret with --secret-file or --tty-secret-file")
        secret = read_secret_file(secret_file)
        if args.tty_input:
            input_token = args.tty_input_token or f"{args.process}-tty-input"
            input_secret = read_secret_file(args.tty_input_secret_file or secret_file)

    child, slave = None, None
    if args.console_socket:
        with ConsoleSocket() as console:
            argv = [argument.replace("{console-socket}", console.path) for argument in command]
            # Its stdout is not ours (ours carries the report); its stderr is, for its errors.
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            try:
                master = console.receive(gave_up=lambda: child.poll() is not None)
            except ProtocolError as error:
                code = child.wait() if child.poll() is not None else None
                raise ProtocolError(f"{error} ({'it exited with status %d' % code if code is not None else 'it still runs'})")
    elif args.tty_fd is not None:
        master = args.tty_fd
    else:
        master, slave = os.openpty()
    stream = Stream("tty", master, args.tty, mode, token, secret, args.tty_input, input_token, input_secret)
    try:
        survives = adopt(args.socket, args.process, [stream], said=said_on_stderr)
    except BaseException:
        if slave is not None:
            os.close(slave)
        raise
    finally:
        if args.tty_fd is None:
            os.close(master)  # the broker has its copy (or refused it): a master kept here would hold the terminal
    described = dict(kind="tty", address=args.tty, mode=mode, **({"token": token} if token else {}))
    if args.tty_input:
        described.update(inputAddress=args.tty_input, **({"inputToken": input_token} if input_token else {}))
    report = adoption_report(args.process, survives, [described])
    if slave is not None:
        # COMMAND on the terminal's slave: its stdio, its controlling terminal, a session of its own.
        try:
            child = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                                     preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        except OSError:
            for _, fd in release(args.socket, args.process):
                os.close(fd)
            raise
        finally:
            os.close(slave)
    return report_and_wait(report, child, args.wait)


def run_release(args: argparse.Namespace) -> int:
    returned = release(args.socket, args.process, said=said_on_stderr)
    for description, fd in returned:
        # Which file came back ("pipe:[12345]": the same inode as the pipe handed over).
        description["descriptor"] = os.readlink(f"/proc/self/fd/{fd}")
        description["fd"] = fd
        print(json.dumps(description, sort_keys=True), flush=True)
        # A command cannot hand fds on to anyone after it exits: use the library for that.
        os.close(fd)
    return 0


def run_list(args: argparse.Namespace) -> int:
    with Client(args.socket) as broker:
        streams = broker.list()
    if args.json:
        print(json.dumps(streams, sort_keys=True))
        return 0
    print(f"{'PROCESS':<16} {'STREAM':<12} {'MODE':<10} {'STATE':<10} "
          f"{'TO HOST':>12} {'FROM HOST':>12}  ADDRESS")
    for s in streams:
        name = s["kind"] + ("/in" if s.get("direction") == "input" else "")
        print(f"{s['process']:<16} {name:<12} {s['mode']:<10} {s['state']:<10} "
              f"{s['bytesToHost']:>12} {s['bytesFromHost']:>12}  {s['address']}")
    return 0


def run_exited(args: argparse.Namespace) -> int:
    with Client(args.socket) as broker:
        broker.process_exited(args.process, args.drain_timeout)
    return 0


def run_close_stdin(args: argparse.Namespace) -> int:
    with Client(args.socket) as broker:
        broker.close_stdin(args.process)
    return 0


def run_resize(args: argparse.Namespace) -> int:
    with Client(args.socket) as broker:
        broker.resize(args.process, args.rows, args.columns)
    return 0


def terminal_dimension(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not 1 to 65535")
    return value


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="handoff.py",
        description="Hand a process's stdio to the Holdfast broker, or take it back.",
        epilog="Exit status: 0 done; 1 the broker refused (its error code is printed); "
               "2 bad usage or no broker to talk to; with adopt --wait, the command's own status.")
    parser.add_argument(
        "--socket", default=os.environ.get("HOLDFAST_HANDOFF_SOCKET", DEFAULT_SOCKET),
        help="the broker's handoff socket (default $HOLDFAST_HANDOFF_SOCKET, else $HOLDFAST_RUN_DIR/broker.sock, "
             "else /run/holdfast/broker.sock)")
    commands = parser.add_subparsers(dest="action", required=True)

    adopt = commands.add_parser(
        "adopt", help="hand over a process's stdio",
        description="Hand the broker the stdio of a process: fds this command inherited "
                    "(--KIND-fd N), or pipes to COMMAND, which it then starts.")
    adopt.add_argument("--process", required=True, help="the id the streams are filed under")
    adopt.add_argument("--mode", choices=MODES, default="resumable", help="every stream's mode")
    adopt.add_argument("--secret-file", metavar="FILE",
                       help="resumable streams' secret: hex, in a file only you can read (the host chose it)")
    for kind in KINDS:
        adopt.add_argument(f"--{kind}", metavar="ADDRESS", help=f"where the broker dials for {kind}")
        adopt.add_argument(f"--{kind}-mode", choices=MODES, help="this stream's mode, if not --mode")
        adopt.add_argument(f"--{kind}-token", metavar="TOKEN",
                           help=f"its resumable token (default PROCESS-{kind})")
        adopt.add_argument(f"--{kind}-secret-file", metavar="FILE",
                           help="its resumable secret, if not --secret-file's")
        adopt.add_argument(f"--{kind}-fd", type=int, metavar="N",
                           help=f"hand over inherited fd N as {kind}")
    adopt.add_argument("--tty", metavar="ADDRESS",
                       help="where the broker dials for a terminal's output: the process's whole stdio "
                            "(not with --stdin/--stdout/--stderr)")
    adopt.add_argument("--tty-mode", choices=MODES, help="the terminal's mode, if not --mode")
    adopt.add_argument("--tty-token", metavar="TOKEN", help="its resumable token (default PROCESS-tty)")
    adopt.add_argument("--tty-secret-file", metavar="FILE", help="its resumable secret, if not --secret-file's")
    adopt.add_argument("--tty-input", metavar="ADDRESS", help="where the broker dials for the terminal's input")
    adopt.add_argument("--tty-input-token", metavar="TOKEN", help="its resumable token (default PROCESS-tty-input)")
    adopt.add_argument("--tty-input-secret-file", metavar="FILE", help="its secret, if not the terminal's")
    source = adopt.add_mutually_exclusive_group()
    source.add_argument("--tty-fd", type=int, metavar="N", help="hand over inherited fd N, a pty master")
    source.add_argument("--console-socket", action="store_true",
                        help="COMMAND (a runtime: runc create) sends the pty master to a console socket made here; "
                             "{console-socket} in COMMAND is replaced by its path")
    adopt.add_argument("--wait", action="store_true", help="wait for COMMAND and exit with its status")
    adopt.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS... to start")
    adopt.set_defaults(run=run_adopt)

    release = commands.add_parser("release", help="take a process's stdio back, print what came")
    release.add_argument("--process", required=True)
    release.set_defaults(run=run_release)

    exited = commands.add_parser(
        "exited", help="say a process exited: the broker drains its output, then lets it go")
    exited.add_argument("--process", required=True)
    exited.add_argument("--drain-timeout", type=float, metavar="SECONDS",
                        help="give up on output that makes no progress for this long (default: the broker's)")
    exited.set_defaults(run=run_exited)

    close_stdin = commands.add_parser("close-stdin", help="end a process's stdin")
    close_stdin.add_argument("--process", required=True)
    close_stdin.set_defaults(run=run_close_stdin)

    resize = commands.add_parser("resize", help="set the size of a process's terminal")
    resize.add_argument("--process", required=True)
    resize.add_argument("--rows", type=terminal_dimension, required=True)
    resize.add_argument("--columns", type=terminal_dimension, required=True)
    resize.set_defaults(run=run_resize)

    listing = commands.add_parser("list", help="list every stream the broker holds")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=run_list)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UsageError as error:
        print(f"handoff.py {args.action}: {error}", file=sys.stderr)
        return 2
    except BrokerError as error:
        print(f"handoff.py: the broker refused {args.action}: {error}", file=sys.stderr)
        return 1
    except (OSError, ProtocolError) as error:
        print(f"handoff.py {args.action}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
