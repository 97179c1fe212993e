import HoldfastTestSupport
import Synchronization
import Testing

@testable import HoldfastCore

@Suite("ConnSlot: what the original design missed", .timeLimit(.minutes(5)))
struct ConnSlotBeyondTests {
    @Test func redialBoundHoldsWhenADialHangs() async throws {
        let script = DialScript(.hang)
        let policy = RedialPolicy(attempts: 3, interval: .milliseconds(1), connectTimeout: .milliseconds(30))
        let slot = Slot(policy: policy, dial: script.dial)
        slot.disconnect()
        // The dials hang forever: the cycle ends only because each is cut at the connect
        // timeout (on a loaded machine it may take longer than 3 × 30 ms; it must still end).
        try await eventually("the cycle to give up", timeout: .seconds(30)) { !slot.isRedialing }
        #expect(script.count == 3, "each hung dial counts as one attempt")
        #expect(slot.statistics.dialFailures == 3)
        #expect(slot.phase == .empty)
    }

    @Test func bridgeUpDialsEveryEmptySlotAtOnce() async throws {
        // A long tick: without bridge-up the slots would wait a minute for their next attempt.
        // The connect timeout is a hang bound (a dial that answers at once was cut at 200 ms on a
        // starved machine and counted twice).
        let policy = RedialPolicy(attempts: 10, interval: .seconds(60), connectTimeout: .seconds(30))
        let registry = SlotRegistry()
        let scripts = (0..<20).map { _ in DialScript(.fail) }
        let slots = scripts.map { Slot(policy: policy, dial: $0.dial) }
        for slot in slots {
            registry.register(slot)
            slot.disconnect()
        }
        try await eventually("every first attempt to fail") { scripts.allSatisfy { $0.count == 1 } }
        for script in scripts { script.set(.connect) }
        let started = ContinuousClock.now
        #expect(registry.redialAll() == 20)
        try await eventually("every slot to connect", timeout: .seconds(5)) {
            slots.allSatisfy { $0.phase == .connected }
        }
        #expect(ContinuousClock.now - started < .seconds(30))
        #expect(scripts.allSatisfy { $0.count == 2 })
    }

    @Test func bridgeUpStartsANewCycleAfterTheLastGaveUp() async throws {
        let script = DialScript(.fail)
        let slot = Slot(policy: fast, dial: script.dial)
        slot.disconnect()
        try await eventually("give up") { !slot.isRedialing }
        #expect(script.count == fast.attempts)
        script.set(.connect)
        slot.redialNow()
        try await eventually("connected") { slot.phase == .connected }
        #expect(script.count == fast.attempts + 1)
    }

    @Test func deadConnectionEndOfFileIsNotEndOfStream() async throws {
        let slot = Slot()
        let first = MemoryConnection(label: "first")
        slot.set(first)
        let reader = Task { await slot.readBytes() }
        first.feedEndOfFile()
        try await eventually("the dead connection to be dropped") { slot.phase == .empty }
        try await Task.sleep(for: .milliseconds(20))
        let second = MemoryConnection(label: "second")
        slot.set(second)
        second.feed(bytes("still here"))
        #expect(await reader.value == bytes("still here"), "no false end-of-file reached the reader")
    }

    @Test func deadConnectionErrorIsNotEndOfStream() async throws {
        let slot = Slot()
        let first = MemoryConnection(label: "first")
        slot.set(first)
        let reader = Task { await slot.readBytes() }
        first.feedError("connection reset by peer")
        try await eventually("the dead connection to be dropped") { slot.phase == .empty }
        let second = MemoryConnection(label: "second")
        slot.set(second)
        second.feed(bytes("x"))
        #expect(await reader.value == bytes("x"))
    }

    @Test func explicitEndOfStreamEndsTheRead() async throws {
        let slot = Slot()
        slot.set(MemoryConnection())
        let reader = Task { await slot.readBytes() }
        try await Task.sleep(for: .milliseconds(10))
        slot.close()
        #expect(await reader.value.isEmpty, "close is the explicit end of the stream")
    }

    @Test func closingAnEmptySlotNeverHangs() async throws {
        // An hour between attempts (`maxInterval` too, which caps the pause: 5 s by default):
        // longer than any wait below (each is at least 30 s, `hangBoundFloor`), so only `close`
        // can end the sleeping cycle. With 30 s capped to 5 s, the pause ended on its own within
        // the waits' bounds, and a close that woke nothing passed.
        let slot = Slot(
            policy: RedialPolicy(attempts: 1000, interval: .seconds(3600), maxInterval: .seconds(3600)), dial: DialScript(.fail).dial)
        slot.disconnect()  // a cycle sleeping for an hour
        let writer = Task { try? await slot.write(bytes("pending")) }
        let reader = Task { await slot.readBytes() }
        try await Task.sleep(for: .milliseconds(20))
        slot.close()
        try await withTimeout("parked callers to be released", .seconds(2)) {
            _ = await writer.value
            _ = await reader.value
        }
        try await eventually("the sleeping cycle to end", timeout: .seconds(2)) { !slot.isRedialing }
    }

