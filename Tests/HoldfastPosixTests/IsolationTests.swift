import HoldfastPosix
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The test support's own promise: a test run in a process of its own that hangs is ended at
/// its bound with an account of where it hung, not cut short by the suite's time limit with
/// no word of it (which is how one such run failed in CI once).
@Suite("Isolated test runs: a hang ends with an account", .timeLimit(.minutes(5)))
struct IsolationTests {
    @Test func anIsolatedRunThatOutlivesItsBoundIsKilledWithAnAccountOfWhereItWas() async throws {
        let name = "anIsolatedRunThatOutlivesItsBoundIsKilledWithAnAccountOfWhereItWas"
        let inChild: Bool
        do {
            inChild = try await isolated(name, timeout: .seconds(3))
        } catch let failed as IsolatedRunFailed {
            #expect(failed.outcome.contains("timed out") && failed.outcome.contains("killed"), "\(failed.outcome)")
            #expect(failed.output.contains("Test \(name)() started"), "the child's own output so far")
            let account = failed.output
            #expect(account.contains("processes under"))
            #expect(account.contains(" sleep"), "the process the child started is in the account:\n\(account)")
            #expect(account.contains("threads of"))
            if access("/usr/bin/gdb", X_OK) == 0 {
                #expect(account.contains("IsolationTests.swift:"), "gdb shows the test's frame:\n\(account)")
            }
            // Everything the account named is gone: the child and what it started.
            let named = Self.pids(in: account)
            #expect(named.count >= 2, "the child and its sleep: \(named)")
            try await eventually("every process of the hung run gone") {
                named.allSatisfy { kill($0, 0) != 0 || ProcessAccount.isZombie($0) }
            }
            return
        }
        guard inChild else {
            Issue.record("the isolated run ended although it never ends")
            return
        }
        // The child: start something, then hang holding its thread (so gdb shows this frame; a
        // suspended task has no stack to show).
        let processes = TestProcesses()
        try processes.start(["sleep", "1000"], newSession: false)
        sleep(600)
    }

    /// The pids of the account's process lines ("  pid ppid state wchan name").
    static func pids(in account: String) -> [pid_t] {
        let lines = account.split(separator: "\n")
        guard let start = lines.firstIndex(where: { $0.hasPrefix("processes under") }) else { return [] }
        return lines[(start + 1)...].prefix { $0.hasPrefix("  ") }.compactMap { pid_t($0.split(separator: " ").first ?? "") }
    }
}
