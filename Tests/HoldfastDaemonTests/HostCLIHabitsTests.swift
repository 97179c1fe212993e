import Foundation
import HoldfastPosix
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// podman habits at the `holdfast host` CLI.
@Suite("host CLI: podman habits", .timeLimit(.minutes(3)))
struct HostCLIHabitsTests {
    /// `host kill 1 2` (two ids, podman's form) is refused, not read as SIGINT to 1; `host exec`
    /// on a direct process says it is one; `host wait A B | head -1` gets A's line as soon as A
    /// ends (stdout line-buffered into a pipe).
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func killExecAndWaitAsAPodmanUserExpects() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let serve = try await HostServeFixture.start(daemon)
        for id in ["1", "2"] {
            let started = try await serve.cli(["run", "-d", "--id", id, "--", "sleep", "1000"])
            #expect(started.status == .exited(0), "\(started.err)")
        }
        let ambiguous = try await serve.cli(["kill", "1", "2"])
        #expect(ambiguous.status == .exited(125) && ambiguous.err.contains("both a signal and a process's id"), "\(ambiguous.err)")
        let ps = try await serve.cli(["ps"])
        #expect(ps.out.split(separator: "\n").filter { $0.contains("running") }.count == 2, "neither was signalled: \(ps.out)")

        let exec = try await serve.cli(["exec", "1", "--", "ls"])
        #expect(exec.status == .exited(125) && exec.err.contains("is a direct process, not a runc container"), "\(exec.err)")

