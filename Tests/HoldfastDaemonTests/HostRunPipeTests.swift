import HoldfastPosix
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// `holdfast host run … | head -1`: the client's reader goes away.
@Suite("host run into a pipe whose reader goes away", .timeLimit(.minutes(3)))
struct HostRunPipeTests {
    /// The process gets SIGPIPE as in a local pipeline, and the client ends with its outcome
    /// (141). Before, the client stopped reading its output: the process blocked once the
    /// buffers were full, and the client waited for its outcome for ever.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aClientWhoseReaderWentAwayEndsWithTheProcess() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let serve = try await HostServeFixture.start(daemon)
        let pipe = try PipeEnds.make()
        let run = try serve.start(["run", "--", "seq", "1", "5000000"], stdout: pipe.write)
        close(pipe.write)
        // `head -1`: one line, then the reader goes.
        var first: [UInt8] = []
        var byte: UInt8 = 0
        while first.last != UInt8(ascii: "\n"), read(pipe.read, &byte, 1) == 1 { first.append(byte) }
        #expect(first == Array("1\n".utf8))
        close(pipe.read)
        let finished = try await run.finish(within: .seconds(60))
        #expect(finished.status == .exited(128 + SIGPIPE), "the process's outcome: it died of SIGPIPE")
        #expect(try await daemon.stop() == .exited(0))
    }

    /// `host attach ID | head -1` and `host logs -f ID | head -1`: the client ends (as killed
    /// by SIGPIPE, for attach), and the process runs on — a viewer's pipe must not kill a
    /// service. Before, attach waited for the process's outcome for ever, its output unread.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aViewerWhoseReaderWentAwayLetsGoAndTheProcessRunsOn() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let serve = try await HostServeFixture.start(daemon)
        let started = try await serve.cli(["run", "-d", "--id", "svc", "--", "sh", "-c", "while :; do echo tick; sleep 0.01; done"])
        #expect(started.status == .exited(0), "\(started.err)")
        for command in [["attach", "svc"], ["logs", "-f", "svc"]] {
            let pipe = try PipeEnds.make()
            let client = try serve.start(command, stdout: pipe.write)
            close(pipe.write)
            var first: [UInt8] = []
            var byte: UInt8 = 0
            while first.last != UInt8(ascii: "\n"), read(pipe.read, &byte, 1) == 1 { first.append(byte) }
            #expect(first == Array("tick\n".utf8), "\(command)")
            close(pipe.read)
            let ended = try await client.finish(within: .seconds(30))
            #expect(ended.status != .exited(0) || command[0] == "logs", "\(command): \(ended.status)")
            if command[0] == "attach" { #expect(ended.status == .signaled(SIGPIPE), "\(ended.status)") }
        }
        // Still running: its output goes on.
        let ps = try await serve.cli(["ps"])
        #expect(ps.out.contains("svc") && ps.out.contains("running"), "\(ps.out)")
        _ = try await serve.cli(["kill", "svc"])
        #expect(try await daemon.stop() == .exited(0))
    }
}

/// A `host run` whose create the guest took and did not answer within the client's 30 s (its
/// bridge worker stopped): the client fails; when the guest later starts the process after all,
/// host serve kills it (no client has it, its streams are closed) and says so. Before, it ran
/// on unreachable: not in `ps`, its streams refused, blocked once its pipes filled.
@Suite("A create given up on that the guest carries out late", .timeLimit(.minutes(3)))
struct HostRunLateStartTests {
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aProcessStartedAfterItsCreateWasGivenUpOnIsKilled() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let serve = try await HostServeFixture.start(daemon)
        let worker = try #require(try await daemon.rolePID("bridge"))
        let pinned = try #require(PinnedProcess(worker))
        #expect(kill(worker, SIGSTOP) == 0)
        defer { pinned.signal(SIGCONT) }
        let ran = daemon.directory.file("late-ran")
        let run = try await serve.cli(["run", "--id", "late", "--", "sh", "-c", "touch \(ran); exec sleep 1000"], within: .seconds(90))
        #expect(run.status == .exited(125), "\(run.err)")
        #expect(access(ran, F_OK) != 0, "not started while the worker was stopped")
        #expect(kill(worker, SIGCONT) == 0)
        // Seen in the daemon's log, not by the file: host serve's SIGKILL (sent until the guest
        // says the process is gone) can reach the shell before it runs `touch` on a loaded
        // machine (a full suite once never saw the file).
        try await eventually("the late start", timeout: .seconds(30)) {
            daemon.log.split(separator: "\n").contains { $0.contains("process started") && $0.contains("process=late ") }
        }
        try await eventually("host serve killed it", timeout: .seconds(60)) { serve.log.contains("process late started after its create was given up on") }
        // Its outcome is given: a `wait` on it is answered (not parked for ever).
        let waited = try await serve.cli(["wait", "late"], within: .seconds(30))
        #expect(waited.status == .exited(125) && waited.err.contains("given up on"), "\(waited.err)")
        try await eventually("its exit in the guest", timeout: .seconds(30)) {
            try await daemon.status().processes.first { $0.id == "late" }.map { $0.state == .done } ?? true
        }
        #expect(try await daemon.stop() == .exited(0))
    }
}
