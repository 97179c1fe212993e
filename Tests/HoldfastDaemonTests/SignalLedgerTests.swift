import HoldfastProtocol
import Testing

@testable import HoldfastSupervisor

/// What a decision says, for the tests' one-line checks.
extension SignalLedger.Decision {
    /// A keyed signal to send: its outcome's waiters.
    var toSend: SignalLedger.PendingSignal? {
        if case .send(let pending?) = self { return pending }
        return nil
    }

    var isUnkeyedSend: Bool {
        if case .send(nil) = self { return true }
        return false
    }

    var joined: SignalLedger.PendingSignal? {
        if case .join(let pending) = self { return pending }
        return nil
    }

    var isRepeated: Bool {
        if case .repeated = self { return true }
        return false
    }
}

@Suite("Repeating a signal: keys under way and sent (SignalLedger)", .timeLimit(.minutes(1)))
struct SignalLedgerTests {
    func entry(_ id: String) -> ProcessTable.Entry {
        ProcessTable.Entry(id: id, pid: 4242, viaBridge: true, container: nil, idempotencyKey: nil, leadsProcessGroup: true, streams: [])
    }

    @Test func aSignalSentOnceIsNotSentAgainAndOneThatFailedIs() throws {
        var table = ProcessTable(instanceID: "i")
        table.started(entry("a"))
        let first = try #require(table.decideSignal(to: "a", key: "k1").toSend, "a keyed signal's first copy was not sent")
        table.signalSettled(to: "a", pid: 4242, key: first.key, sent: true)
        #expect(table.decideSignal(to: "a", key: "k1").isRepeated, "a repeat of a sent signal would be sent again")
        // Another process's signal with the same key is its own.
        table.started(entry("b"))
        let other = try #require(table.decideSignal(to: "b", key: "k1").toSend, "a key is taken as another process's")
        table.signalSettled(to: "b", pid: 4242, key: other.key, sent: false)
        #expect(table.decideSignal(to: "b", key: "k1").toSend != nil, "a signal that failed is not tried again")
        // Unkeyed signals are sent every time.
        #expect(table.decideSignal(to: "a", key: nil).isUnkeyedSend && table.decideSignal(to: "a", key: nil).isUnkeyedSend, "an unkeyed signal was not sent")
    }

    @Test func aRepeatWhileTheFirstIsBeingSentGetsItsOutcome() async throws {
        var table = ProcessTable(instanceID: "i")
        table.started(entry("a"))
        let first = try #require(table.decideSignal(to: "a", key: "k").toSend)
        let joined = try #require(table.decideSignal(to: "a", key: "k").joined, "a repeat of a signal being sent did not join it")
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
            let pending = try #require(table.decideSignal(to: "a", key: "k\(number)").toSend, "signal \(number) was not sent")
            table.signalSettled(to: "a", pid: 4242, key: pending.key, sent: true)
        }
        #expect(table["a"]?.signalKeys?.count == SignalLedger.keysPerProcess, "bounded")
        #expect(table["a"]?.signalKeys?.first == "k5", "the oldest dropped first")
        // A live upgrade's next binary knows them.
        var restored = try ProcessTable(restoring: table.snapshot())
        #expect(
            restored.decideSignal(to: "a", key: "k\(SignalLedger.keysPerProcess + 4)").isRepeated,
            "a signal sent before a live upgrade would be sent again after it")
        // A state written before signals had keys reads as none sent, none remembered.
        let old = Array(
            #"{"version":1,"instanceID":"i","processes":[{"id":"a","pid":1,"viaBridge":true,"leadsProcessGroup":true,"streams":[],"phase":"running"}],"rememberedCreates":[],"unacknowledgedExits":[]}"#
                .utf8)
        let snapshot = try ControlJSON.decode(ProcessTable.Snapshot.self, from: old, frameType: 0)
        #expect(snapshot.rememberedSignals == nil && snapshot.processes.first?.signalKeys == nil)
        var earlier = try ProcessTable(restoring: snapshot)
        #expect(earlier.decideSignal(to: "a", key: "k1").toSend != nil, "a state without keys made a signal a repeat")
    }

    /// A repeat that comes after the process was forgotten (a SIGKILL's exit acknowledged
    /// before its repeat arrived), or once a new process has its id: answered, not sent.
    @Test func aForgottenProcesssSignalsAreRememberedNotSentToItsSuccessor() throws {
        var table = ProcessTable(instanceID: "i")
        table.started(entry("a"))
        let kill = try #require(table.decideSignal(to: "a", key: "kill").toSend, "the SIGKILL was not sent")
        table.signalSettled(to: "a", pid: 4242, key: kill.key, sent: true)
        table.exited("a", ExitReport(id: "a", exitCode: 137, signal: 9, undelivered: 0))
        _ = table.finish("a", ExitReport(id: "a", exitCode: 137, signal: 9, undelivered: 0))
        table.acknowledgeExit("a")
        #expect(table["a"] == nil, "forgotten")
        #expect(table.decideSignal(to: "a", key: "kill").isRepeated, "a repeat after the process was forgotten would be sent")
        table.started(entry("a"))
        #expect(table.decideSignal(to: "a", key: "kill").isRepeated, "the old process's signal would reach the new process of its id")
        #expect(table.decideSignal(to: "a", key: "another").toSend != nil, "a new signal to the new process was not sent")
        // Across a live upgrade too.
        var restored = try ProcessTable(restoring: table.snapshot())
        #expect(restored.decideSignal(to: "a", key: "kill").isRepeated, "a live upgrade forgot a forgotten process's signals")
    }

    @Test func theForgottenProcessesKeysAreBounded() {
        var ledger = SignalLedger(capacity: 3)
        for number in 0..<5 { ledger.forgotten(process: "p\(number)", keys: ["k"]) }
        #expect(ledger.rememberedCount == 3)
        #expect(ledger.rememberedInOrder.map(\.process) == ["p2", "p3", "p4"], "the oldest dropped first")
        #expect(
            ledger.decide(process: "p0", key: "k", sent: nil).toSend != nil && ledger.decide(process: "p4", key: "k", sent: nil).isRepeated,
            "the bound kept the wrong keys")
        for number in 5..<100 { ledger.forgotten(process: "p\(number)", keys: ["k"]) }
        #expect(ledger.rememberedCount == 3 && ledger.rememberedInOrder.map(\.process) == ["p97", "p98", "p99"])
    }
}