        // `wait quick 2 | head -1`: quick's status as soon as it ends, not when 2 does.
        _ = try await serve.cli(["run", "-d", "--id", "quick", "--", "true"])
        let pipe = try PipeEnds.make()
        let waiting = try serve.start(["wait", "quick", "2"], stdout: pipe.write)
        close(pipe.write)
        var line: [UInt8] = []
        var byte: UInt8 = 0
        let reader = Task { () -> [UInt8] in
            while line.last != UInt8(ascii: "\n"), read(pipe.read, &byte, 1) == 1 { line.append(byte) }
            return line
        }
        let first = try await withTimeout("quick's status through the pipe", .seconds(20)) { await reader.value }
        #expect(first == Array("0\n".utf8), "\(String(decoding: first, as: UTF8.self))")
        close(pipe.read)
        _ = try await serve.cli(["kill", "-s", "KILL", "1", "2"])
        _ = try await waiting.finish(within: .seconds(30))
        #expect(try await daemon.stop() == .exited(0))
    }

    /// A request to a stopped `host serve` (Ctrl-Z in its terminal) ends within its bound,
    /// saying host serve's pid is stopped. Before, `host ps` hung without a word.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aStoppedHostServeIsSaidNotWaitedForEver() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let serve = try await HostServeFixture.start(daemon)
        #expect(kill(serve.pid, SIGSTOP) == 0)
        defer { kill(serve.pid, SIGCONT) }
        try await eventually("host serve stopped") { ProcessRunState.of(serve.pid) == .stopped }
        let ps = try await serve.cli(["ps"], within: .seconds(60))
        #expect(ps.status == .exited(125), "\(ps.err)")
        #expect(ps.err.contains("did not answer within") && ps.err.contains("pid \(serve.pid) is stopped"), "\(ps.err)")
        kill(serve.pid, SIGCONT)
        #expect(try await daemon.stop() == .exited(0))
    }

    /// `host logs -f` left with Ctrl-C (as it is meant to be) puts its output's flags back: the
    /// terminal it shares with the shell is not left non-blocking. Before, the next program
    /// writing to it failed with EAGAIN.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func logsFollowEndedByCtrlCLeavesTheTerminalBlocking() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let serve = try await HostServeFixture.start(daemon)
        _ = try await serve.cli(["run", "-d", "--id", "svc", "--", "sh", "-c", "while :; do echo tick; sleep 0.05; done"])
        let terminal = try TestTerminal()
        #expect(fcntl(terminal.slave, F_GETFL) & O_NONBLOCK == 0)
        let client = try serve.start(["logs", "-f", "svc"], stdout: terminal.slave)
        try await terminal.expect("tick")
        #expect(kill(client.pid, SIGINT) == 0)
        let ended = try await client.finish(within: .seconds(20))
        #expect(ended.status == .signaled(SIGINT))
        #expect(fcntl(terminal.slave, F_GETFL) & O_NONBLOCK == 0, "the terminal's description is blocking again")
        _ = try await serve.cli(["kill", "svc"])
        #expect(try await daemon.stop() == .exited(0))
    }

    /// Ctrl-Z (SIGTSTP) stops a `host run -t` client with the shell's terminal put back: out of
    /// raw mode and blocking; `fg` (SIGCONT) makes it raw and non-blocking again, and typing
    /// reaches the process. Before, the kernel's default stop left the terminal raw and
    /// non-blocking for the shell. The client runs as a job does, in a process group of its own
    /// under a shell with job control (`set -m`): the kernel does not stop an orphaned group.
    /// (The shell is given no terminal, so it takes none as its controlling terminal and the
    /// job is not a background one to it; the job opens the terminal by its path.)
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func ctrlZStopsTheClientWithTheTerminalPutBack() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let serve = try await HostServeFixture.start(daemon)
        let terminal = try TestTerminal()
        defer { terminal.close() }
        let path = try #require(try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(terminal.slave)"))
        let pidFile = daemon.directory.file("job.pid")
        let nothing = open("/dev/null", O_RDWR | O_CLOEXEC)
        defer { close(nothing) }
        let shell = try daemon.processes.start(
            ["/bin/bash", "-c", "set -m; \"$@\" < \(path) > \(path) 2>&1 & echo $! > \(pidFile); while kill -0 $! 2>/dev/null; do sleep 0.1; done; wait $!; echo $? > \(pidFile).status",
             "bash", holdfastExecutable(), "host", "run", "--control", serve.control, "-t", "--id", "job", "--", "cat"],
            stdin: nothing, stdout: nothing, stderr: nothing)
        var client: pid_t = 0
        try await eventually("the job's pid") {
            client = pid_t(String(decoding: readFile(pidFile) ?? [], as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0
            return client > 0
        }
        // Pinned: bash reaps the client when it ends, and a signal sent by number after that
        // reaches whatever process the kernel gave the number to next (another test's client).
        let pinned = try #require(PinnedProcess(client), "the client still there to pin")
        defer {
            pinned.signal(SIGCONT)
            pinned.signal(SIGKILL)
        }
        #expect(getpgid(client) == client && getpgid(client) != getpgid(shell), "the job has a process group of its own")
        func canonical() -> Bool {
            var settings = termios()
            return tcgetattr(terminal.slave, &settings) == 0 && settings.c_lflag & tcflag_t(ICANON) != 0
        }
        /// The job's description of the terminal (its stdin), as /proc shows its flags (octal).
        func blocking() -> Bool {
            let info = String(decoding: readFile("/proc/\(client)/fdinfo/0") ?? [], as: UTF8.self)
            guard let line = info.split(separator: "\n").first(where: { $0.hasPrefix("flags:") }),
                let flags = Int32(line.dropFirst("flags:".count).trimmingCharacters(in: .whitespaces), radix: 8)
            else { return false }
            return flags & O_NONBLOCK == 0
        }
        try await eventually("the client made the terminal raw and non-blocking") { !canonical() && !blocking() }
        try await terminal.type("one\r")
        // Both: the remote terminal's echo and cat's line (nothing left in flight at the stop).
        try await eventually("'one' twice on the terminal") { terminal.shown.components(separatedBy: "one").count - 1 >= 2 }

        #expect(pinned.signal(SIGTSTP))
        try await eventually("the client stopped", timeout: .seconds(60)) { ProcessRunState.of(client) == .stopped }
        #expect(canonical(), "the terminal out of raw mode for the shell")
        #expect(blocking(), "the terminal's description blocking for the shell")

        #expect(pinned.signal(SIGCONT))
        try await eventually("raw and non-blocking again") { !canonical() && !blocking() }
        try await eventually("the client running again") { ProcessRunState.of(client) != .stopped }
        try await terminal.type("two\r")
        // Twice, as `one`: the remote terminal's echo and cat's line (a local echo, the
        // terminal canonical again, would show it once). Once, in a loaded run of the whole
        // suite, neither came within 30 s, and the client had let go meanwhile (it said
        // "SIGTERM passed on": a SIGTERM from outside the test; cause not found). What the
        // client was doing, and how its job ended, is printed; it is typed again once, only
        // while the client runs and the terminal is raw: a second loss fails the test.
        func twiceTwo() -> Bool { terminal.shown.components(separatedBy: "two").count - 1 >= 2 }
        do {
            try await eventually("'two' twice on the terminal", timeout: .seconds(10)) { twiceTwo() }
        } catch {
            let threads = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(client)/task")) ?? []
            let states = threads.map { thread in
                let wchan = String(decoding: readFile("/proc/\(client)/task/\(thread)/wchan") ?? [], as: UTF8.self)
                return "\(thread):\(ProcessRunState.of(pid_t(thread) ?? 0)):\(wchan)"
            }
            let ended = String(decoding: readFile(pidFile + ".status") ?? [], as: UTF8.self)
            print("ctrlZ: 'two' not echoed within 10 s; the terminal showed \(terminal.shown.debugDescription); canonical \(canonical()), blocking \(blocking()); client threads \(states); the job's exit status \(ended.isEmpty ? "none yet" : ended)")
            #expect(pinned.signal(0) && !canonical(), "the client still runs, its terminal raw")
            try await terminal.type("two\r")
        }
        try await eventually("'two' twice on the terminal", timeout: .seconds(30)) { twiceTwo() }

        let killed = try await serve.cli(["kill", "job"])
        #expect(killed.status == .exited(0), "\(killed.err)")
        #expect(try await daemon.processes.wait(shell, timeout: .seconds(30)) == .exited(0))
        #expect(canonical(), "put back at the end")
        #expect(try await daemon.stop() == .exited(0))
    }

    /// host serve goes on accepting on its control socket after an accept failed for want of
    /// fds: the connection waits, the failure is said, and once fds come free `host ps` is
    /// answered. Before, the accept loop ended at the first failure, and every `holdfast host`
    /// command after it hung in the backlog.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func hostServeAcceptsAgainAfterRunningOutOfFds() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let serve = try await HostServeFixture.start(daemon, openFileLimit: (soft: 128, hard: 128))
        // Connections host serve accepts and holds (each costs it an fd) until it has none.
        var held: [Int32] = []
        defer { for fd in held { close(fd) } }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { path in
            for (index, byte) in serve.control.utf8.enumerated() { path[index] = byte }
        }
        for _ in 0..<200 {
            let fd = socket(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            guard fd >= 0 else { break }
            held.append(fd)
            _ = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
        }
        // host serve at its limit: the next accept fails (EMFILE).
        try await eventually("host serve holding every fd it may") {
            ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(serve.pid)/fd").count) ?? 0) >= 127
        }
        for fd in held { close(fd) }
        held = []
        let ps = try await serve.cli(["ps"], within: .seconds(60))
        #expect(ps.status == .exited(0), "answered once fds came free: \(ps.err)")
        #expect(serve.log.contains("a control connection could not be accepted"), "the failure was said: \(serve.log.suffix(1000))")
        #expect(try await daemon.stop() == .exited(0))
    }
}

