import HoldfastCore
import Testing

/// `SignalBurstLimit`: a signal that comes more than `limit` times within the window is to be
/// muted, and what was already on its way is dropped until the mute is over; one that comes now
/// and then never is.
@Suite("SignalBurstLimit")
struct SignalBurstLimitTests {
    let start = ContinuousClock.now

    @Test func theOnePastTheLimitMutesWhatFollowsIsDroppedAndTheCountStartsAgainAfter() {
        var bursts = SignalBurstLimit(limit: 3, window: .seconds(1), muted: .seconds(10))
        var verdicts: [SignalBurstLimit.Verdict] = []
        for offset in 0..<6 { verdicts.append(bursts.arrived(10, at: start + .milliseconds(offset))) }
        #expect(verdicts == [.heard, .heard, .heard, .mute, .muted, .muted], "the fourth within a second mutes; the ones read after it are dropped")
        #expect(bursts.arrived(10, at: start + .seconds(9)) == .muted)
        // Heard again once the mute is over: counted afresh.
        verdicts = []
        for offset in 0..<4 { verdicts.append(bursts.arrived(10, at: start + .seconds(11) + .milliseconds(offset))) }
        #expect(verdicts == [.heard, .heard, .heard, .mute])
    }

    @Test func aSignalThatComesNowAndThenIsNeverMutedAndEachSignalCountsApart() {
        var bursts = SignalBurstLimit(limit: 3, window: .seconds(1))
        // SIGXCPU past a soft CPU limit: once a second, for a minute.
        var xcpu: Set<SignalBurstLimit.Verdict> = []
        for second in 0..<60 { xcpu.insert(bursts.arrived(24, at: start + .seconds(second))) }
        #expect(xcpu == [.heard])
        var usr1: [SignalBurstLimit.Verdict] = []
        var usr2: [SignalBurstLimit.Verdict] = []
        for offset in 0..<3 {
            usr1.append(bursts.arrived(10, at: start + .milliseconds(offset)))
            usr2.append(bursts.arrived(12, at: start + .milliseconds(offset)))
        }
        usr2.append(bursts.arrived(12, at: start + .milliseconds(5)))
        usr1.append(bursts.arrived(10, at: start + .seconds(2)))
        #expect(usr2 == [.heard, .heard, .heard, .mute], "SIGUSR2's fourth")
        #expect(usr1 == [.heard, .heard, .heard, .heard], "SIGUSR1 counted apart, and a new window after a second")
    }
}
