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
}
