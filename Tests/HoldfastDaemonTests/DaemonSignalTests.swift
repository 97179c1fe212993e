import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Signals an operator sends the supervisor by habit. Each one's default action would end it,
/// and every container with it: SIGHUP (`kill -HUP` to reload, a terminal hangup), SIGUSR1 and
/// SIGUSR2 (a dump, in other daemons), SIGQUIT (Ctrl-\).
@Suite("The supervisor's signals: HUP reloads, USR1 and USR2 are ignored, QUIT stops in order", .timeLimit(.minutes(3)))
struct DaemonSignalTests {
    /// SIGHUP reloads: a live upgrade onto the binary now at the daemon's path (the same pid,
    /// the new sha256, a stream across it exact). SIGUSR1 and SIGUSR2 change nothing but a log
    /// line, and neither is held across the upgrade's exec. SIGQUIT stops the daemon in order:
    /// the process's exit reaches the host, and the daemon exits 0. Before, SIGHUP ended the
    /// supervisor (and every container) at once.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the broker runs as a uid of its own"))
    func hangupReloadsUserSignalsAreIgnoredAndQuitStopsInOrder() async throws {
        let binary = try InstalledBinary()
        defer { binary.remove() }
        let daemon = try await DaemonFixture(executable: binary.path)
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let output = Accumulator(try daemon.streams.open(token: bytes("counter-out"), direction: .receive))
        _ = try await daemon.bridge.create(ProcessSpec(
            id: "counter", argv: ["sh", "-c", DaemonSignalTests.endlessCounter], stdout: daemon.spec("counter-out")))
        try await eventually("the counter streaming") { output.count > 0 }
        let before = try await daemon.status()

        let sha = try binary.install(variant: 1)
        #expect(kill(daemon.daemonPID, SIGHUP) == 0)
        try await eventually("the reload done", timeout: .seconds(60)) { (try? await daemon.status())?.upgrades == 1 }
        let reloaded = try await daemon.status()
        #expect(reloaded.pid == before.pid && reloaded.executableSHA256 == sha, "the same supervisor, the new binary")
        #expect(reloaded.processes.first { $0.id == "counter" }?.pid == before.processes.first { $0.id == "counter" }?.pid, "the same process")
        #expect(daemon.log.contains("SIGHUP: reloading"))

        try await eventually("both roles serving", timeout: .seconds(30)) { try await daemon.status().roles.allSatisfy { $0.pid != nil } }
        let roles = try await daemon.status().roles
        for signal in [SIGUSR1, SIGUSR2] {
            #expect(kill(daemon.daemonPID, signal) == 0)
        }
        try await eventually("both said and ignored") {
            daemon.log.contains("SIGUSR1 ignored") && daemon.log.contains("SIGUSR2 ignored")
        }
        let after = try await daemon.status()
        #expect(after.pid == before.pid && after.upgrades == 1 && after.roles.map(\.pid) == roles.map(\.pid), "nothing else changed")

        let atQuit = output.count
        try await eventually("output after the reload") { output.count > atQuit + 100 }
        #expect(kill(daemon.daemonPID, SIGQUIT) == 0)
        #expect(try await daemon.processes.wait(daemon.daemonPID, timeout: .seconds(30)) == .exited(0))
        let report = try #require(exits.all.first { $0.id == "counter" }, "the exit reached the host before the daemon ended")
        #expect(report.signal == SIGTERM && report.outputCutShort == nil && report.lost == nil, "\(report)")
        // Every line once, in order, up to the last one printed.
        let numbers = EveryKindOfStream.numbers(Array(output.text.utf8), prefix: "by")
        #expect(!numbers.isEmpty && numbers == Array(1...numbers.last!), "every line once, in order, across the reload: \(numbers.count) lines")
        print("SIGHUP reloaded (\(before.executableSHA256?.prefix(12) ?? "?") -> \(sha.prefix(12))); SIGQUIT stopped it in order after \(numbers.count) lines")
    }

    static let endlessCounter = "i=0; while :; do i=$((i+1)); echo by $i || exit 3; [ $((i % 50)) -ne 0 ] || sleep 0.02; done"
}
