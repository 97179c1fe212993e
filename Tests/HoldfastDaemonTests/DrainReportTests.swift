import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import NIOConcurrencyHelpers
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// An exit's `undelivered` says how many of the process's bytes never reached the host: what the
/// host did not get is counted there, or the exit says the count is not final.
@Suite("The exit's undelivered count covers every byte the host did not get", .timeLimit(.minutes(3)))
struct DrainReportTests {
    /// The host takes a process's output slowly after its exit, then goes away (a migration's
    /// blackout, a host agent restarting) with bytes still on their way. The stream gives up a
    /// drain timeout after its last progress, which came after the broker's bounded wait for the
    /// relay (a drain timeout and a second from the exit) had ended: that wait reported the
    /// stream "still open" with nothing undelivered, and the bytes given up a moment later were
    /// never counted — the host lost them under an exit that said 0.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the broker runs as a uid of its own"))
    func bytesGivenUpAfterTheRelaysWaitAreStillCounted() async throws {
        // A 10 s drain timeout: the host's progress below must land more than a second after
        // the exit (so the give-up it puts off comes past the relay's wait, a drain timeout and a
        // second from the exit) and before the stream gives up on its earlier progress (a drain
        // timeout after that). With 2 s the window was under a second wide, and a loaded run's
        // late status poll or late wake-up could miss it.
        let daemon = try await DaemonFixture(drainTimeout: "10s")
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let id = "slow"
        let output = try daemon.streams.open(token: bytes("\(id)-out"), direction: .receive)
        // The host's reader takes 4 KiB chunks, only as many as it is allowed: its stream
        // acknowledges no more than it read.
        let allowed = NIOLockedValueBox(4096)
        let received = Accumulated()
        let reader = Task {
            var chunks = output.chunks(maximumChunk: 4096).makeAsyncIterator()
            while !Task.isCancelled {
                if received.count >= allowed.withLockedValue({ $0 }) {
                    try? await Task.sleep(for: .milliseconds(10))
                    continue
                }
                guard let chunk = await chunks.next() else { return }
                received.append(chunk)
            }
        }
        defer { reader.cancel() }
        let payload = (0..<600_000).map { _ in UInt8.random(in: 0...255) }
        let payloadPath = daemon.directory.file("payload")
        try writeFile(payloadPath, payload)
        _ = try await daemon.bridge.create(ProcessSpec(id: id, argv: ["cat", payloadPath], stdout: daemon.spec("\(id)-out")))
        try await eventually("the process exited, its output on its way") {
            try await daemon.status().processes.first { $0.id == id }?.state == .exited
        }
        // Progress 2 s into the 10 s drain timeout: the stream's next give-up is 10 s after it,
        // past the relay's wait (11 s from the exit).
        try await Task.sleep(for: .seconds(2))
        allowed.withLockedValue { $0 += 8192 }
        try await eventually("the host read on") { received.count >= 8192 + 4096 }
        try await Task.sleep(for: .milliseconds(100))  // its acknowledgement sent
        reader.cancel()
        daemon.streams.setRefusing(true)
        daemon.streams.dropAllConnections()

        try await eventually("the exit", timeout: .seconds(30)) { exits.count(id) == 1 }
        let report = try #require(exits.all.first { $0.id == id })
        let got = received.bytes
        #expect(Array(payload.prefix(got.count)) == got, "what arrived is the output's start")
        #expect(report.undelivered > 0 && got.count + Int(report.undelivered) >= payload.count,
                "every byte the host did not get is counted: \(got.count) received, \(report)")
        #expect(report.outputCutShort == nil, "the stream's end was waited for: an exact count")
        print("given up after the relay's wait: \(got.count) bytes received, \(report.undelivered) undelivered of \(payload.count)")
        #expect(try await daemon.stop() == .exited(0))
    }
}
