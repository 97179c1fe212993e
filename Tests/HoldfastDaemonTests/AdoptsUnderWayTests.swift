import HoldfastProtocol
import HoldfastTestSupport
import NIOConcurrencyHelpers
import Testing

@testable import HoldfastSupervisor

/// The stop's end of the creates' adopts (`AdoptsUnderWay`): a wait the stop ends fails as
/// `shutting-down` at once, whatever the adopt does; one that ends first keeps its own result;
/// a wait that starts after the stop's end fails at once.
@Suite("A stop ends the waits for adopts", .timeLimit(.minutes(1)))
struct AdoptsUnderWayTests {
    @Test func theStopEndsAWaitTheAdoptKeepsAndLaterWaitsFailAtOnce() async throws {
        let adopts = AdoptsUnderWay()
        // One that answers: its own result, an error included.
        #expect(try await adopts.await(within: .seconds(60)) {} .isAdopted)
        await #expect(throws: HoldfastError(.noStdin, "x")) { _ = try await adopts.await(within: .seconds(60)) { () async throws(HoldfastError) in throw HoldfastError(.noStdin, "x") } }
        // One that never answers (a broker held in a debugger), ended by the stop.
        let started = NIOLockedValueBox(false)
        let waiting = Task { () async -> HoldfastError? in
            do throws(HoldfastError) {
                _ = try await adopts.await(within: .seconds(60)) {
                    started.withLockedValue { $0 = true }
                    try? await Task.sleep(for: .seconds(60))
                }
                return nil
            } catch {
                return error
            }
        }
        try await eventually("the adopt under way") { started.withLockedValue { $0 } }
        #expect(adopts.endAll() == 1)
        let ended = try await withTimeout("the wait's end") { await waiting.value }
        #expect(ended == AdoptsUnderWay.endedByTheStop)
        // After the stop's end, a new wait does not start.
        let ran = NIOLockedValueBox(false)
        await #expect(throws: AdoptsUnderWay.endedByTheStop) { _ = try await adopts.await(within: .seconds(60)) { ran.withLockedValue { $0 = true } } }
        #expect(!ran.withLockedValue { $0 })
    }

    /// A wait past its bound is answered `late` with the adopt still under way, and its result
    /// comes through the task it is handed; while one is late the next wait does not wait at
    /// all, and once none is, waits are bounded again. A stop leaves late adopts to finish.
    @Test func aWaitPastItsBoundIsAnsweredLateAndTheNextOneAtOnce() async throws {
        let adopts = AdoptsUnderWay()
        let released = NIOLockedValueBox(false)
        let first = try await adopts.await(within: .milliseconds(200)) { () async throws(HoldfastError) in
            while !released.withLockedValue({ $0 }) { try? await Task.sleep(for: .milliseconds(10)) }
            throw HoldfastError(.processExists, "refused")
        }
        guard case .late(let adopting) = first else { Issue.record("answered before the adopt: \(first)"); return }
        #expect(adopts.lateCount == 1)
        // Behind a late one: at once, though its own bound is a minute.
        let clock = ContinuousClock()
        let start = clock.now
        let second = try await adopts.await(within: .seconds(60)) { try? await Task.sleep(for: .milliseconds(500)) }
        #expect(clock.now - start < .seconds(30), "not made to wait its bound")
        guard case .late(let secondAdopting) = second else { Issue.record("the second waited for its adopt"); return }
        #expect(adopts.endAll() == 0, "late adopts are not the stop's to end")
        #expect(adopts.lateCount == 2)
        released.withLockedValue { $0 = true }
        let firstResult = await adopting.value
        #expect(throws: HoldfastError(.processExists, "refused")) { try firstResult.get() }
        let secondResult = await secondAdopting.value
        #expect(throws: Never.self) { try secondResult.get() }
        try await eventually("no adopt late") { adopts.lateCount == 0 }
    }

    @Test func onceNoAdoptIsLateWaitsAreBoundedAgain() async throws {
        let adopts = AdoptsUnderWay()
        let late = try await adopts.await(within: .milliseconds(100)) { try? await Task.sleep(for: .milliseconds(400)) }
        guard case .late(let adopting) = late else { Issue.record("answered before the adopt"); return }
        _ = await adopting.value
        try await eventually("no adopt late") { adopts.lateCount == 0 }
        #expect(try await adopts.await(within: .seconds(60)) { try? await Task.sleep(for: .milliseconds(300)) }.isAdopted, "waited for its adopt")
    }
}

extension AdoptsUnderWay.Outcome {
    var isAdopted: Bool {
        if case .adopted = self { return true }
        return false
    }
}
