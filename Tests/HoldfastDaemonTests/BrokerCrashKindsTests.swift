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

/// Issue 16's "done when": the broker killed with SIGKILL 100 times at random moments while
/// processes of every kind stream — pipes both ways (resumable), a terminal both ways, a
/// raw-mode output, a runc container, and a process a runtime handed over on the handoff
/// socket — checked per kind.
@Suite("A hundred broker crashes across every kind of stream", .timeLimit(.minutes(5)))
struct BrokerCrashKindsTests {
    static let kills = 100

    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aHundredBrokerKillsAcrossPipesATerminalRawModeAndRunc() async throws {
        // A broker that keeps dying comes back within 200 ms (the default back-off grows to 5 s).
        let daemon = try await DaemonFixture(brokerRestartBackoffMax: "200ms")
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let streams = try await EveryKindOfStream(daemon)
        defer { streams.close() }

        // The host types numbered lines into the pipes process's stdin and the terminal throughout.
        let typist = NumberedTypist { try await streams.pipeIn.send($0) }
        let ttyTypist = NumberedTypist { try await streams.ttyIn.send($0) }
        let started = ContinuousClock.now
        let brokers = try await killBroker(of: daemon, times: Self.kills, pause: 20...300)
        let killing = ContinuousClock.now - started
        try await Task.sleep(for: .milliseconds(500))
        let sent = await typist.stop()
        let ttySent = await ttyTypist.stop()
        #expect(await streams.pipeIn.finish() == 0, "every stdin byte acknowledged")
        // Every process is still the one we started: none died of SIGPIPE or a write error.
        let listed = try await daemon.bridge.list().processes
        for id in streams.ids {
            #expect(listed.contains { $0.id == id && $0.state == .running }, "\(id) still running after \(Self.kills) broker kills: \(listed)")
        }
        try await streams.waitForTerminalCopy(of: ttySent)
        try await streams.stopAll()
        do {
            try await eventually("every exit", timeout: .seconds(60)) { streams.ids.allSatisfy { exits.count($0) == 1 } }
        } catch {
            let status = try? await daemon.status()
            Issue.record("exits so far: \(exits.all); processes: \(String(describing: status?.processes)); streams: \(String(describing: status?.streams))\n\(daemon.log.suffix(6000))")
            throw error
        }
        try await Task.sleep(for: .milliseconds(300))
        #expect(exits.all.count == streams.ids.count, "each exit once: \(exits.all)")
        for report in exits.all {
            #expect(report.signal == streams.stopSignal(report.id), "ended by our signal, not SIGPIPE or an exit of its own: \(report)")
            #expect(report.lost == nil && report.inputRepeated == nil, "nothing lost or repeated: \(report)")
        }
        // Every read or write a kill interrupted was settled by its window's level: every
        // output exact with no gap, stdin and the terminal's input exact, raw whole. (Were one
        // not, the log would name the stdin bytes that might repeat.)
        let summary = try await streams.checkOutputs(stdinSent: sent, ttySent: ttySent)
        #expect(inputRepeats(in: daemon.log, process: "pipes").isEmpty, "no stdin write left unsettled")
        // Each broker differs from the one before (pids are reused over a long suite: pid_max is
        // 32,768 here, so an earlier broker's pid can come back); the restart count below says
        // there was one per kill.
        #expect(brokers.count == Self.kills + 1 && zip(brokers, brokers.dropFirst()).allSatisfy { $0 != $1 }, "a new broker each time")
        #expect(try await daemon.status().roles.first { $0.name == "broker" }?.restarts == Self.kills)
        // How often a kill landed inside a read or a write and its window settled it.
        let settled = daemon.log.components(separatedBy: "settled by its window's level").count - 1
        print("\(Self.kills) broker kills in \(killing): \(summary); \(settled) interrupted takes settled by their windows")
        #expect(try await daemon.stop() == .exited(0))
    }
}
