import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// `host serve` killed (SIGKILL) while its processes run, and started again on the same state
/// directory: it takes them up. Before, its state was in memory only: their output could not
/// resume (the secrets were gone), their stdin never ended, `wait`, `attach` and `logs` did not
/// know them, and an exit that came meanwhile was acknowledged and kept only in a log line.
@Suite("A restart of host serve loses none of its processes", .timeLimit(.minutes(4)))
struct HostServeRestartTests {
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func hostServeKilledMidStreamTakesItsProcessesUpExactly() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        var serve = try await HostServeFixture.start(daemon)

        // 20,000 numbered lines in 40 bursts, 100 ms apart: the kill lands mid-stream.
        let counter = "for b in $(seq 0 39); do seq $((b*500+1)) $((b*500+500)); sleep 0.1; done"
        let expected = (1...20_000).map { "\($0)\n" }.joined()
        var started = try await serve.cli(["run", "-d", "--name", "counter", "--", "sh", "-c", counter])
        #expect(started.status == .exited(0), "\(started.err)")
        // Exits while host serve is away: its exit must not be lost with it.
        started = try await serve.cli(["run", "-d", "--name", "quick", "--", "sh", "-c", "sleep 2; echo done-quick; exit 7"])
        #expect(started.status == .exited(0), "\(started.err)")
        started = try await serve.cli(["run", "-d", "-i", "--name", "reader", "--", "sh", "-c", "read a; echo got-$a; read b; echo got-$b"])
        #expect(started.status == .exited(0), "\(started.err)")

        // A line typed into the reader through an attach before the kill.
        let first = try PipeEnds.make()
        defer { close(first.read) }
        let attach = try serve.start(["attach", "reader"], stdin: first.read)
        _ = "one\n".withCString { write(first.write, $0, 4) }
        try await eventually("the first line read", timeout: .seconds(20)) { attach.out.contains("got-one") }

        let outputFile = daemon.directory.file("host-state/processes/0000000001/stdout.log")
        try await eventually("the counter under way", timeout: .seconds(20)) { fileSize(outputFile) > 8 + 20_000 }
        kill(serve.pid, SIGKILL)
        _ = try await daemon.processes.wait(serve.pid, timeout: .seconds(10))
        let keptAtKill = fileSize(outputFile) - 8
        close(first.write)
        let gone = try await attach.finish(within: .seconds(30))
        #expect(gone.status == .exited(125), "the attached client says host serve went away: \(gone.err)")
        #expect(gone.err.contains("holdfast host attach reader") || gone.err.contains("host serve"), "\(gone.err)")

        try await Task.sleep(for: .seconds(3))  // `quick` exits while nobody is there
        serve = try await HostServeFixture.start(daemon)
        #expect(serve.log.contains("took up 3 processes"), "\(serve.log)")
        #expect(keptAtKill < expected.utf8.count, "the kill landed mid-stream (\(keptAtKill) bytes kept)")

        // The reader's stdin is still open: a second line through a new attach.
        let second = try PipeEnds.make()
        defer { close(second.read) }
        let again = try serve.start(["attach", "reader"], stdin: second.read)
        try await Task.sleep(for: .milliseconds(300))
        _ = "two\n".withCString { write(second.write, $0, 4) }
        close(second.write)
        let reattached = try await again.finish(within: .seconds(60))
        #expect(reattached.status == .exited(0), "\(reattached.err)")
        #expect(reattached.out.contains("got-two"), "\(reattached.out) \(reattached.err)")

        let waited = try await serve.cli(["wait", "counter"])
        #expect(waited.status == .exited(0), "\(waited.out)\(waited.err)")
        let logs = try await serve.cli(["logs", "counter"])
        #expect(logs.out.utf8.count == expected.utf8.count, "every byte, once: \(logs.out.utf8.count) of \(expected.utf8.count)")
        #expect(logs.out == expected, "the counter's output is exactly 1...20000 across the restart")

        let quick = try await serve.cli(["wait", "quick"])
        #expect(quick.status == .exited(0) && quick.out == "7\n", "the exit that came while host serve was away: \(quick.out)\(quick.err)")
        #expect(try await serve.cli(["logs", "quick"]).out == "done-quick\n")
        let reader = try await serve.cli(["logs", "reader"])
        #expect(reader.out == "got-one\ngot-two\n", "\(reader.out)")
        #expect(!serve.log.contains("bytes lost"), "\(serve.log)")

        // A third life finds them finished: wait and logs still answer.
        kill(serve.pid, SIGTERM)
        #expect(try await daemon.processes.wait(serve.pid, timeout: .seconds(20)) == .exited(0))
        serve = try await HostServeFixture.start(daemon)
        #expect(serve.log.contains("3 finished ones"), "\(serve.log)")
        #expect(try await serve.cli(["wait", "quick"]).out == "7\n")
        #expect(try await serve.cli(["logs", "counter"]).out == expected)
        kill(serve.pid, SIGTERM)
        _ = try await daemon.processes.wait(serve.pid, timeout: .seconds(20))
        #expect(try await daemon.stop() == .exited(0))
    }
}

private func fileSize(_ path: String) -> Int {
    var info = stat()
    return stat(path, &info) == 0 ? Int(info.st_size) : 0
}
