import HoldfastCore
import Testing

@Suite("The handoff socket's connection budgets")
struct HandoffConnectionGateTests {
    @Test func admittedPeersAreServedUpToTheLimitThenRefusedAsFull() {
        var gate = HandoffConnectionGate(maxServed: 3, maxRefusing: 2)
        #expect((0..<3).map { _ in gate.admit(allowed: true) } == [.serve, .serve, .serve])
        #expect(gate.admit(allowed: true) == .refuse(.full))
        #expect(gate.served == 3 && gate.refusing == 1 && gate.turnedAway == 1)
        gate.release(.serve)
        #expect(gate.admit(allowed: true) == .serve, "a place freed is served again")
        #expect(gate.served == 3)
    }

    @Test func aFloodOfPeersNotAllowedNeverTakesAnAdmittedPeersPlace() {
        var gate = HandoffConnectionGate(maxServed: 2, maxRefusing: 3)
        let flood = (0..<1_000).map { _ in gate.admit(allowed: false) }
        #expect(flood.prefix(3).allSatisfy { $0 == .refuse(.notAllowed) })
        #expect(flood.dropFirst(3).allSatisfy { $0 == .drop }, "beyond the refusals being answered, closed at once")
        #expect(gate.refusing == 3 && gate.served == 0)
        #expect(gate.turnedAway == 1_000)
        #expect(gate.admit(allowed: true) == .serve, "the flood holds none of the admitted places")
        gate.release(.refuse(.notAllowed))
        #expect(gate.admit(allowed: false) == .refuse(.notAllowed), "a refusal answered frees its place")
        gate.release(.drop)
        #expect(gate.refusing == 3, "a dropped connection never held a place")
    }

    @Test func theDescriptorRoomIsAskedOnlyForAConnectionThatWouldBeServed() {
        var gate = HandoffConnectionGate(maxServed: 1, maxRefusing: 4)
        var asked = 0
        #expect(gate.admit(allowed: false) { asked += 1; return true } == .refuse(.notAllowed))
        #expect(asked == 0, "not for a peer that is refused anyway")
        #expect(gate.admit(allowed: true) { asked += 1; return false } == .refuse(.noDescriptorRoom))
        #expect(asked == 1 && gate.served == 0)
        #expect(gate.admit(allowed: true) { asked += 1; return true } == .serve)
        #expect(gate.admit(allowed: true) { asked += 1; return true } == .refuse(.full))
        #expect(asked == 2, "not once the admitted places are all taken")
    }
}

@Suite("The log lines a flood of turned-away handoff connections costs")
struct TurnAwayLogTests {
    @Test func aFloodGetsItsFirstLinesThenOneSummaryPerWindow() {
        var log = TurnAwayLog(linesPerWindow: 3)
        #expect(log.note(dropped: false) == .logLine(windowStarted: true), "the first starts a window")
        #expect(log.note(dropped: true) == .logLine(windowStarted: false))
        #expect(log.note(dropped: false) == .logLine(windowStarted: false))
        for index in 0..<1_000 { #expect(log.note(dropped: index % 4 != 0) == .counted) }
        let summary = log.closeWindow()
        #expect(summary.refusals == 250 && summary.drops == 750)
        #expect(log.unreportedRefusals == 0 && log.unreportedDrops == 0, "said once")
        #expect(log.note(dropped: true) == .logLine(windowStarted: true), "the next starts a new window")
    }

    @Test func aQuietWindowEndsWithNothingToSay() {
        var log = TurnAwayLog(linesPerWindow: 8)
        #expect(log.note(dropped: false) == .logLine(windowStarted: true))
        let summary = log.closeWindow()
        #expect(summary.refusals == 0 && summary.drops == 0)
    }
}
