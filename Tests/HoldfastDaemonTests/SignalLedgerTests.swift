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
        table.signalSettled(to: "a", key: first.key, sent: true)
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
        table.signalSettled(to: "b", key: other.key, sent: false)
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
        table.signalSettled(to: "a", key: "k", sent: false)
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
            table.signalSettled(to: "a", key: pending.key, sent: true)
        }
        #expect(table["a"]?.signalKeys?.count == SignalLedger.keysPerProcess, "bounded")
        #expect(table["a"]?.signalKeys?.first == "k5", "the oldest dropped first")
        // A live upgrade's next binary knows them.
        var restored = try ProcessTable(restoring: table.snapshot())
        guard case .repeated = restored.decideSignal(to: "a", key: "k\(SignalLedger.keysPerProcess + 4)") else {
            Issue.record("a signal sent before a live upgrade would be sent again after it")
            return
        }
        // A state written before signals had keys reads as none sent.
        let old = Array(#"{"id":"a","pid":1,"viaBridge":true,"leadsProcessGroup":true,"streams":[],"phase":"running"}"#.utf8)
        let decoded = try ControlJSON.decode(ProcessTable.Entry.self, from: old, frameType: 0)
        #expect(decoded.signalKeys == nil)
    }
}
