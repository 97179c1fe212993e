import HoldfastPosix
import HoldfastProtocol
import Testing

#if canImport(Glibc)
import Glibc
#endif

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

@testable import HoldfastSupervisor

/// The supervisor's state written down and read back: what a live upgrade hands to the next
/// binary must come back as the same table, and a version it does not know is refused.
@Suite("The process table's snapshot", .timeLimit(.minutes(5)))
struct ProcessTableSnapshotTests {
    /// A table with running, exited and done processes (direct and runc, with streams),
    /// unacknowledged exits and remembered creates.
    func populatedTable() throws -> ProcessTable {
        var table = ProcessTable(instanceID: "instance-1")
        let secret = try StreamSecret(hex: String(repeating: "ab", count: 32))
        let streams = [
            StreamDescription(kind: .stdout, fd: 0, address: "unix:/run/out.sock", mode: .resumable, token: "tok-out", secret: secret),
            StreamDescription(kind: .stdin, fd: 1, address: "unix:/run/in.sock", mode: .raw),
        ]
        for index in 0..<6 {
            let id = "p\(index)"
            guard case .start = table.creates.decide(id: id, key: "key-\(index)", live: nil) else {
                Issue.record("create \(id) not reserved")
                continue
            }
            table.started(
                ProcessTable.Entry(
                    id: id, pid: pid_t(1000 + index), viaBridge: index % 2 == 0,
                    container: index == 5 ? .init(id: id, bundle: "/bundles/\(id)") : nil, idempotencyKey: "key-\(index)",
                    leadsProcessGroup: index != 5, streams: index < 3 ? streams : [],
                    oomCounter: index == 5 ? OOMKillCounter(file: "/sys/fs/cgroup/p5/memory.events", atStart: 2) : nil))
        }
        // p1 exited, still draining; p2 and p3 done; p4 done and acknowledged (forgotten, key remembered).
        table.exited("p1", ExitReport(id: "p1", exitCode: 0, signal: nil, undelivered: 0))
        for id in ["p2", "p3", "p4"] {
            table.exited(id, ExitReport(id: id, exitCode: 137, signal: 9, undelivered: 0))
            _ = table.finish(id, ExitReport(id: id, exitCode: 137, signal: 9, undelivered: 12, outputCutShort: id == "p3" ? true : nil))
        }
        table.acknowledgeExit("p4")
        return table
    }

    /// A `holdfast wait` looks the process up, then waits for its exit: the host's
    /// acknowledgement can make the table forget it in between (both take the exit). The wait
    /// then registered a waiter nobody would ever resume — the request hung for good (seen once:
    /// a test's `wait` left its process, the daemon and its cgroup behind for hours). Now it is
    /// told the process is gone; a newer process under the id is not taken for the one looked at.
    @Test func aWaitForAProcessTheTableNoLongerHasIsToldSoInsteadOfWaitingForEver() async throws {
        var table = try populatedTable()
        func outcome(_ id: String, pid: pid_t? = nil) async -> String {
            var found = ""
            _ = await withCheckedContinuation { (continuation: CheckedContinuation<ExitReport?, Never>) in
                switch table.wait(for: id, pid: pid, continuation) {
                case .done(let report):
                    found = "done \(report.exitCode)"
                    continuation.resume(returning: report)
                case .gone:
                    found = "gone"
                    continuation.resume(returning: nil)
                case .waiting:
                    found = "waiting"
                    for waiter in table.finish(id, ExitReport(id: id, exitCode: 3, signal: nil, undelivered: 0)) ?? [] {
                        waiter.resume(returning: nil)
                    }
                }
            }
            return found
        }
        #expect(await outcome("p4") == "gone", "acknowledged and forgotten")
        #expect(await outcome("nobody") == "gone")
        #expect(await outcome("p2", pid: 1002) == "done 137")
        #expect(await outcome("p2", pid: 4242) == "gone", "another process under the id")
        #expect(await outcome("p0", pid: 1000) == "waiting", "running: woken when it is done")
    }

