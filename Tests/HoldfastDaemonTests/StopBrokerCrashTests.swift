import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A daemon stop whose broker dies while the stopped processes' output drains: the roles stop
/// only after the processes, so the broker is started again, handed every process back with the
/// stop's drain deadline, and drains them — every byte reaches the host, each exit once, not cut
/// short, and the daemon exits 0.
@Suite("A broker crash during a daemon stop", .timeLimit(.minutes(3)))
struct StopBrokerCrashTests {
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aBrokerKilledWhileTheStopDrainsLosesNothing() async throws {
        let daemon = try await DaemonFixture(shutdown: (grace: "15s", timeout: "40s"), brokerRestartBackoffMax: "200ms")
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let lines = 1_000_000
        let output = Accumulator(try daemon.streams.open(token: bytes("last-out"), direction: .receive))
        // It writes everything only when stopped (about 6.9 MB: much more than the pipe holds, so the
        // relay is still at it when the broker is killed), with a pause halfway: on a loaded
        // machine this test's kill once came after every byte had gone (3 busy loops and ten
        // other suites), and the pause keeps the second half for after the kill whatever the load.
        // The stop's SIGTERM must find the trap set (a full suite once sent it first: the shell
        // died of it, with no output at all): it says so in a file.
        let trapped = daemon.directory.file("trapped")
        _ = try await daemon.bridge.create(ProcessSpec(
            id: "last", argv: ["sh", "-c", "trap 'seq 1 \(lines / 2); sleep 2; seq \(lines / 2 + 1) \(lines); exit 0' TERM; touch \(trapped); while :; do sleep 0.05; done"],
            stdout: daemon.spec("last-out")))
        try await eventually("its stream connected") { try await daemon.brokerStreams().contains { $0.state == .connected } }
        try await eventually("its trap set") { access(trapped, F_OK) == 0 }
        let broker = try #require(try await daemon.rolePID("broker"))

        kill(daemon.daemonPID, SIGTERM)
        try await eventually("its output flowing", timeout: .seconds(20)) { output.count > 0 }
        kill(broker, SIGKILL)
        let killedAt = output.count
        let status = try await daemon.processes.wait(daemon.daemonPID, timeout: .seconds(60))
        #expect(status == .exited(0), "\(daemon.log.suffix(3000))")
        #expect(daemon.log.contains("role died; restarting") && daemon.log.contains("streams handed to the restarted broker"), "a broker started again during the stop")
        let expected = (1...lines).map { "\($0)\n" }.joined()
        print("the broker killed with \(killedAt) of \(expected.utf8.count) bytes at the host")
        #expect(killedAt < expected.utf8.count, "killed while the output drained")
        // Acknowledged before the daemon let the process go; our reader may still be appending.
        try? await eventually("every byte read here", timeout: .seconds(10)) { output.count >= expected.utf8.count }
        #expect(output.count == expected.utf8.count && output.text == expected, "every line once, in order: \(output.count) of \(expected.utf8.count) bytes")
        try await eventually("its exit at the host", timeout: .seconds(10)) { exits.count("last") > 0 }
        let reports = exits.all.filter { $0.id == "last" }
        #expect(reports.count == 1 && reports.first?.exitCode == 0 && reports.first?.outputCutShort != true && reports.first?.undelivered == 0, "\(reports)")
    }
}
