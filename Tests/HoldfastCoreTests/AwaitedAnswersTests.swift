import HoldfastCore
import HoldfastTestSupport
import Testing

/// The broker waits for the supervisor's word on a deposit, which comes back as a request of its
/// own: it may come before the wait, after it gave up, or for a later question of the same key.
@Suite("Answers waited for by key", .timeLimit(.minutes(1)))
struct AwaitedAnswersTests {
    @Test func anAnswerReachesItsWaiterWhetherItCameBeforeOrDuringTheWait() async throws {
        let answers = AwaitedAnswers<String, Int>(wheel: TimeoutWheel(tick: .milliseconds(10)))
        let early = answers.expect("a")
        #expect(answers.answer("a", with: 1), "expected: taken")
        #expect(await answers.wait(early, timeout: .seconds(5)) == 1)

        let late = answers.expect("b")
        let waiting = Task { await answers.wait(late, timeout: .seconds(5)) }
        try await Task.sleep(for: .milliseconds(50))  // so that the answer comes during the wait
        #expect(answers.answer("b", with: 2))
        #expect(await waiting.value == 2)
        #expect(answers.pendingCount == 0)
    }

    @Test func aWaitGivesUpAndTheLateAnswerIsRefused() async throws {
        let answers = AwaitedAnswers<String, Int>(wheel: TimeoutWheel(tick: .milliseconds(10)))
        let ticket = answers.expect("a")
        let started = ContinuousClock.now
        #expect(await answers.wait(ticket, timeout: .milliseconds(100)) == nil)
        #expect(ContinuousClock.now - started >= .milliseconds(100))
        #expect(!answers.answer("a", with: 1), "nobody waits any more: the answerer hears so")
        #expect(!answers.answer("never-asked", with: 1))
        #expect(answers.pendingCount == 0)
    }

    @Test func anAnswerToAnEarlierQuestionIsNotTakenForALaterOne() async throws {
        let answers = AwaitedAnswers<String, Int>(wheel: TimeoutWheel(tick: .milliseconds(10)))
        let first = answers.expect("a")
        // Waiting when the same key is asked again (or not yet: then it finds its ticket stale):
        // either way it ends with no answer, not with the later question's.
        let firstWait = Task { await answers.wait(first, timeout: .seconds(5)) }
        try await Task.sleep(for: .milliseconds(50))
        let second = answers.expect("a")
        #expect(await firstWait.value == nil, "the earlier question's wait ends with no answer")
        #expect(answers.answer("a", with: 7))
        #expect(await answers.wait(first, timeout: .milliseconds(50)) == nil, "the old ticket gets nothing")
        #expect(await answers.wait(second, timeout: .seconds(5)) == 7)
    }
}
