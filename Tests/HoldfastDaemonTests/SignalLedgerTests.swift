import HoldfastProtocol
import Testing

@testable import HoldfastSupervisor

@Suite("Repeating a signal: keys under way and sent (SignalLedger)", .timeLimit(.minutes(1)))
struct SignalLedgerTests {
    func entry(_ id: String) -> ProcessTable.Entry {
        ProcessTable.Entry(id: id, pid: 4242, viaBridge: true, container: nil, idempotencyKey: nil, leadsProcessGroup: true, streams: [])
    }

    @Test func aSignalSentOnceIsNotSentAgainAndOneThatFailedIs() {
        var table = ProcessTable(instanceID: "i")
        table.started(entry("a"))
        guard case .send(let first?) = table.decideSignal(to: "a", key: "k1") else {
            Issue.record("a keyed signal's first copy was not sent")
            return
        }
        table.signalSettled(to: "a", pid: 4242, key: first.key, sent: true)
        guard case .repeated = table.decideSignal(to: "a", key: "k1") else {
            Issue.record("a repeat of a sent signal would be sent again")
            return
        }
        // Another process's signal with the same key is its own.
        table.started(entry("b"))
        guard case .send(let other?) = table.decideSignal(to: "b", key: "k1") else {
            Issue.record("a key is taken as another process's")
            return
        }
        table.signalSettled(to: "b", pid: 4242, key: other.key, sent: false)
        guard case .send = table.decideSignal(to: "b", key: "k1") else {
            Issue.record("a signal that failed is not tried again")
            return
        }
        // Unkeyed signals are sent every time.
        guard case .send(nil) = table.decideSignal(to: "a", key: nil), case .send(nil) = table.decideSignal(to: "a", key: nil) else {
            Issue.record("an unkeyed signal was not sent")
            return
        }
    }

    @Test func aRepeatWhileTheFirstIsBeingSentGetsItsOutcome() async {
        var table = ProcessTable(instanceID: "i")
        table.started(entry("a"))
        guard case .send(let first?) = table.decideSignal(to: "a", key: "k"), case .join(let joined) = table.decideSignal(to: "a", key: "k") else {
            Issue.record("a repeat of a signal being sent did not join it")
            return
        }
        #expect(joined === first)
        #expect(table.signals.underWayCount == 1)
        let waiting = Task { await joined.wait() }
        // Waiting before the outcome comes (after, it would only read it).
        let deadline = ContinuousClock.now + .seconds(10)
        while joined.waiting == 0, ContinuousClock.now < deadline { await Task.yield() }
        #expect(joined.waiting == 1)
        table.signalSettled(to: "a", pid: 4242, key: "k", sent: false)
        first.resolve(.failure(HoldfastError(.notRunning, "process 'a' has exited")))
        guard case .failure(let error) = await waiting.value else {
            Issue.record("the repeat did not get the first's failure")
            return
        }
        #expect(error.code == .notRunning)
        #expect(table.signals.underWayCount == 0)
    }

    @Test func aProcessKeepsItsLastKeysAndTheSnapshotCarriesThem() throws {
        var table = ProcessTable(instanceID: "i")
        table.started(entry("a"))
        for number in 0..<(SignalLedger.keysPerProcess + 5) {
            guard case .send(let pending?) = table.decideSignal(to: "a", key: "k\(number)") else {
                Issue.record("signal \(number) was not sent")
                return
            }
            table.signalSettled(to: "a", pid: 4242, key: pending.key, sent: true)
        }
        #expect(table["a"]?.signalKeys?.count == SignalLedger.keysPerProcess, "bounded")
        #expect(table["a"]?.signalKeys?.first == "k5", "the oldest dropped first")
        // A live upgrade's next binary knows them.
        var restored = try ProcessTable(restoring: table.snapshot())
        guard case .repeated = restored.decideSignal(to: "a", key: "k\(SignalLedger.keysPerProcess + 4)") else {
            Issue.record("a signal sent before a live upgrade would be sent again after it")
            return
        }
        // A state written before signals had keys reads as none sent, none remembered.
        let old = Array(
            #"{"version":1,"instanceID":"i","processes":[{"id":"a","pid":1,"viaBridge":true,"leadsProcessGroup":true,"streams":[],"phase":"running"}],"rememberedCreates":[],"unacknowledgedExits":[]}"#
                .utf8)
        let snapshot = try ControlJSON.decode(ProcessTable.Snapshot.self, from: old, frameType: 0)
        #expect(snapshot.rememberedSignals == nil && snapshot.processes.first?.signalKeys == nil)
        var earlier = try ProcessTable(restoring: snapshot)
        guard case .send = earlier.decideSignal(to: "a", key: "k1") else {
            Issue.record("a state without keys made a signal a repeat")
            return
        }
    }

    /// A repeat that comes after the process was forgotten (a SIGKILL's exit acknowledged
    /// before its repeat arrived), or once a new process has its id: answered, not sent.
    @Test func aForgottenProcesssSignalsAreRememberedNotSentToItsSuccessor() throws {
        var table = ProcessTable(instanceID: "i")
        table.started(entry("a"))
        guard case .send(let kill?) = table.decideSignal(to: "a", key: "kill") else {
            Issue.record("the SIGKILL was not sent")
            return
        }
        table.signalSettled(to: "a", pid: 4242, key: kill.key, sent: true)
        table.exited("a", ExitReport(id: "a", exitCode: 137, signal: 9, undelivered: 0))
        _ = table.finish("a", ExitReport(id: "a", exitCode: 137, signal: 9, undelivered: 0))
        table.acknowledgeExit("a")
        #expect(table["a"] == nil, "forgotten")
        guard case .repeated = table.decideSignal(to: "a", key: "kill") else {
            Issue.record("a repeat after the process was forgotten would be sent")
            return
        }
        table.started(entry("a"))
        guard case .repeated = table.decideSignal(to: "a", key: "kill") else {
            Issue.record("the old process's signal would reach the new process of its id")
            return
        }
        guard case .send = table.decideSignal(to: "a", key: "another") else {
            Issue.record("a new signal to the new process was not sent")
            return
        }
        // Across a live upgrade too.
        var restored = try ProcessTable(restoring: table.snapshot())
        guard case .repeated = restored.decideSignal(to: "a", key: "kill") else {
            Issue.record("a live upgrade forgot a forgotten process's signals")
            return
        }
    }

    @Test func theForgottenProcessesKeysAreBounded() {
        var ledger = SignalLedger(capacity: 3)
        for number in 0..<5 { ledger.forgotten(process: "p\(number)", keys: ["k"]) }
        #expect(ledger.rememberedCount == 3)
        #expect(ledger.rememberedInOrder.map(\.process) == ["p2", "p3", "p4"], "the oldest dropped first")
        guard case .send = ledger.decide(process: "p0", key: "k", sent: nil), case .repeated = ledger.decide(process: "p4", key: "k", sent: nil) else {
            Issue.record("the bound kept the wrong keys")
            return
        }
        for number in 5..<100 { ledger.forgotten(process: "p\(number)", keys: ["k"]) }
        #expect(ledger.rememberedCount == 3 && ledger.rememberedInOrder.map(\.process) == ["p97", "p98", "p99"])
    }
}
