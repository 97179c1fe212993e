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
        try await adopts.await {}
        await #expect(throws: HoldfastError(.noStdin, "x")) { try await adopts.await { () async throws(HoldfastError) in throw HoldfastError(.noStdin, "x") } }
        // One that never answers (a broker held in a debugger), ended by the stop.
        let started = NIOLockedValueBox(false)
        let waiting = Task { () async -> HoldfastError? in
            do throws(HoldfastError) {
                try await adopts.await {
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
        await #expect(throws: AdoptsUnderWay.endedByTheStop) { try await adopts.await { ran.withLockedValue { $0 = true } } }
        #expect(!ran.withLockedValue { $0 })
    }
}
