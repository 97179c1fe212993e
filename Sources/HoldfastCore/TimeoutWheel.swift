import NIOConcurrencyHelpers

/// Timeouts for many waits that usually end long before them, served by one task that ticks
/// only while a timeout is pending.
///
/// Why not a task per wait sleeping for the timeout and cancelled when the wait ends: the
/// runtime keeps a cancelled `Task.sleep`'s timer, and the memory behind it, until the original
/// deadline. A draining stream waits for each acknowledgement with the drain timeout; under
/// churn that left hundreds of thousands of cancelled 30 s (or 5 min) sleeps queued — megabytes
/// of broker memory that came and went with the load (found with heaptrack in the soak,
/// RELIABILITY.md). Here cancelling removes an entry from a table and leaves nothing behind.
///
/// Timeouts fire up to one `tick` late; waits that need precision do not belong here.
///
/// Time this process did not run is not time waited: a tick that comes more than `stallAllowance`
/// after its time (the process stopped by SIGSTOP, a debugger or a cgroup freeze; the VM paused)
/// moves every pending deadline on by how late it is. A timeout here bounds a wait for something
/// outside (a host's acknowledgement, a peer's answer); while the process stood still it could
/// see none of it, and what arrived meanwhile waits in its sockets. Without this a broker stopped
/// longer than the drain timeout gave up, the moment it was continued, on streams whose host had
/// been back all along.
public final class TimeoutWheel: Sendable {
    /// Names a scheduled timeout, to cancel it.
    public struct Token: Sendable, Hashable {
        fileprivate let id: UInt64
    }

    struct Entry {
        var deadline: ContinuousClock.Instant
        /// When it was scheduled: a stall before that is not time it waited.
        let scheduled: ContinuousClock.Instant
        let fire: @Sendable () -> Void
    }

    struct State {
        var entries: [UInt64: Entry] = [:]
        var nextID: UInt64 = 0
        var ticking = false

        /// A tick came `stall` late at `now`: each deadline moves on by the part of the stall it
        /// was pending for — all of it for a timeout scheduled before, none of what came before
        /// its scheduling for one scheduled since (after a resume, before this tick). Moved by the
        /// whole stall, a fresh connect timeout after a 60 s pause waited 62 s, not 2.
        mutating func postpone(by stall: Duration, now: ContinuousClock.Instant) {
            for id in entries.keys {
                let entry = entries[id]!
                entries[id]!.deadline += min(stall, now - entry.scheduled)
            }
        }
    }

    public let tick: Duration
    /// How late a tick may come before the time it was late by is taken for time the process
    /// did not run.
    public let stallAllowance: Duration
    private let state = NIOLockedValueBox(State())

    public static let shared = TimeoutWheel()

    public init(tick: Duration = .milliseconds(50), stallAllowance: Duration = .seconds(1)) {
        self.tick = tick
        self.stallAllowance = stallAllowance
    }

    /// Calls `fire` once, about `timeout` from now, unless cancelled first. `fire` runs on the
    /// wheel's task: it must not block.
    @discardableResult
    public func schedule(after timeout: Duration, _ fire: @escaping @Sendable () -> Void) -> Token {
        let now = ContinuousClock.now
        let deadline = now + timeout
        let (id, start) = state.withLockedValue { s -> (UInt64, Bool) in
            s.nextID &+= 1
            s.entries[s.nextID] = Entry(deadline: deadline, scheduled: now, fire: fire)
            defer { s.ticking = true }
            return (s.nextID, !s.ticking)
        }
        if start { Task { await run() } }
        return Token(id: id)
    }

    /// Forgets a timeout that has not fired; a no-op after it fired.
    public func cancel(_ token: Token) {
        _ = state.withLockedValue { $0.entries.removeValue(forKey: token.id) }
    }

    /// Timeouts scheduled and neither fired nor cancelled.
    public var pending: Int { state.withLockedValue { $0.entries.count } }

    private func run() async {
        var lastTick = ContinuousClock.now
        while true {
            // Each tick's sleep runs to its end: nothing is left queued behind it.
            try? await Task.sleep(for: tick)
            let now = ContinuousClock.now
            let late = now - lastTick - tick
            lastTick = now
            let (due, keepTicking) = state.withLockedValue { s -> ([Entry], Bool) in
                if late > stallAllowance { s.postpone(by: late, now: now) }
                let due = s.entries.filter { $0.value.deadline <= now }
                for id in due.keys { s.entries.removeValue(forKey: id) }
                if s.entries.isEmpty { s.ticking = false }
                return (Array(due.values), !s.entries.isEmpty)
            }
            for entry in due.sorted(by: { $0.deadline < $1.deadline }) { entry.fire() }
            if !keepTicking { return }
        }
    }
}

extension Task where Failure == Never {
    /// The task's value if it finishes within `timeout`, else nil (the task goes on). Bounded
    /// through the shared `TimeoutWheel`, so an early finish leaves no timer behind.
    public func value(within timeout: Duration, wheel: TimeoutWheel = .shared) async -> Success? {
        let outcome = NIOLockedValueBox<(done: Bool, waiter: CheckedContinuation<Success?, Never>?, early: Success??)>((false, nil, nil))
        @Sendable func finish(_ value: Success?) {
            let waiter = outcome.withLockedValue { o -> CheckedContinuation<Success?, Never>? in
                guard !o.done else { return nil }
                o.done = true
                if o.waiter == nil { o.early = .some(value) }
                defer { o.waiter = nil }
                return o.waiter
            }
            waiter?.resume(returning: value)
        }
        let token = wheel.schedule(after: timeout) { finish(nil) }
        let watcher = Task<Void, Never> { finish(await self.value) }
        let result = await withCheckedContinuation { (continuation: CheckedContinuation<Success?, Never>) in
            let early = outcome.withLockedValue { o -> Success?? in
                if let early = o.early { return early }
                o.waiter = continuation
                return nil
            }
            if let early { continuation.resume(returning: early) }
        }
        wheel.cancel(token)
        _ = watcher  // ends with the task, whichever came first
        return result
    }
}