    /// Regression: a pause between attempts whose timer fired before the cycle registered as
    /// sleeping was never woken, and the stream stayed empty for good (seen with short intervals
    /// on a loaded machine, in the 10,000-reconnect test). 20 cycles × 500 zero-length pauses
    /// give the race every chance; each cycle must still end after exactly its attempts.
    @Test func aPauseWhoseTimerFiresFirstStillEnds() async throws {
        let policy = RedialPolicy(attempts: 500, interval: .zero, connectTimeout: .seconds(5))
        for round in 1...20 {
            let script = DialScript(.fail)
            let slot = Slot(policy: policy, dial: script.dial)
            slot.disconnect()
            // A lost wake-up hangs forever; 500 pauses on a starved machine can take seconds.
            try await eventually("cycle \(round) to end", timeout: .seconds(60)) { !slot.isRedialing }
            #expect(script.count == policy.attempts)
        }
    }

    @Test func parkedCallersAreTasksNotThreads() async throws {
        // Far more parked writers than the cooperative pool has threads: if a parked write held
        // a thread, this would deadlock instead of finishing when the connection arrives.
        let slot = Slot()
        try await withThrowingTaskGroup(of: Void.self) { group in
            for index in 0..<1000 {
                group.addTask { try await slot.write([UInt8(truncatingIfNeeded: index)]) }
            }
            try await Task.sleep(for: .milliseconds(50))
            let connection = MemoryConnection()
            slot.set(connection)
            try await group.waitForAll()
            #expect(connection.written.count == 1000)
        }
    }

    @Test func cancellingAParkedCallerReleasesIt() async throws {
        let slot = Slot()
        let reader = Task { await slot.current() }
        try await Task.sleep(for: .milliseconds(10))
        reader.cancel()
        let lease = try await withTimeout("cancelled reader") { await reader.value }
        #expect(lease == nil)
        #expect(slot.phase == .empty)
    }

    @Test func staleFailureReportDoesNotDropANewerConnection() async throws {
        let slot = Slot()
        slot.set(MemoryConnection(label: "old"))
        let old = try #require(await slot.current())
        let newer = MemoryConnection(label: "new")
        slot.set(newer)
        slot.disconnect(ifCurrent: old.generation, reason: .writeFailed)
        #expect(slot.phase == .connected)
        #expect(!newer.isClosed)
    }

    @Test func relayOfAnExitedProcessFinishesAfterTheDrainTimeoutAndCountsWhatItLost() async throws {
        let slot = Slot()
        let chunk = [UInt8](repeating: 7, count: 1000)
        let source = MemorySource()
        source.append(chunk)
        let pool = BufferPool(bufferSize: 1000)
        let relay = Task { await Relay.output(from: source, to: slot, pool: pool) }
        // The relay parks before it reads: bytes leave the source only when a connection can
        // take them.
        try await eventually("the relay to park") { slot.parkedCount == 1 }
        source.append(chunk + chunk)  // written by the process before it exited
        source.finish()
        try await Task.sleep(for: .milliseconds(20))
        #expect(source.reads == 0, "a parked relay does not read its source")
        slot.setDrainTimeout(.milliseconds(50))
        let report = try await withTimeout("the relay to finish") { await relay.value }
        #expect(report.ending == .abandoned)
        #expect(report.bytes == 0)
        #expect(report.undelivered == 3000)
        #expect(slot.phase == .abandoned)
    }

    @Test func drainTimeoutDoesNotFireWhileConnected() async throws {
        let slot = Slot()
        let connection = MemoryConnection()
        slot.set(connection)
        slot.setDrainTimeout(.milliseconds(10))
        try await Task.sleep(for: .milliseconds(50))
        #expect(slot.phase == .connected)
        // Losing the connection after the exit starts the clock.
        slot.disconnect()
        try await eventually("abandon after the drain timeout") { slot.phase == .abandoned }
    }

    @Test func reconnectWithinTheDrainTimeoutDeliversEverything() async throws {
        let slot = Slot()
        let source = MemorySource(bytes("the last words"), finished: true)
        slot.setDrainTimeout(.milliseconds(500))
        let relay = Task { await Relay.output(from: source, to: slot) }
        try await Task.sleep(for: .milliseconds(20))
        let connection = MemoryConnection()
        slot.set(connection)
        let report = await relay.value
        #expect(report == RelayReport(ending: .endOfStream, bytes: 14, undelivered: 0))
        #expect(connection.written == bytes("the last words"))
        #expect(connection.isClosed, "end of the source closes the raw stream so the host sees end-of-file")
    }
}
