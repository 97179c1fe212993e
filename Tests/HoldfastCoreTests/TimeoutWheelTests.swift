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

    /// The point of the wheel: ten thousand waits that end before their timeouts leave no
    /// entry, no timer and no task behind, and none of them fires. A wait whose cancel came only
    /// after its deadline (a starved machine between the two loops: it happened in CI with a
    /// 50 ms timeout) may have fired; the count of those bounds what may fire.
    @Test func cancelledTimeoutsNeverFireAndLeaveNothingPending() async throws {
        let wheel = TimeoutWheel(tick: .milliseconds(10))
        let timeout = Duration.milliseconds(500)
        let fired = NIOLockedValueBox(0)
        var tokens: [(token: TimeoutWheel.Token, at: ContinuousClock.Instant)] = []
        for _ in 0..<10_000 {
            let at = ContinuousClock.now
            tokens.append((wheel.schedule(after: timeout) { fired.withLockedValue { $0 += 1 } }, at))
        }
        #expect(wheel.pending <= 10_000)
        var cancelledLate = 0
        for (token, at) in tokens {
            wheel.cancel(token)
            if ContinuousClock.now - at >= timeout { cancelledLate += 1 }
        }
        #expect(wheel.pending == 0)
        try await Task.sleep(for: timeout * 2)  // well past every deadline
        #expect(fired.withLockedValue { $0 } <= cancelledLate, "\(cancelledLate) cancelled after their deadline")
        // Cancelling again, or after firing, is harmless.
        wheel.cancel(tokens[0].token)
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

    /// A late tick (the process stopped, the guest paused) moves a timeout on by the part of
    /// the stall it was pending for: one scheduled before it by all of it, one scheduled since (a
    /// connect timeout set after the resume, before this tick) only by what passed since it was
    /// set. Every deadline moved by the whole stall, a fresh 300 ms timeout after a 3 s stall
    /// waited 3.3 s.
    @Test func aLateTickMovesEachTimeoutByTheStallItWasPendingFor() {
        let start = ContinuousClock.now
        var state = TimeoutWheel.State()
        state.entries[1] = .init(deadline: start + .seconds(1), scheduled: start, fire: {})
        let fresh = start + .milliseconds(2950)
        state.entries[2] = .init(deadline: fresh + .milliseconds(300), scheduled: fresh, fire: {})
        let now = start + .seconds(3)
        state.postpone(by: .milliseconds(2900), now: now)
        #expect(state.entries[1]!.deadline == start + .milliseconds(3900), "pending for the whole stall")
        #expect(state.entries[2]!.deadline == fresh + .milliseconds(350), "pending for 50 ms of it")
    }
}
