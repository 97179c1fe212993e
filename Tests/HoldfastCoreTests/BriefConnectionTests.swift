import HoldfastTestSupport
import NIOConcurrencyHelpers
import Testing

@testable import HoldfastCore

/// A peer that accepts every dial and drops it at once — a host that no longer has the stream
/// and accepts it anyway, a proxy whose backend is gone — must not be dialled again the moment
/// it drops: such a dial "succeeds", so it never counted against a redial cycle, and a stream
/// redialled it without a pause for as long as it lived (1,600 times a second in the host's
/// own case, `StreamServerTests`; 3,127 in 2 s with a daemon, `HostGaveUpTests`).
@Suite("ConnSlot: a row of connections that carry nothing is paced", .timeLimit(.minutes(5)))
struct BriefConnectionTests {
    @Test func thePauseGrowsFromTheSecondBriefConnectionOnAndIsCapped() {
        let policy = RedialPolicy(interval: .milliseconds(100), maxInterval: .seconds(5))
        #expect(policy.pause(afterBriefConnections: 0) == nil)
        #expect(policy.pause(afterBriefConnections: 1) == nil, "one is a migration's cut as often as not")
        #expect(policy.pause(afterBriefConnections: 2) == .milliseconds(100))
        #expect(policy.pause(afterBriefConnections: 3) == .milliseconds(200))
        #expect(policy.pause(afterBriefConnections: 7) == .milliseconds(3200))
        #expect(policy.pause(afterBriefConnections: 8) == .seconds(5))
        #expect(policy.pause(afterBriefConnections: 1000) == .seconds(5))
    }

    /// A slot whose every connection the peer drops as soon as it is installed; `traffic`:
    /// the connection carried a frame first (the owner says so).
    func droppingPeer(policy: RedialPolicy, traffic: Bool) -> (Slot, DialScript) {
        let script = DialScript(.connect)
        let box = NIOLockedValueBox<Slot?>(nil)
        let slot = Slot(
            policy: policy, dial: script.dial,
            observer: { event in
                guard case .connected(let generation) = event else { return }
                Task {
                    guard let slot = box.withLockedValue({ $0 }) else { return }
                    if traffic { slot.noteTraffic(generation: generation) }
                    slot.disconnect(ifCurrent: generation, reason: .endOfFile)
                }
            })
        box.withLockedValue { $0 = slot }
        return (slot, script)
    }

    @Test func aPeerThatDropsEveryConnectionAtOnceIsDialledAtAGrowingPace() async throws {
        let policy = RedialPolicy(interval: .milliseconds(50), maxInterval: .milliseconds(400))
        let (slot, script) = droppingPeer(policy: policy, traffic: false)
        defer { slot.close() }
        slot.disconnect()
        try await Task.sleep(for: .seconds(2))
        // Pauses of 0, 0, 50, 100, 200, 400, 400, ... ms: 9 dials in 2 s when nothing is late.
        print("a peer that drops at once: \(script.count) dials in 2 s")
        #expect(script.count >= 4, "it is still dialled")
        // (Without the pacing: thousands. A starved machine that delays a drop past 250 ms ends
        // the row and adds a few.)
        #expect(script.count <= 25, "\(script.count) dials in 2 s")
    }

    @Test func connectionsThatCarriedAFrameAreRedialledAtOnce() async throws {
        // The same peer, but each connection carried a frame before it dropped: a live stream
        // whose connections keep being cut (a fault test, a flapping network) waits for nothing.
        let policy = RedialPolicy(interval: .milliseconds(50), maxInterval: .milliseconds(400))
        let (slot, script) = droppingPeer(policy: policy, traffic: true)
        defer { slot.close() }
        slot.disconnect()
        // Paced, 30 connections would take over 10 s (50 + 100 + 200 + 27 × 400 ms).
        try await eventually("30 connections", timeout: .seconds(5)) { script.count >= 30 }
    }

    @Test func aConnectionThatLastsOrCarriesAFrameEndsTheRow() async throws {
        let policy = RedialPolicy(interval: .milliseconds(20), maxInterval: .seconds(30))
        let script = DialScript(.connect)
        let dropAtOnce = NIOLockedValueBox(true)
        let box = NIOLockedValueBox<Slot?>(nil)
        let slot = Slot(
            policy: policy, dial: script.dial,
            observer: { event in
                guard case .connected(let generation) = event, dropAtOnce.withLockedValue({ $0 }) else { return }
                Task { box.withLockedValue { $0 }?.disconnect(ifCurrent: generation, reason: .endOfFile) }
            })
        box.withLockedValue { $0 = slot }
        defer { slot.close() }
        slot.disconnect()
        try await eventually("a row of 4 brief connections") { slot.briefStreak >= 4 }
        dropAtOnce.withLockedValue { $0 = false }
        // One that lasts past a quarter second ends the row.
        try await eventually("connected") { slot.phase == .connected }
        try await Task.sleep(for: .milliseconds(400))
        slot.disconnect()
        #expect(slot.briefStreak == 0)
        try await eventually("connected") { slot.phase == .connected }
        dropAtOnce.withLockedValue { $0 = true }
        slot.disconnect()
        try await eventually("a row of 3 brief connections") { slot.briefStreak >= 3 }
        // So does a brief one that carried a frame.
        dropAtOnce.withLockedValue { $0 = false }
        try await eventually("connected") { slot.phase == .connected }
        let generation = try #require(await slot.current()).generation
        slot.noteTraffic(generation: generation)
        slot.disconnect()
        #expect(slot.briefStreak == 0)
    }
}
