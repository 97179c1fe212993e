import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import NIOConcurrencyHelpers
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Raw mode loses what a connection had taken when it died, and counts it (`status`'s
/// `undelivered`, the metrics). The exit report now carries that count too: before, it said
/// `undelivered: 0` for a raw stream that lost bytes, and once the process was forgotten nothing
/// tied the loss to it.
@Suite("Raw mode's loss reaches the exit report", .timeLimit(.minutes(3)))
struct RawLossReportTests {
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func theExitCountsWhatDyingConnectionsTook() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let path = daemon.directory.file("raw-loss.sock")
        let listener = try Listener(binding: .unix(path: path), unixMode: 0o666)
        defer { listener.close() }
        let current = NIOLockedValueBox<AsyncFD?>(nil)
        let host = Task {
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 16)
            defer { buffer.deallocate() }
            while let connection = try? await listener.accept() {
                current.withLockedValue { $0 = connection }
                while let count = try? await connection.read(into: buffer), count > 0 {}
                connection.close()
            }
        }
        defer { host.cancel() }
        _ = try await daemon.launch(ProcessSpec(id: "rawloss", argv: ["yes", "holdfast raw"], stdout: StreamSpec(address: "unix:" + path, mode: .raw)))
        // Connections dropped mid-stream until one dies holding bytes (counted by the broker).
        var counted: UInt64 = 0
        for _ in 0..<300 where counted == 0 {
            try await Task.sleep(for: .milliseconds(20))
            current.withLockedValue { $0 }?.close()
            counted = try await daemon.brokerStreams().first { $0.process == "rawloss" }?.undelivered ?? 0
        }
        try #require(counted > 0, "no dropped connection took bytes with it in 300 drops")
        try await daemon.bridge.signal("rawloss", SIGTERM)
        let exit = try await daemon.wait("rawloss")
        #expect(exit.signal == SIGTERM)
        #expect(exit.undelivered >= counted, "the exit counts the \(counted) bytes the broker had counted lost: \(exit)")
        #expect(try await daemon.stop() == .exited(0))
    }
}
