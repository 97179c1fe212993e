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

    /// Keyed by what others choose (a process id), a pacer forgets keys said over an interval
    /// ago once it holds more than 1,024: 100,000 ids stalling once each do not grow it, and a
    /// key still within its interval keeps its pace.
    @Test func keysOfThePastAreLetGo() {
        var pacer = LogPacer<String>(interval: .seconds(10))
        let start = ContinuousClock.now
        #expect(pacer.note("busy", at: start + .seconds(99_999)) == 0)
        for index in 0..<100_000 { #expect(pacer.note("p\(index)", at: start + .seconds(index)) == 0) }
        #expect(pacer.keyCount <= 1024 + 10, "\(pacer.keyCount) keys")
        #expect(pacer.note("busy", at: start + .seconds(100_000)) == nil, "still within its interval")
    }

    /// A key forgotten with occurrences unsaid lost their count: it is kept until said.
    @Test func aKeyWithOccurrencesUnsaidIsNotForgotten() {
        var pacer = LogPacer<String>(interval: .seconds(10))
        let start = ContinuousClock.now
        #expect(pacer.note("k", at: start) == 0)
        for offset in 1...5 { #expect(pacer.note("k", at: start + .milliseconds(offset)) == nil) }
        for index in 0..<1025 { _ = pacer.note("other-\(index)", at: start + .seconds(11)) }
        #expect(pacer.note("k", at: start + .seconds(12)) == 5)
    }
}
