import HoldfastTestSupport
import Testing

@testable import HoldfastCore

@Suite("SlotRegistry", .timeLimit(.minutes(5)))
struct SlotRegistryTests {
    @Test func tracksRegisteredSlots() {
        let registry = SlotRegistry()
        let slots = (0..<5).map { _ in Slot() }
        for slot in slots { registry.register(slot) }
        registry.register(slots[0])  // twice is harmless
        #expect(registry.count == 5)
        registry.unregister(slots[1])
        #expect(registry.count == 4)
    }

    @Test func ignoresNilClosedAndForeignInput() {
        let registry = SlotRegistry()
        registry.register(nil)
        let closed = Slot()
        closed.close()
        registry.register(closed)
        #expect(registry.count == 0)
        let member = Slot()
        registry.register(member)
        registry.unregister(Slot())  // never registered
        registry.unregister(nil)
        #expect(registry.count == 1)
    }

    @Test func dropsClosedSlotsAsItGoes() {
        let registry = SlotRegistry()
        // Streams come and go; the table must stay bounded by the live count, not the total.
        var live: [Slot] = []
        for round in 0..<50 {
            for _ in 0..<100 {
                let slot = Slot()
                registry.register(slot)
                live.append(slot)
            }
            for slot in live.dropLast(10) { slot.close() }
            live = Array(live.suffix(10))
            #expect(registry.storedCount <= max(64, 2 * 110) + 1, "round \(round): \(registry.storedCount) stored")
        }
        #expect(registry.count == 10)
        #expect(registry.storedCount == 10)
    }

    @Test func disconnectAllClosesEveryUnderlyingConnection() {
        let registry = SlotRegistry()
        var connections: [MemoryConnection] = []
        var slots: [Slot] = []
        for _ in 0..<10 {
            let slot = Slot()
            let connection = MemoryConnection()
            slot.set(connection)
            registry.register(slot)
            connections.append(connection)
            slots.append(slot)
        }
        slots[3].close()
        #expect(registry.disconnectAll() == 9)
        #expect(connections.allSatisfy { $0.isClosed })
        #expect(slots.enumerated().allSatisfy { $0.offset == 3 ? $0.element.phase == .closed : $0.element.phase == .empty })
        #expect(registry.storedCount == 9)
    }
}

@Suite("RedialPolicy", .timeLimit(.minutes(5)))
struct RedialPolicyTests {
    @Test func defaultIsSixtyAttemptsOfAHundredMilliseconds() {
        let policy = RedialPolicy.default
        #expect(policy.attempts == 60)
        #expect(policy.delay(afterAttempt: 1) == .milliseconds(100))
        #expect(policy.delay(afterAttempt: 59) == .milliseconds(100))
    }

    @Test func exponentialBackOffIsCapped() {
        let policy = RedialPolicy(interval: .milliseconds(100), multiplier: 2, maxInterval: .seconds(1))
        #expect(policy.delay(afterAttempt: 1) == .milliseconds(100))
        #expect(policy.delay(afterAttempt: 2) == .milliseconds(200))
        #expect(policy.delay(afterAttempt: 4) == .milliseconds(800))
        #expect(policy.delay(afterAttempt: 5) == .seconds(1))
        #expect(policy.delay(afterAttempt: 500) == .seconds(1))
    }
}

@Suite("Relay over memory streams", .timeLimit(.minutes(5)))
struct RelayMemoryTests {
    @Test func inputRelayDeliversAndEndsOnlyAtExplicitEnd() async throws {
        let slot = Slot()
        let first = MemoryConnection()
        slot.set(first)
        let sink = MemoryConnection(label: "stdin pipe")
        let relay = Task { await Relay.input(from: slot, to: sink) }
        first.feed(bytes("line 1\n"))
        try await eventually("line 1") { sink.written == bytes("line 1\n") }
        first.feedEndOfFile()  // the host went away: not the end of stdin
        try await eventually("drop") { slot.phase == .empty }
        let second = MemoryConnection()
        slot.set(second)
        second.feed(bytes("line 2\n"))
        try await eventually("line 2") { sink.written == bytes("line 1\nline 2\n") }
        slot.close()  // the host closed stdin explicitly
        let report = await relay.value
        #expect(report == RelayReport(ending: .endOfStream, bytes: 14, undelivered: 0))
    }

    @Test func inputRelayStopsWhenTheProcessStopsReading() async throws {
        let slot = Slot()
        let connection = MemoryConnection()
        slot.set(connection)
        let sink = MemoryConnection(label: "stdin pipe", writes: .failAfter(2))
        let relay = Task { await Relay.input(from: slot, to: sink) }
        connection.feed(bytes("abcdef"))
        let report = await relay.value
        #expect(report.ending == .processGone)
        #expect(report.bytes == 2)
        #expect(report.undelivered == 4)
    }

    @Test func ttyRelayEndsWhenTheOutputEnds() async throws {
        let master = MemoryConnection(label: "pty master")
        let output = Slot()
        let outConnection = MemoryConnection()
        output.set(outConnection)
        let input = Slot()
        let inConnection = MemoryConnection()
        input.set(inConnection)
        let relay = Task { await TtyRelay.run(master: master, output: output, input: input) }
        master.feed(bytes("$ "))
        inConnection.feed(bytes("ls\r"))
        try await eventually("prompt and keystrokes") {
            outConnection.written == bytes("$ ") && master.written == bytes("ls\r")
        }
        master.feedEndOfFile()
        let report = try await withTimeout("tty relay end") { await relay.value }
        #expect(report.output.ending == .endOfStream)
        #expect(report.input.ending == .cancelled)
    }
}
