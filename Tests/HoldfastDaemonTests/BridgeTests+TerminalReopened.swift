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
            try await Self.expectTerminalReopenRelayed(daemon, exits: exits)
            #expect(try await daemon.stop() == .exited(0))
        }
    }

    /// The same after a live upgrade: the image that resumed the process holds the terminal's
    /// slave end again (the previous image's closed with its exec).
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aTerminalClosedAndOpenedAgainAfterALiveUpgradeKeepsItsStream() async throws {
        let binary = try InstalledBinary()
        defer { binary.remove() }
        let daemon = try await DaemonFixture(executable: binary.path)
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        try await Self.expectTerminalReopenRelayed(daemon, exits: exits) {
            _ = try binary.install(variant: 1)
            let upgrade = try await runUpgrade(daemon, processes: daemon.processes)
            #expect(upgrade.status == .exited(0), "\(upgrade.output)")
        }
        #expect(try await daemon.status().upgrades == 1)
        #expect(try await daemon.stop() == .exited(0))
    }

    /// A terminal process that prints a line, waits until `meanwhile` is done, closes its
    /// terminal, waits, opens it again and prints another: both lines reach the host, then its
    /// exit, with nothing undelivered.
    static func expectTerminalReopenRelayed(
        _ daemon: DaemonFixture, exits: ExitLog, meanwhile: () async throws -> Void = {}
    ) async throws {
        let output = Accumulator(try daemon.streams.open(token: bytes("t-out"), direction: .receive))
        let (ready, closed, gate) = (daemon.directory.file("ready"), daemon.directory.file("closed"), daemon.directory.file("gate"))
        _ = try await daemon.bridge.create(ProcessSpec(
            id: "t",
            argv: [
                "sh", "-c",
                "echo before; while [ ! -e \(ready) ]; do sleep 0.02; done; exec </dev/null >/dev/null 2>&1; touch \(closed); "
                    + "while [ ! -e \(gate) ]; do sleep 0.02; done; exec >/dev/tty 2>&1; echo after",
            ],
            tty: true, rows: 24, columns: 80, stdout: daemon.spec("t-out")))
        try await eventually("the line before", timeout: .seconds(30)) { output.text == "before\n" }
        try await meanwhile()
        try writeFile(ready, [])
        try await eventually("the terminal closed") { access(closed, F_OK) == 0 }
        // Long enough for a relay that took the EIO for the end to have ended the stream.
        try await Task.sleep(for: .milliseconds(500))
        #expect(exits.count("t") == 0)
        try writeFile(gate, [])
        try await eventually("the exit", timeout: .seconds(30)) { exits.count("t") == 1 }
        let report = try #require(exits.all.first { $0.id == "t" })
        #expect(report.exitCode == 0 && report.undelivered == 0 && report.lost == nil, "\(report)")
        #expect(output.text == "before\nafter\n", "what it wrote after opening its terminal again: \(output.text.debugDescription)")
    }
}
