import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// `host run -i`'s stdin ends while the guest is away for longer than a stream's drain timeout
/// (30 s): a migration's blackout, a paused VM. host serve's END waited 30 s without progress,
/// then gave the stream up and forgot it: once back, the guest's redials of the stdin were
/// refused as an unknown stream, `cat` never read end-of-file, the process never exited and
/// `host run` waited for ever, nothing said. The END waits as long as the process lives now.
/// (A 35 s blackout: the test takes about 40 s.)
@Suite("A stdin's end outlasts a blackout longer than the drain timeout", .timeLimit(.minutes(3)))
struct HostStdinBlackoutTests {
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aStdinEndedDuringALongBlackoutReachesTheProcessAfterIt() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let serve = try await HostServeFixture.start(daemon)
        let typed = try PipeEnds.make()
        defer { close(typed.read) }
        var writer: Int32? = typed.write
        defer { if let writer { close(writer) } }
        let run = try serve.start(["run", "-i", "--", "sh", "-c", "cat; echo got-eof"], stdin: typed.read)
        _ = "one\n".withCString { write(typed.write, $0, 4) }
        try await eventually("the typed line echoed", timeout: .seconds(20)) { run.out == "one\n" }

        let migrate = try serve.start(["migrate", "--blackout", "35000"])
        try await eventually("the blackout begun", timeout: .seconds(10)) { serve.log.contains("migration: every connection dropped") }
        close(typed.write)  // the client's stdin ends: host serve sends END into the blackout
        writer = nil
        let migrated = try await migrate.finish(within: .seconds(60))
        #expect(migrated.status == .exited(0), "\(migrated.out)\(migrated.err)")

        let finished = try await run.finish(within: .seconds(60))
        #expect(finished.status == .exited(0), "\(finished.err)")
        #expect(finished.out == "one\ngot-eof\n", "the stdin's end reached cat after the blackout")
        #expect(try await daemon.stop() == .exited(0))
    }
}
