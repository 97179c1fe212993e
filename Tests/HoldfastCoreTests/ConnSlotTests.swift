import HoldfastTestSupport
import NIOConcurrencyHelpers
import Synchronization
import Testing

@testable import HoldfastCore

typealias Slot = ConnSlot<MemoryConnection>

/// Counts and hands out dials for a slot under test.
final class DialScript: Sendable {
    enum Outcome: Sendable {
        case connect
        case fail
        /// Never returns and ignores cancellation: only the slot's own connect timeout ends it.
        case hang
    }

    private let state = NIOLockedValueBox<(count: Int, outcome: Outcome, made: [MemoryConnection])>((0, .connect, []))

    init(_ outcome: Outcome = .connect) {
        state.withLockedValue { $0.outcome = outcome }
    }

    var count: Int { state.withLockedValue { $0.count } }
    var connections: [MemoryConnection] { state.withLockedValue { $0.made } }
    func set(_ outcome: Outcome) { state.withLockedValue { $0.outcome = outcome } }

    var dial: Slot.Dial {
        { [self] in
            let outcome = state.withLockedValue { s -> Outcome in
                s.count += 1
                return s.outcome
            }
            switch outcome {
            case .connect:
                let connection = MemoryConnection(label: "dialed")
                state.withLockedValue { $0.made.append(connection) }
                return connection
            case .fail:
                throw MemoryConnection.Failure(reason: "connection refused")
            case .hang:
                await withUnsafeContinuation { (_: UnsafeContinuation<Void, Never>) in }
                fatalError("unreachable")
            }
        }
    }
}


extension Slot {
    func write(_ data: [UInt8]) async throws(Closed) {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, data.count), alignment: 1)
        defer { buffer.deallocate() }
        buffer.copyBytes(from: data)
        try await write(UnsafeRawBufferPointer(rebasing: buffer[..<data.count]))
    }

    func readBytes(max: Int = 4096) async -> [UInt8] {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max, alignment: 1)
        defer { buffer.deallocate() }
        let count = await read(into: buffer)
        return Array(buffer[..<count])
    }
}

/// A flag a background task sets when it finishes, to show that it was parked until then.
final class Finished: Sendable {
    private let flag = Atomic<Bool>(false)
    var value: Bool { flag.load(ordering: .acquiring) }
    func set() { flag.store(true, ordering: .releasing) }
}

/// Quick attempts; the connect timeout is only a hang bound (these dials answer at once or fail
/// at once: under a load of 13 a dial that answered at once still missed a 200 ms timeout and
/// was counted twice).
let fast = RedialPolicy(attempts: 5, interval: .milliseconds(1), connectTimeout: .seconds(30))

@Suite("ConnSlot: the original design's cases", .timeLimit(.minutes(5)))
struct ConnSlotOriginalTests {
    @Test func passThroughWhileConnected() async throws {
        let slot = Slot()
        let connection = MemoryConnection()
        slot.set(connection)
        try await slot.write(bytes("hello"))
        #expect(connection.written == bytes("hello"))
        connection.feed(bytes("abc"))
        #expect(await slot.readBytes() == bytes("abc"))
        #expect(slot.phase == .connected)
    }

    @Test func writeParksWhileEmptyAndResumesAfterSet() async throws {
        let slot = Slot()
        let done = Finished()
        let writer = Task {
            try await slot.write(bytes("parked"))
            done.set()
        }
        try await Task.sleep(for: .milliseconds(50))
        #expect(!done.value, "the write must park while the slot is empty")
        let connection = MemoryConnection()
        slot.set(connection)
        try await writer.value
        #expect(done.value)
        #expect(connection.written == bytes("parked"))
    }

    @Test func writeErrorDropsConnectionAndRemainderGoesToNext() async throws {
        let slot = Slot()
        let first = MemoryConnection(label: "first", writes: .failAfter(3))
        slot.set(first)
        let writer = Task { try await slot.write(bytes("abcdefgh")) }
        try await eventually("the failing connection to be dropped") { slot.phase == .empty }
        #expect(first.isClosed)
        #expect(first.written == bytes("abc"))
        let second = MemoryConnection(label: "second")
        slot.set(second)
        try await writer.value
        #expect(second.written == bytes("defgh"))
        #expect(slot.statistics.bytesUnconfirmed == 3)
    }

    @Test func readParksAndResumes() async throws {
        let slot = Slot()
        let reader = Task { await slot.readBytes() }
        try await Task.sleep(for: .milliseconds(20))
        let connection = MemoryConnection()
        slot.set(connection)
        connection.feed(bytes("late"))
        #expect(await reader.value == bytes("late"))
    }

    @Test func closeWakesParkedWriteWithEndOfStream() async throws {
        let slot = Slot()
        let writer = Task { () -> Slot.Closed? in
            do throws(Slot.Closed) {
                try await slot.write(bytes("never"))
                return nil
            } catch {
                return error
            }
        }
        try await Task.sleep(for: .milliseconds(20))
        slot.close()
        let closed = try #require(await writer.value)
        #expect(closed.unsent == 5)
        #expect(!closed.abandoned)
    }

    @Test func setClosesThePreviousConnection() {
        let slot = Slot()
        let first = MemoryConnection()
        let second = MemoryConnection()
        slot.set(first)
        slot.set(second)
        #expect(first.isClosed)
        #expect(!second.isClosed)
    }

