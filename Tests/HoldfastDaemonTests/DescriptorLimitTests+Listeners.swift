import CHoldfastTestShims
import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

extension DescriptorLimitTests {
    /// The supervisor out of fds for a moment (its soft limit lowered from outside below its
    /// open fds: every accept fails with EMFILE) while a `holdfast status` and a metrics scrape
    /// connect. Before, the control socket's and the metrics endpoint's accept loops ended at
    /// their first error: both stayed deaf for good, however many fds came free — no `holdfast`
    /// command, no scrape, until the daemon restarted. Now the connections wait in the backlog
    /// and are served once fds are free again; each listener says so once.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: prlimit on the daemon, and its broker runs as a uid of its own"))
    func theControlSocketAndTheMetricsEndpointOutliveAMomentWithoutFds() async throws {
        let daemon = try await DaemonFixture(extraConfig: "metrics:\n  address: \"unix:{run}/metrics.sock\"")
        defer { daemon.cleanUp() }
        let pid = daemon.daemonPID
        let before = try #require(OpenFileLimits.of(pid))
        func setSoftLimit(_ soft: UInt64) -> Bool { hft_set_nofile_soft(pid, soft) == 0 }
        // A soft limit of 3, under every fd it has but its stdio: no new fd can be had at all.
        // (The limit was its lowest free fd: an fd the supervisor had open for a moment when
        // the table was read made that number too high, so once it closed the control socket's
        // accept took it and succeeded — a CI run waited for a failure that never came.)
        let table = descriptorTable(pid: pid)
        try #require((0...2).allSatisfy { table[Int32($0)] != nil }, "its stdio is open: \(table)")
        #expect(setSoftLimit(3), "prlimit: errno \(errno)")
        let status = Task { try await withDeadline("status while the supervisor has no fd", .seconds(30)) { try await daemon.status() } }
        let scrape = Task {
            try await withDeadline("a scrape while the supervisor has no fd", .seconds(30)) {
                try await httpExchange(.unix(path: daemon.directory.file("metrics.sock")), "GET /metrics HTTP/1.1\r\nHost: guest\r\n\r\n")
            }
        }
        // Each accept failed (recorded, not thrown: the limit must come back either way).
        for listener in ["control socket", "metrics endpoint"] {
            await #expect(throws: Never.self) {
                try await daemon.waitForLog("\(listener): accept failed; the connection waits and is accepted again")
            }
        }
        #expect(setSoftLimit(before.soft), "prlimit back: errno \(errno)")

        let answered = try await status.value
        #expect(answered.pid == pid && answered.roles.count == 2, "the connection that waited is served: \(answered.roles)")
        #expect(try await scrape.value.contains("holdfast_bridge_up"), "the scrape that waited is answered")
        #expect(try await daemon.status().pid == pid, "and the next one")
        let lines = daemon.log.split(separator: "\n").filter { $0.contains("accept failed") }
        #expect(lines.count == 2, "one line each, however many retries: \(lines)")
        #expect(try await daemon.stop() == .exited(0))
    }
}
