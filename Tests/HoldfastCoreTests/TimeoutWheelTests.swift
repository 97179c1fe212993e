import HoldfastTestSupport
import NIOConcurrencyHelpers
import Testing

@testable import HoldfastCore

@Suite("TimeoutWheel: timeouts that leave nothing behind when cancelled", .timeLimit(.minutes(5)))
struct TimeoutWheelTests {
    @Test func aTimeoutFiresOnceAndNotBeforeItsDeadline() async throws {
        let wheel = TimeoutWheel(tick: .milliseconds(10))
        let fired = NIOLockedValueBox<[ContinuousClock.Instant]>([])
        let scheduled = ContinuousClock.now
        wheel.schedule(after: .milliseconds(100)) { fired.withLockedValue { $0.append(.now) } }
        try await eventually("the timeout to fire") { !fired.withLockedValue { $0 }.isEmpty }
        let at = try #require(fired.withLockedValue { $0 }.first)
        #expect(at - scheduled >= .milliseconds(100))
        try await Task.sleep(for: .milliseconds(100))
        #expect(fired.withLockedValue { $0 }.count == 1)
        #expect(wheel.pending == 0)
    }

    /// The point of the wheel: ten thousand waits that end before their (long) timeouts leave
    /// no entry, no timer and no task behind, and none of them fires.
    @Test func cancelledTimeoutsNeverFireAndLeaveNothingPending() async throws {
        let wheel = TimeoutWheel(tick: .milliseconds(10))
        let fired = NIOLockedValueBox(0)
        var tokens: [TimeoutWheel.Token] = []
        for _ in 0..<10_000 { tokens.append(wheel.schedule(after: .milliseconds(50)) { fired.withLockedValue { $0 += 1 } }) }
        #expect(wheel.pending == 10_000)
        for token in tokens { wheel.cancel(token) }
        #expect(wheel.pending == 0)
        try await Task.sleep(for: .milliseconds(200))  // well past the deadline
        #expect(fired.withLockedValue { $0 } == 0)
        // Cancelling again, or after firing, is harmless.
        wheel.cancel(tokens[0])
        let late = NIOLockedValueBox(false)
        let token = wheel.schedule(after: .milliseconds(20)) { late.withLockedValue { $0 = true } }
        try await eventually("the last timeout") { late.withLockedValue { $0 } }
        wheel.cancel(token)
        #expect(wheel.pending == 0)
    }

    @Test func aTaskValueWithinATimeout() async throws {
        let wheel = TimeoutWheel(tick: .milliseconds(10))
        let quick = Task { 7 }
        #expect(await quick.value(within: .seconds(30), wheel: wheel) == 7)
        #expect(wheel.pending == 0, "the timeout of a wait that ended went with it")

        let gate = NIOLockedValueBox(false)
        let slow = Task { () -> Int in
            while !gate.withLockedValue({ $0 }) { try? await Task.sleep(for: .milliseconds(5)) }
            return 9
        }
        #expect(await slow.value(within: .milliseconds(50), wheel: wheel) == nil)
        gate.withLockedValue { $0 = true }
        #expect(await slow.value == 9, "the task went on")
    }
}