    @Test func setAfterCloseClosesTheNewConnection() {
        let slot = Slot()
        slot.close()
        let late = MemoryConnection()
        slot.set(late)
        #expect(late.isClosed)
        #expect(slot.phase == .closed)
    }

    @Test func disconnectIsIdempotent() {
        let slot = Slot()
        let connection = MemoryConnection()
        slot.set(connection)
        slot.disconnect()
        slot.disconnect()
        #expect(connection.closeCount == 1)
        #expect(slot.statistics.disconnects == 1)
        #expect(slot.phase == .empty)
    }

    @Test func closeIsIdempotent() {
        let slot = Slot()
        let connection = MemoryConnection()
        slot.set(connection)
        slot.close()
        slot.close()
        #expect(connection.closeCount == 1)
        #expect(slot.phase == .closed)
    }

    @Test func disconnectAfterCloseIsANoOp() async throws {
        let script = DialScript()
        let slot = Slot(policy: fast, dial: script.dial)
        slot.close()
        slot.disconnect()
        try await Task.sleep(for: .milliseconds(20))
        #expect(slot.phase == .closed)
        #expect(script.count == 0)
        #expect(!slot.isRedialing)
    }

    @Test func noRedialerMeansNothingRuns() async throws {
        let events = EventLog()
        let slot = Slot(observer: events.record)
        slot.set(MemoryConnection())
        slot.disconnect()
        #expect(!slot.isRedialing)
        try await Task.sleep(for: .milliseconds(20))
        #expect(slot.phase == .empty)
        #expect(slot.statistics.dialAttempts == 0)
        #expect(!events.all.contains { if case .dialing = $0 { true } else { false } })
    }

    @Test func redialSucceedsAtTheFirstAttempt() async throws {
        let script = DialScript(.connect)
        let slot = Slot(policy: fast, dial: script.dial)
        slot.set(MemoryConnection())
        slot.disconnect()
        try await eventually("redial") { slot.phase == .connected }
        try await eventually("cycle end") { !slot.isRedialing }
        #expect(script.count == 1)
    }

    @Test func alwaysFailingRedialerMakesExactlyTheConfiguredAttempts() async throws {
        let script = DialScript(.fail)
        let slot = Slot(policy: fast, dial: script.dial)
        slot.set(MemoryConnection())
        slot.disconnect()
        try await eventually("cycle end") { !slot.isRedialing }
        #expect(script.count == fast.attempts)
        #expect(slot.phase == .empty, "the slot stays empty but open")
        // A later disconnect starts a new cycle with a full budget.
        slot.disconnect()
        #expect(slot.isRedialing)
        try await eventually("second cycle end") { !slot.isRedialing }
        #expect(script.count == 2 * fast.attempts)
        // And a success ends the next one early.
        script.set(.connect)
        slot.disconnect()
        try await eventually("connected") { slot.phase == .connected }
        #expect(script.count == 2 * fast.attempts + 1)
    }

    @Test func concurrentDisconnectsWithWriters() async throws {
        try await disconnectStorm(writers: 4, disconnects: 50)
    }

    @Test func concurrentDisconnectsWithWriters1000Cycles() async throws {
        try await disconnectStorm(writers: 4, disconnects: 1000)
    }

    /// Writers send numbered records while another task disconnects over and over; the redialer
    /// brings a new connection each time. Memory connections accept whole writes, so every record
    /// must land exactly once, in each writer's order, across all connections.
    func disconnectStorm(writers: Int, disconnects: Int) async throws {
        let script = DialScript(.connect)
        let slot = Slot(policy: RedialPolicy(attempts: 1000, interval: .microseconds(10)), dial: script.dial)
        let initial = MemoryConnection(label: "initial")
        slot.set(initial)
        let recordsPerWriter = max(200, disconnects)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for writer in 0..<writers {
                group.addTask {
                    for index in 0..<recordsPerWriter {
                        let record = (UInt32(writer) << 24) | UInt32(index)
                        try await slot.write(withUnsafeBytes(of: record.bigEndian) { Array($0) })
                    }
                }
            }
            group.addTask {
                for _ in 0..<disconnects {
                    slot.disconnect()
                    await Task.yield()
                }
            }
            try await group.waitForAll()
        }
        slot.close()
        // Connections are installed in dial order, after the initial one.
        var all = initial.written
        for connection in script.connections { all += connection.written }
        #expect(all.count == writers * recordsPerWriter * 4)
        var next = [Int](repeating: 0, count: writers)
        for offset in stride(from: 0, to: all.count, by: 4) {
            let record = all[offset..<offset + 4].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
            let writer = Int(record >> 24)
            let index = Int(record & 0xFF_FFFF)
            #expect(index == next[writer], "writer \(writer): record \(index) out of order or duplicated")
            next[writer] = index + 1
        }
        #expect(next == [Int](repeating: recordsPerWriter, count: writers))
        #expect(script.count >= 1)
    }
}

/// Records slot events for assertions.
final class EventLog: Sendable {
    private let events = NIOLockedValueBox<[SlotEvent]>([])
    var all: [SlotEvent] { events.withLockedValue { $0 } }
    var record: @Sendable (SlotEvent) -> Void { { [self] event in events.withLockedValue { $0.append(event) } } }
}