    @Test func aTableWithProcessesExitsAndLedgerEntriesRoundTrips() throws {
        let table = try populatedTable()
        let snapshot = table.snapshot()
        // What the table holds, as the snapshot says it.
        #expect(snapshot.version == ProcessTable.Snapshot.currentVersion)
        #expect(snapshot.instanceID == "instance-1")
        #expect(snapshot.processes.map(\.id) == ["p0", "p1", "p2", "p3", "p5"])
        #expect(snapshot.processes.map(\.phase) == [.running, .exited, .done, .done, .running])
        #expect(snapshot.unacknowledgedExits.map(\.id) == ["p2"])  // p3 was not the host's; p4 acknowledged
        #expect(snapshot.rememberedCreates == [CreateLedger.Remembered(id: "p4", key: "key-4", pid: 1004)])

        let bytes = try JSONEncoder().encode(snapshot)
        let decoded = try JSONDecoder().decode(ProcessTable.Snapshot.self, from: bytes)
        #expect(decoded == snapshot)
        var restored = try ProcessTable(restoring: decoded)
        #expect(restored.snapshot() == snapshot)
        #expect(restored.statuses == table.statuses)
        #expect(restored["p5"]?.container == .init(id: "p5", bundle: "/bundles/p5"))
        #expect(restored["p5"]?.oomCounter == OOMKillCounter(file: "/sys/fs/cgroup/p5/memory.events", atStart: 2), "an OOM kill after the upgrade is counted from the start")
        // A state an earlier binary wrote has no counters: its processes' exits say nothing of OOM kills.
        let earlier = try ControlJSON.decode(
            ProcessTable.Snapshot.self,
            from: Array(
                #"{"version":1,"instanceID":"i","processes":[{"id":"a","pid":1,"viaBridge":true,"leadsProcessGroup":true,"streams":[],"phase":"running"}],"rememberedCreates":[],"unacknowledgedExits":[]}"#
                    .utf8), frameType: 0)
        #expect(earlier.processes.first?.oomCounter == nil)
        #expect(restored["p0"]?.streams.first?.secret == table["p0"]?.streams.first?.secret)

        // The restored ledger still knows the forgotten create by its key, and the live ones.
        guard case .repeated(let pid) = restored.creates.decide(id: "p4", key: "key-4", live: nil) else {
            Issue.record("a repeat of the forgotten create was not recognised")
            return
        }
        #expect(pid == 1004)
        guard case .repeated(1000) = restored.creates.decide(id: "p0", key: "key-0", live: restored["p0"].map { ($0.idempotencyKey, $0.pid) }) else {
            Issue.record("a repeat of a live create was not recognised")
            return
        }
        // And it goes on: p1's drain finishes after the restore.
        #expect(restored.finish("p1", ExitReport(id: "p1", exitCode: 0, signal: nil, undelivered: 0)) != nil)
        #expect(restored.unacknowledgedExits.map(\.id) == ["p2"])  // p1 was not created by the host
    }

    @Test func aSnapshotOfAnotherVersionIsRefusedWithTheReason() throws {
        var snapshot = try populatedTable().snapshot()
        snapshot.version = ProcessTable.Snapshot.currentVersion + 1
        #expect {
            _ = try ProcessTable(restoring: snapshot)
        } throws: { error in
            guard let error = error as? HoldfastError else { return false }
            return error.code == .incompatibleState && error.message.contains("version \(snapshot.version)")
        }
    }

    @Test func theRememberedOrderSurvivesSoEvictionStaysOldestFirst() {
        var ledger = CreateLedger(capacity: 3)
        for index in 0..<5 { ledger.forgotten(id: "id\(index)", key: "k\(index)", pid: pid_t(index)) }
        let restored = CreateLedger(capacity: 3, restoring: ledger.rememberedInOrder)
        #expect(restored.rememberedInOrder.map(\.id) == ["id2", "id3", "id4"])
        #expect(restored.rememberedInOrder == ledger.rememberedInOrder)
    }
}
