import HoldfastProtocol
import HoldfastTools
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

@Suite("holdfast status prints what others chose as text", .timeLimit(.minutes(5)))
struct StatusPrintableTests {
    /// An id, an address and a dial error a runtime chose, holding escape sequences (a window
    /// title, a clipboard write, a screen clear): `holdfast status` writes them out, so none
    /// reaches root's terminal; its own colours still do.
    @Test func controlCharactersInIdsAndAddressesAreWrittenOut() {
        let hostile = "x\u{1b}]52;c;AAAA\u{07}\u{1b}[2J\u{9b}1A\n<2>"
        var stream = StreamStatus(
            process: hostile, kind: .stdout, mode: .resumable, address: "unix:/" + hostile, state: .parked,
            bytesToHost: 0, bytesFromHost: 0, reconnects: 0, undelivered: 0)
        stream.lastDialError = "connect unix:/\(hostile): No such file or directory"
        let process = ProcessStatus(id: hostile, pid: 7, state: .running, exitCode: nil)
        let report = StatusReport(version: "test", pid: 1, uptimeSeconds: 1, bridge: .up, roles: [], processes: [process], streams: [stream])
        let plain = StatusPrinter.render(report, colour: false)
        let controls = plain.unicodeScalars.filter { $0 != "\n" && TerminalText.isControl($0) }
        #expect(controls.isEmpty, "\(plain.debugDescription)")
        #expect(plain.contains(#"x\u{1b}]52;c;AAAA\u{7}\u{1b}[2J\u{9b}1A\n<2>"#), "\(plain)")
        let coloured = StatusPrinter.render(report, colour: true)
        #expect(!coloured.contains("\u{1b}]") && !coloured.contains("\u{1b}[2J") && coloured.contains("\u{1b}[33m"), "\(coloured.debugDescription)")
    }
}
