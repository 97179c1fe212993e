import HoldfastCore
import Testing

/// `LogPacer`: a line an outsider can provoke is said at once, then at most once per interval
/// for each key, with how many went unsaid.
@Suite("LogPacer")
struct LogPacerTests {
    @Test func theFirstOccurrenceIsSaidAtOnceAndRepeatsWithinTheIntervalAreCounted() {
        var pacer = LogPacer<Int32>(interval: .seconds(10))
        let start = ContinuousClock.now
        #expect(pacer.note(14, at: start) == 0)
        for offset in 1...5 { #expect(pacer.note(14, at: start + .seconds(offset)) == nil) }
        // Ten seconds after the last line said: said again, with the five in between.
        #expect(pacer.note(14, at: start + .seconds(10)) == 5)
        #expect(pacer.note(14, at: start + .seconds(11)) == nil)
        #expect(pacer.note(14, at: start + .seconds(25)) == 1)
    }

    @Test func eachKeyHasItsOwnPace() {
        var pacer = LogPacer<Int32>(interval: .seconds(10))
        let start = ContinuousClock.now
        #expect(pacer.note(10, at: start) == 0)
        #expect(pacer.note(12, at: start) == 0, "another signal is said at once")
        #expect(pacer.note(10, at: start + .milliseconds(1)) == nil)
        #expect(pacer.note(12, at: start + .milliseconds(1)) == nil)
        #expect(pacer.note(34, at: start + .milliseconds(2)) == 0)
    }
}
