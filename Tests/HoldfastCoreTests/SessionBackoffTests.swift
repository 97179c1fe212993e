import HoldfastCore
import Testing

/// The bridge worker's pause between dials (`SessionBackoff`).
@Suite("The bridge's redial pause")
struct SessionBackoffTests {
    /// A host that takes the connection and ends it at once (it cannot read our hello) is
    /// redialled with a growing pause, as a dial that fails is: before, every 100 ms, each time
    /// cutting every stream's connection. A session that was in use starts the pause over.
    @Test func aSessionThatEndsAtOnceIsPausedAfterAsAFailedDialIs() {
        var backoff = SessionBackoff(initial: .milliseconds(100), max: .seconds(5))
        let pauses = (0..<8).map { _ in backoff.ended(after: .milliseconds(5)) }
        #expect(pauses == [100, 200, 400, 800, 1600, 3200, 5000, 5000].map { Duration.milliseconds($0) })
        #expect(backoff.ended(after: .seconds(3)) == .milliseconds(100), "a session in use starts over")
        #expect(backoff.failed() == .milliseconds(100))
        #expect(backoff.failed() == .milliseconds(200), "failed dials double it too")
        #expect(backoff.next == .milliseconds(400))
    }

    /// A blackout's failed dials grow the pause; the connection after it starts it over, so a
    /// session then cut at once (a second migration) waits the first pause, not the blackout's.
    /// Sessions that end at once, one after another, keep growing it through their connections.
    @Test func aConnectionStartsOverTheDialsPauseButNotABriefStreaks() {
        var backoff = SessionBackoff(initial: .milliseconds(100), max: .seconds(5))
        for _ in 0..<10 { _ = backoff.failed() }
        #expect(backoff.next == .seconds(5))
        backoff.connected()
        #expect(backoff.ended(after: .milliseconds(5)) == .milliseconds(100), "the blackout's pause is over")
        backoff.connected()
        #expect(backoff.ended(after: .milliseconds(5)) == .milliseconds(200), "a second brief session in a row")
        backoff.connected()
        #expect(backoff.ended(after: .milliseconds(5)) == .milliseconds(400))
        backoff.connected()
        #expect(backoff.ended(after: .seconds(10)) == .milliseconds(100), "one in use ends the streak")
        #expect(backoff.briefSessions == 0)
    }
}
