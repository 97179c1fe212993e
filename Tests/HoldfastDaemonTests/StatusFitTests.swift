import HoldfastProtocol
import Testing

@testable import HoldfastSupervisor

@Suite("holdfast status cut to one reply", .timeLimit(.minutes(5)))
struct StatusFitTests {
    /// 3,000 streams, the last by id given up on: the report cut to one frame still shows it (and
    /// counts it by state), ahead of the healthy ones.
    @Test func aStreamInTroubleIsShownAmongThousands() {
        var streams = (0..<3000).map {
            StreamStatus(
                process: String(format: "p-%04d", $0), kind: .stdout, mode: .resumable, address: "vsock://2:6000", state: .connected,
                bytesToHost: 1 << 30, bytesFromHost: 0, reconnects: 1, undelivered: 0)
        }
        streams[2999].state = .abandoned
        let full = StatusReport(
            version: "test", pid: 1, uptimeSeconds: 1, bridge: .up, roles: [], processes: [], streams: streams)
        let report = Supervisor.fitted(full)
        #expect((report.omittedStreams ?? 0) > 0)
        #expect(report.streams.first?.process == "p-2999")
        #expect(report.streamStates == ["connected": 2999, "abandoned": 1])
    }
}
