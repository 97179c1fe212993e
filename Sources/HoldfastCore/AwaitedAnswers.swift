import NIOConcurrencyHelpers

/// Answers that come back by another path than the question went, waited for by key, bounded.
/// The broker tells the supervisor of a deposit in a notification and the supervisor answers
/// with a request of its own (`handoff-kept`): the answer may arrive before the asker waits for
/// it (the question's send returned late), or never (a supervisor stopped by a debugger).
///
/// `expect` before the question is sent, so no answer can arrive unexpected; `wait` after. A key
/// expected again (or waited for past its timeout) drops what was pending for it: a late answer
/// to an earlier question is not taken for the answer to a later one.
public final class AwaitedAnswers<Key: Hashable & Sendable, Answer: Sendable>: Sendable {
    /// One expected answer: `wait` takes this, not the bare key, so an answer given to a newer
    /// question of the same key is never taken for this one.
    public struct Ticket: Sendable {
        let key: Key
        /// Names this question to its answerer, which echoes it (`answer(_:question:with:)`).
        public let number: UInt64
    }

    private enum Entry {
        case expected
        case answered(Answer)
        case waiting(CheckedContinuation<Answer?, Never>)
    }

    private struct State {
        var entries: [Key: (number: UInt64, entry: Entry)] = [:]
        var next: UInt64 = 0
    }

    private let state = NIOLockedValueBox(State())
    private let wheel: TimeoutWheel

    public init(wheel: TimeoutWheel = .shared) {
        self.wheel = wheel
    }

    /// Says an answer for `key` is expected from now on. Whoever waited on an earlier ticket for
    /// it gets nil.
    public func expect(_ key: Key) -> Ticket {
        let (ticket, displaced) = state.withLockedValue { s -> (Ticket, CheckedContinuation<Answer?, Never>?) in
            s.next &+= 1
            let displaced = s.entries[key].flatMap { old -> CheckedContinuation<Answer?, Never>? in
                if case .waiting(let continuation) = old.entry { return continuation }
                return nil
            }
            s.entries[key] = (s.next, .expected)
            return (Ticket(key: key, number: s.next), displaced)
        }
        displaced?.resume(returning: nil)
        return ticket
    }

    /// Gives `key` its answer. False when none is expected (never asked, or given up on): the
    /// answerer may want to undo what it did on the question's word. `question`, the ticket's
    /// number the answer echoes: an answer to an earlier question of the key (late, or overtaken
    /// by a later one's) is not taken for the one expected now.
    @discardableResult
    public func answer(_ key: Key, question: UInt64? = nil, with answer: Answer) -> Bool {
        let (expected, waiter) = state.withLockedValue { s -> (Bool, CheckedContinuation<Answer?, Never>?) in
            guard let current = s.entries[key], question.map({ $0 == current.number }) ?? true else { return (false, nil) }
            switch current.entry {
            case .expected:
                s.entries[key] = (current.number, .answered(answer))
                return (true, nil)
            case .answered:
                return (false, nil)
            case .waiting(let continuation):
                s.entries[key] = nil
                return (true, continuation)
            }
        }
        waiter?.resume(returning: answer)
        return expected
    }

    /// The answer for `ticket`, waiting up to `timeout` for it; nil if none came in time (or the
    /// key was expected again meanwhile). Either way the ticket is done with.
    public func wait(_ ticket: Ticket, timeout: Duration) async -> Answer? {
        await withCheckedContinuation { (continuation: CheckedContinuation<Answer?, Never>) in
            let ready = state.withLockedValue { s -> Answer?? in
                guard let current = s.entries[ticket.key], current.number == ticket.number else { return .some(nil) }
                switch current.entry {
                case .answered(let answer):
                    s.entries[ticket.key] = nil
                    return .some(answer)
                case .expected:
                    s.entries[ticket.key] = (current.number, .waiting(continuation))
                    return nil
                case .waiting:
                    // A second wait on one ticket: a caller's bug, answered at once.
                    return .some(nil)
                }
            }
            if let ready {
                continuation.resume(returning: ready)
                return
            }
            _ = wheel.schedule(after: timeout) { [state] in
                let late = state.withLockedValue { s -> CheckedContinuation<Answer?, Never>? in
                    guard let current = s.entries[ticket.key], current.number == ticket.number,
                        case .waiting(let continuation) = current.entry
                    else { return nil }
                    s.entries[ticket.key] = nil
                    return continuation
                }
                late?.resume(returning: nil)
            }
        }
    }

    /// Keys expected and not yet waited out (for tests and leaks).
    public var pendingCount: Int { state.withLockedValue { $0.entries.count } }
}
