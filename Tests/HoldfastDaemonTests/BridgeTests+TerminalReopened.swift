import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

extension BridgeTests {
    /// A terminal process closes its terminal (every fd of it) and opens it again later, as an
    /// init system that opens the console when it has something to say, or a getty, does: what
    /// it writes after is relayed, and the stream ends with the process. Before, the master
    /// read EIO ("no slave end open") the moment the last fd closed, the relay took that for
    /// the end, and everything after was lost, with an exit saying nothing undelivered.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aTerminalClosedAndOpenedAgainKeepsItsStream() async throws {
        try await withBridgeDaemon { daemon, exits in
            let output = Accumulator(try daemon.streams.open(token: bytes("t-out"), direction: .receive))
            let closed = daemon.directory.file("closed")
            let gate = daemon.directory.file("gate")
            _ = try await daemon.bridge.create(ProcessSpec(
                id: "t",
                argv: [
                    "sh", "-c",
                    "echo before; exec </dev/null >/dev/null 2>&1; touch \(closed); while [ ! -e \(gate) ]; do sleep 0.02; done; "
                        + "exec >/dev/tty 2>&1; echo after",
                ],
                tty: true, rows: 24, columns: 80, stdout: daemon.spec("t-out")))
            try await eventually("the line before", timeout: .seconds(30)) { output.text == "before\n" }
            try await eventually("the terminal closed") { access(closed, F_OK) == 0 }
            // Long enough for a relay that took the EIO for the end to have ended the stream.
            try await Task.sleep(for: .milliseconds(500))
            #expect(exits.count("t") == 0)
            try writeFile(gate, [])
            try await eventually("the exit", timeout: .seconds(30)) { exits.count("t") == 1 }
            let report = try #require(exits.all.first { $0.id == "t" })
            #expect(report.exitCode == 0 && report.undelivered == 0 && report.lost == nil, "\(report)")
            #expect(output.text == "before\nafter\n", "what it wrote after opening its terminal again: \(output.text.debugDescription)")
            #expect(try await daemon.stop() == .exited(0))
        }
    }
}
