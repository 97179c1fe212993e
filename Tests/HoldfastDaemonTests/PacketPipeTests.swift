import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A process that puts its stdout pipe in packet mode (`fcntl(1, F_SETFL, O_DIRECT)`): each
/// of its writes is a packet, and a read shorter than a packet takes the start of it and the
/// kernel drops the rest. The broker reads as much as its ring has room for, and a ring that
/// filled during a blackout has room for less than a packet: its reads must never cut one.
@Suite("A process whose stdout pipe is in packet mode (O_DIRECT)", .timeLimit(.minutes(3)))
struct PacketPipeTests {
    static let records = 1500
    /// Records of 1,001 to 4,096 bytes (record i: 1001 + i * 997 % 3096), each one write: a
    /// packet, of sizes that do not divide the ring's capacity.
    static func size(_ i: Int) -> Int { 1001 + i * 997 % 3096 }
    static let writer = """
        import fcntl, os
        fcntl.fcntl(1, fcntl.F_SETFL, fcntl.fcntl(1, fcntl.F_GETFL) | os.O_DIRECT)
        for i in range(\(records)):
            head = ("%07d " % i).encode()
            os.write(1, head + b"x" * (1001 + i * 997 % 3096 - len(head) - 1) + b"\\n")
        """

    static func expected() -> [UInt8] {
        Array((0..<records).map { i in
            let head = String(repeating: "0", count: 7 - String(i).count) + String(i) + " "
            return head + String(repeating: "x", count: size(i) - head.count - 1) + "\n"
        }.joined().utf8)
    }

    @Test(.enabled(if: DaemonFixture.canRun && ContainmentTests.hasPython, "needs root (the broker runs as a uid of its own) and python3"))
    func everyPacketArrivesWholeAcrossBlackouts() async throws {
        let daemon = try await DaemonFixture(ringCapacity: "64KiB")
        defer { daemon.cleanUp() }
        let output = collect(try daemon.streams.open(token: bytes("p-out"), direction: .receive))
        blackout(daemon)
        _ = try await daemon.launch(ProcessSpec(id: "packets", argv: ["python3", "-c", Self.writer], stdout: daemon.spec("p-out")))
        // Blackouts while it writes: the ring fills, then drains as the host reads and acknowledges.
        for round in 1...12 {
            try await Task.sleep(for: .milliseconds(150 + round * 13 % 100))
            lightsOn(daemon)
            try await Task.sleep(for: .milliseconds(20 + round * 7 % 40))
            blackout(daemon)
        }
        lightsOn(daemon)
        let report = try await withTimeout("the writer's exit", .seconds(60)) { try await daemon.wait("packets") }
        #expect(report.exitCode == 0 && report.undelivered == 0 && report.lost == nil, "\(report)")
        let data = try await withTimeout("the output", .seconds(60)) { await output.value }
        let expected = Self.expected()
        #expect(data.count == expected.count && data == expected, "\(data.count) bytes of \(expected.count), every one exact")
        #expect(try await daemon.stop() == .exited(0))
    }
}
