import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import HoldfastTools
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A process whose output was given up on (the drain timeout passed with its host away) is
/// `done`, and its streams have left the table: `holdfast status` showed `done` and its exit
/// code, as if its output were whole. Until its exit is taken it now shows what its exit report
/// says was lost, first among the processes.
@Suite("status shows what a finished process lost", .timeLimit(.minutes(3)))
struct DoneProcessLossTests {
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aProcessWhoseOutputWasGivenUpOnSaysSo() async throws {
        let daemon = try await DaemonFixture(drainTimeout: "1s")
        defer { daemon.cleanUp() }
        // Its host never opens the stream: the output parks, and is given up 1 s after the exit.
        _ = try await daemon.launch(ProcessSpec(
            id: "unheard", argv: ["sh", "-c", "echo nobody hears this"], stdout: daemon.spec("unheard-out")))
        _ = try await daemon.launch(ProcessSpec(id: "fine", argv: ["true"]))
        try await eventually("both done", timeout: .seconds(30)) {
            let processes = try await daemon.status().processes
            return processes.count == 2 && processes.allSatisfy { $0.state == .done }
        }
        let report = try await daemon.status()
        #expect(report.processes.first?.id == "unheard", "the one that lost output first: \(report.processes.map(\.id))")
        let unheard = try #require(report.processes.first { $0.id == "unheard" })
        #expect(unheard.undelivered == UInt64("nobody hears this\n".utf8.count), "\(unheard)")
        #expect(report.processes.first { $0.id == "fine" }?.undelivered == nil)
        let shown = StatusPrinter.render(report, colour: false)
        #expect(shown.contains("unheard: 18 B of output not delivered"), "\(shown)")
        let exit = try await daemon.wait("unheard")
        #expect(exit.undelivered == 18)
        #expect(try await daemon.stop() == .exited(0))
    }
}
