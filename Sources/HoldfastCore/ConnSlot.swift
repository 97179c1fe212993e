import NIOConcurrencyHelpers

// One file on purpose (over 500 lines): the slot's states, its redial cycle, its leases and
// its drain timer share one lock and one set of invariants (at most one cycle per slot, a stale
// failure never drops a newer connection); split apart they would be checked in no one place.

/// The connection of one stream, replaceable while the stream's relays keep running.
///
/// States: `connected`, `empty` (relays parked: suspended tasks, no thread held) and `closed`.
/// docs/ARCHITECTURE.md, "ConnSlot semantics", lists its rules. Everything here is pure logic over `ByteConnection`;
/// dialing is a closure supplied by the owner, so the same slot serves sockets, tests and the
/// resumable-stream handshake.
public final class ConnSlot<Connection: ByteConnection>: Sendable {
    /// The connection a caller may use, with the generation it was installed as. A relay whose I/O
    /// on it fails calls `disconnect(ifCurrent:)` with the generation, so a stale failure can
    /// never tear down a newer connection.
    public struct Lease: Sendable {
        public let connection: Connection
        public let generation: UInt64
    }

    public typealias Dial = @Sendable () async throws -> Connection

    /// Raised by `write` when the slot closed before every byte was written.
    public struct Closed: Error, Sendable {
        /// Bytes of the failed write that no connection accepted.
        public var unsent: Int
        /// True when the slot was closed by its drain timeout rather than by its owner.
        public var abandoned: Bool
    }

    public let name: String
    private let policy: RedialPolicy
    private let dial: Dial?
    private let observer: (@Sendable (SlotEvent) -> Void)?
    private let state = NIOLockedValueBox(State())

    /// - Parameters:
    ///   - name: used in events and errors.
    ///   - policy: bounds every redial cycle.
    ///   - dial: how to obtain a new connection; `nil` means the slot never redials by itself
    ///     (someone else calls `set`).
    ///   - observer: called synchronously for every event; keep it cheap (metrics, logs, tests).
    public init(
        name: String = "slot",
        policy: RedialPolicy = .default,
        dial: Dial? = nil,
        observer: (@Sendable (SlotEvent) -> Void)? = nil
    ) {
        self.name = name
        self.policy = policy
        self.dial = dial
        self.observer = observer
    }

    // MARK: - Inspection

    public var phase: SlotPhase {
        state.withLockedValue { s in
            switch s.phase {
            case .connected: return .connected
            case .empty: return .empty
            case .closed: return s.abandoned ? .abandoned : .closed
            }
        }
    }

    public var isClosed: Bool { state.withLockedValue { if case .closed = $0.phase { true } else { false } } }

    public var statistics: SlotStatistics { state.withLockedValue { $0.statistics } }

    /// One line of internal state, for diagnosing a stuck stream (logs, test failures).
    public var debugSummary: String {
        state.withLockedValue { s in
            let phase: String
            switch s.phase {
            case .connected(_, let generation): phase = "connected(gen \(generation))"
            case .empty: phase = "empty"
            case .closed: phase = s.abandoned ? "abandoned" : "closed"
            }
            let cycle: String
            switch s.cycle {
            case .idle: cycle = "idle"
            case .dialing(let kicked): cycle = kicked ? "dialing(kicked)" : "dialing"
            case .sleeping: cycle = "sleeping"
            }
            return "\(name): \(phase), generation \(s.generation), parked \(s.parked.count), cycle \(cycle), "
                + "connects \(s.statistics.connects), disconnects \(s.statistics.disconnects), dials \(s.statistics.dialAttempts)"
        }
    }

    /// Brief connections in a row so far (see `briefConnection`).
    var briefStreak: Int { state.withLockedValue { $0.briefStreak } }

    /// Callers parked in `current()`, waiting for a connection.
    var parkedCount: Int { state.withLockedValue { $0.parked.count } }

    /// True while a redial cycle is dialing or waiting between attempts.
    public var isRedialing: Bool { state.withLockedValue { if case .idle = $0.cycle { false } else { true } } }

    // MARK: - Using the connection

    /// The current connection, suspending while the slot is empty. `nil` once the slot is closed,
    /// or when the calling task is cancelled while parked.
    public func current() async -> Lease? {
        if let ready = state.withLockedValue({ $0.immediateLease() }) { return ready }
        let id = state.withLockedValue { s -> UInt64 in
            s.nextParkID &+= 1
            return s.nextParkID
        }
        let lease = await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Lease?, Never>) in
                let resumeNow: Lease?? = state.withLockedValue { s in
                    if let ready = s.immediateLease() { return .some(ready) }
                    if Task.isCancelled { return .some(nil) }
                    s.parked[id] = continuation
                    return .none
                }
                if let lease = resumeNow { continuation.resume(returning: lease) }
            }
        } onCancel: {
            state.withLockedValue { $0.parked.removeValue(forKey: id) }?.resume(returning: nil)
        }
        // `install` resumes a parked caller after releasing the lock it stored the connection
        // under. Resumed before this task had suspended, the value comes over through the
        // runtime's own atomics, which ThreadSanitizer does not see (it reported the new
        // connection's fields as a race once); taking the lock again makes the hand-over one
        // it sees. Only on the parked path, once per park.
        state.withLockedValue { _ in }
        return lease
    }

    /// Writes every byte, across as many connections as it takes. While the slot is empty the
    /// caller is parked (and so stops reading its own source: back-pressure). A connection that
    /// fails part-way is dropped — only if it is still the current one — and the remainder goes
    /// to the next connection. Throws `Closed` if the slot closes first.
    public func write(_ bytes: UnsafeRawBufferPointer) async throws(Closed) {
        var offset = 0
        while offset < bytes.count {
            guard let lease = await current() else {
                throw Closed(unsent: bytes.count - offset, abandoned: phase == .abandoned)
            }
            do {
                try await lease.connection.write(UnsafeRawBufferPointer(rebasing: bytes[offset...]))
                let written = bytes.count - offset
                state.withLockedValue { $0.statistics.bytesWritten &+= UInt64(written) }
                return
            } catch {
                offset += error.accepted
                recordFailedWrite(error)
                disconnect(ifCurrent: lease.generation, reason: .writeFailed)
            }
        }
    }

    /// Counts bytes a connection took (for relays that write to the lease themselves).
    func recordWrite(_ count: Int) {
        state.withLockedValue { $0.statistics.bytesWritten &+= UInt64(count) }
    }

    /// Counts bytes a failing connection accepted before it failed (written), and of them those
    /// its last hand-over had in flight (unconfirmed: see `WriteFailure.unconfirmed`).
    func recordFailedWrite(_ failure: WriteFailure) {
        state.withLockedValue {
            $0.statistics.bytesWritten &+= UInt64(failure.accepted)
            $0.statistics.bytesUnconfirmed &+= UInt64(failure.unconfirmed)
        }
    }

    /// Counts bytes received from a connection.
    func recordRead(_ count: Int) {
        state.withLockedValue { $0.statistics.bytesRead &+= UInt64(count) }
    }

    /// The current connection if there is one now; never parks.
    public func connectedLease() -> Lease? {
        state.withLockedValue { s in
            if case .connected(let connection, let generation) = s.phase { return Lease(connection: connection, generation: generation) }
            return nil
        }
    }

    /// Reads from the current connection, parking while the slot is empty. A connection's
    /// end-of-file or error is *not* the end of the stream — the host may simply have gone away
    /// for a migration — so it only drops that connection and the read waits for the next one.
    /// Returns 0 only when the slot is closed: the stream's explicit end.
    public func read(into buffer: UnsafeMutableRawBufferPointer) async -> Int {
        while true {
            guard let lease = await current() else { return 0 }
            let count: Int
            do {
                count = try await lease.connection.read(into: buffer)
            } catch {
                disconnect(ifCurrent: lease.generation, reason: .readFailed)
                continue
            }
            if count > 0 {
                state.withLockedValue { $0.statistics.bytesRead &+= UInt64(count) }
                return count
            }
            disconnect(ifCurrent: lease.generation, reason: .endOfFile)
        }
    }

    // MARK: - Changing the connection

    /// Installs a connection and wakes every parked caller; closes the previous connection. On a
    /// closed slot the new connection is closed instead.
    public func set(_ connection: Connection) {
        install(connection, onlyIfEmpty: false)
    }

    /// connected → empty: closes the connection and starts a redial cycle unless one is running.
    /// Idempotent; a no-op on a closed slot. On an empty slot whose last cycle gave up, starts a
    /// new cycle.
    public func disconnect() {
        disconnect(matching: nil, reason: .requested)
    }

    /// `disconnect()`, but only if `generation` is still the current connection: a relay reporting
    /// a failure of a connection that was already replaced changes nothing.
    public func disconnect(ifCurrent generation: UInt64, reason: DisconnectReason = .requested) {
        disconnect(matching: generation, reason: reason)
    }

    /// Closes the slot for good: the connection is closed and parked callers are woken with
    /// end-of-stream. Idempotent.
    public func close() {
        closeSlot(abandoned: false)
    }

    /// Closes the slot as *abandoned*: the stream gave up waiting for its host (drain timeout).
    public func abandon() {
        closeSlot(abandoned: true)
    }

    /// A bridge-up event: the host is reachable again, so dial now instead of waiting for the next
    /// tick of a cycle, and with a full attempt budget. Does nothing unless the slot is empty.
    public func redialNow() {
        guard dial != nil else { return }
        let start: Bool = state.withLockedValue { s in
            guard case .empty = s.phase else { return false }
            switch s.cycle {
            case .idle:
                s.cycle = .dialing(kicked: false)
                return true
            case .dialing:
                s.cycle = .dialing(kicked: true)
                return false
            case .sleeping(_, let continuation, let timer):
                s.cycle = .dialing(kicked: true)
                timer.cancel()
                continuation.resume()
                return false
            }
        }
        if start { startCycle() }
    }

    /// Once set, any period longer than `timeout` during which the slot stays empty closes it as
    /// *abandoned*: parked writers are released with the count of what they could not deliver.
    /// Used after the stream's process exited, so teardown never waits forever for a host that
    /// does not come back.
    public func setDrainTimeout(_ timeout: Duration) {
        let epoch: UInt64? = state.withLockedValue { s in
            s.drainTimeout = timeout
            if case .empty = s.phase { return s.emptyEpoch }
            return nil
        }
        if let epoch { armDrainTimer(epoch: epoch, timeout: timeout) }
    }

    // MARK: - Internals

    private func install(_ connection: Connection, onlyIfEmpty: Bool) {
        let outcome: InstallOutcome = state.withLockedValue { s in
            switch s.phase {
            case .closed:
                return .rejected
            case .connected where onlyIfEmpty:
                return .rejected
            case .connected(let previous, _):
                let r = s.connect(connection, previous: previous)
                return .installed(previous: r.previous, parked: r.parked, lease: r.lease)
            case .empty:
                let r = s.connect(connection, previous: nil)
                return .installed(previous: r.previous, parked: r.parked, lease: r.lease)
            }
        }
        switch outcome {
        case .rejected:
            connection.close()
        case .installed(let previous, let parked, let lease):
            observer?(.connected(generation: lease.generation))
            if let previous, previous !== connection { previous.close() }
            for continuation in parked { continuation.resume(returning: lease) }
        }
    }

    private func disconnect(matching generation: UInt64?, reason: DisconnectReason) {
        let (dropped, startCycle, epoch, drain, firstPause): (Connection?, Bool, UInt64, Duration?, Duration?) = state.withLockedValue { s in
            switch s.phase {
            case .closed:
                return (nil, false, 0, nil, nil)
            case .connected(let connection, let current):
                if let generation, generation != current { return (nil, false, 0, nil, nil) }
                s.phase = .empty
                s.emptyEpoch &+= 1
                s.statistics.disconnects &+= 1
                let streak = s.endConnection(briefUnder: Self.briefConnection)
                let start = s.claimCycle(canDial: dial != nil)
                return (connection, start, s.emptyEpoch, s.drainTimeout, policy.pause(afterBriefConnections: streak))
            case .empty:
                // A stale failure report must not restart anything; an explicit disconnect of an
                // empty slot whose cycle ended does.
                if generation != nil { return (nil, false, 0, nil, nil) }
                return (nil, s.claimCycle(canDial: dial != nil), s.emptyEpoch, nil, nil)
            }
        }
        if let dropped {
            dropped.close()
            observer?(.disconnected(reason: reason))
        }
        if let drain { armDrainTimer(epoch: epoch, timeout: drain) }
        if startCycle { self.startCycle(pausingFirst: firstPause) }
    }

    /// A connection that ends this soon having carried nothing is brief: one of a row of them
    /// is a peer that accepts and drops (a host that no longer has the stream, a proxy whose
    /// backend is gone: within milliseconds), and dialling it again at once would spin. Short
    /// enough that a migration's cut of an idle stream's connection seldom counts: under the
    /// soak's migration every 2 s, a second in its place let idle streams build rows and wait
    /// before redialling where a bridge-up had not yet come.
    static var briefConnection: Duration { .milliseconds(250) }

    /// The owner read a frame on connection `generation` (beyond the handshake): it carried
    /// something, so its end is not a brief one. Owners that move bytes through the slot's own
    /// `read`/`write` need not call it; the resumable engine calls it once per connection.
    public func noteTraffic(generation: UInt64) {
        state.withLockedValue { s in
            if case .connected(_, generation) = s.phase { s.carried = true }
        }
    }

    private func closeSlot(abandoned: Bool, ifEmptyAtEpoch epoch: UInt64? = nil) {
        let closed: (Connection?, [CheckedContinuation<Lease?, Never>], CheckedContinuation<Void, Never>?)? =
            state.withLockedValue { s in
                if case .closed = s.phase { return nil }
                if let epoch {
                    guard case .empty = s.phase, s.emptyEpoch == epoch else { return nil }
                }
                var connection: Connection?
                if case .connected(let c, _) = s.phase { connection = c }
                s.phase = .closed
                s.abandoned = abandoned
                let parked = Array(s.parked.values)
                s.parked.removeAll()
                var sleeper: CheckedContinuation<Void, Never>?
                if case .sleeping(_, let continuation, let timer) = s.cycle {
                    timer.cancel()
                    sleeper = continuation
                    s.cycle = .dialing(kicked: false)  // the cycle task sees `closed` and ends
                }
                return (connection, parked, sleeper)
            }
        guard let (connection, parked, sleeper) = closed else { return }
        connection?.close()
        observer?(abandoned ? .abandoned : .closed)
        for continuation in parked { continuation.resume(returning: nil) }
        sleeper?.resume()
    }

    private func armDrainTimer(epoch: UInt64, timeout: Duration) {
        // Through the wheel: a slot refilled in time leaves no sleeping task behind.
        _ = TimeoutWheel.shared.schedule(after: timeout) { [self] in closeSlot(abandoned: true, ifEmptyAtEpoch: epoch) }
    }

    private func startCycle(pausingFirst firstPause: Duration? = nil) {
        Task { [self] in await runCycle(pausingFirst: firstPause) }
    }

    /// One redial cycle. The caller has already moved `cycle` out of `.idle`, so exactly one
    /// cycle runs per slot at a time; every exit path returns `cycle` to `.idle` under the same
    /// lock that observed the reason to stop, so a concurrent `disconnect` never finds a cycle
    /// that is about to end.
    ///
    /// `firstPause`: wait this long before the first dial (after a row of brief connections;
    /// `redialNow` and `close` cut it short, as any pause between attempts).
    private func runCycle(pausingFirst firstPause: Duration? = nil) async {
        guard let dial else { return }
        if let firstPause { await pause(firstPause) }
        var attempt = 0
        while true {
            let proceed = state.withLockedValue { s -> Bool in
                guard case .empty = s.phase else {
                    s.cycle = .idle
                    return false
                }
                if case .dialing(kicked: true) = s.cycle { attempt = 0 }
                s.cycle = .dialing(kicked: false)
                return true
            }
            guard proceed else { return }
            attempt += 1
            state.withLockedValue { $0.statistics.dialAttempts &+= 1 }
            observer?(.dialing(attempt: attempt))
            let dialed = await dialOnce(dial)
            if case .success(let connection) = dialed {
                let installed: Bool = state.withLockedValue { s in
                    guard case .empty = s.phase else { return false }
                    s.cycle = .idle
                    return true
                }
                if installed {
                    install(connection, onlyIfEmpty: true)
                } else {
                    connection.close()
                    state.withLockedValue { $0.cycle = .idle }
                }
                return
            }
            if case .failure(let failure) = dialed {
                state.withLockedValue {
                    $0.statistics.dialFailures &+= 1
                    $0.statistics.dialFailuresSinceConnected &+= 1
                    $0.statistics.lastDialError = failure.reason
                }
                observer?(.dialFailed(attempt: attempt, reason: failure.reason))
            }
            let exhausted = state.withLockedValue { s -> Bool in
                if case .dialing(kicked: true) = s.cycle { return false }
                guard attempt >= policy.attempts else { return false }
                s.cycle = .idle
                return true
            }
            if exhausted {
                observer?(.gaveUp(attempts: attempt))
                return
            }
            await pause(policy.delay(afterAttempt: attempt))
        }
    }

    /// Sleeps between attempts; `redialNow` or `close` cut the sleep short.
    private func pause(_ delay: Duration) async {
        let token = state.withLockedValue { s -> UInt64 in
            s.nextSleepToken &+= 1
            return s.nextSleepToken
        }
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let timer = Task { [self] in
                try? await Task.sleep(for: delay)
                let sleeper: CheckedContinuation<Void, Never>? = state.withLockedValue { s in
                    guard case .sleeping(token, let c, _) = s.cycle else {
                        // The timer beat the registration below (a short delay on a busy
                        // machine): leave a mark, or the sleep would never end.
                        s.expiredSleepToken = token
                        return nil
                    }
                    s.cycle = .dialing(kicked: false)
                    return c
                }
                sleeper?.resume()
            }
            let resumeNow: Bool = state.withLockedValue { s in
                guard case .empty = s.phase, case .dialing(kicked: false) = s.cycle, s.expiredSleepToken != token else { return true }
                s.cycle = .sleeping(token, continuation, timer)
                return false
            }
            if resumeNow {
                timer.cancel()
                continuation.resume()
            }
        }
    }

    /// One dial bounded by the connect timeout. The timeout does not rely on the dialer honouring
    /// cancellation: whichever of the dial and the timer finishes first decides, and a connection
    /// that arrives after the deadline is closed.
    private func dialOnce(_ dial: @escaping Dial) async -> Result<Connection, DialFailure> {
        let timeout = policy.connectTimeout
        return await withCheckedContinuation { (continuation: CheckedContinuation<Result<Connection, DialFailure>, Never>) in
            let once = ResumeOnce(continuation)
            let dialTask = Task {
                do {
                    let connection = try await dial()
                    if !once.resume(returning: .success(connection)) { connection.close() }
                } catch {
                    _ = once.resume(returning: .failure(DialFailure(reason: "\(error)")))
                }
            }
            let timer = TimeoutWheel.shared.schedule(after: timeout) {
                if once.resume(returning: .failure(DialFailure(reason: "no connection within the connect timeout (\(timeout.spoken))"))) {
                    dialTask.cancel()
                }
            }
            // A dial that finished first cancels its timer.
            Task {
                await dialTask.value
                TimeoutWheel.shared.cancel(timer)
            }
        }
    }
}

// MARK: - Public vocabulary

public enum SlotPhase: String, Sendable, Equatable {
    case connected, empty, closed, abandoned
}

public enum DisconnectReason: String, Sendable {
    case requested, writeFailed, readFailed, endOfFile, protocolError
}

/// Why one dial failed, in words (the dialer's error, or the connect timeout).
public struct DialFailure: Error, Sendable, Equatable {
    public var reason: String
}

public enum SlotEvent: Sendable, Equatable {
    case connected(generation: UInt64)
    case disconnected(reason: DisconnectReason)
    case dialing(attempt: Int)
    /// The `attempt`-th dial of a cycle failed, and why.
    case dialFailed(attempt: Int, reason: String)
    case gaveUp(attempts: Int)
    case closed
    case abandoned
}

public struct SlotStatistics: Sendable, Equatable {
    public var bytesWritten: UInt64 = 0
    public var bytesRead: UInt64 = 0
    /// Bytes a connection accepted just before it failed: they may or may not have reached the
    /// host. Raw mode can lose these; resumable mode replays them.
    public var bytesUnconfirmed: UInt64 = 0
    public var connects: UInt64 = 0
    public var disconnects: UInt64 = 0
    public var dialAttempts: UInt64 = 0
    public var dialFailures: UInt64 = 0
    /// Why the last dial failed, while the slot has had no connection since (nil once connected).
    public var lastDialError: String?
    /// Failed dials since the last connection.
    public var dialFailuresSinceConnected: UInt64 = 0
}

// MARK: - State

extension ConnSlot {
    fileprivate enum Phase {
        case connected(Connection, UInt64)
        case empty
        case closed
    }

    fileprivate enum Cycle {
        case idle
        /// A cycle task is running; `kicked` asks it to dial again at once, with a fresh budget.
        case dialing(kicked: Bool)
        case sleeping(UInt64, CheckedContinuation<Void, Never>, Task<Void, Never>)
    }

    fileprivate enum InstallOutcome {
        case installed(previous: Connection?, parked: [CheckedContinuation<Lease?, Never>], lease: Lease)
        case rejected
    }

    fileprivate struct State {
        var phase: Phase = .empty
        var generation: UInt64 = 0
        var parked: [UInt64: CheckedContinuation<Lease?, Never>] = [:]
        var nextParkID: UInt64 = 0
        var cycle: Cycle = .idle
        var nextSleepToken: UInt64 = 0
        /// The last sleep whose timer fired before the cycle registered as sleeping.
        var expiredSleepToken: UInt64 = 0
        var emptyEpoch: UInt64 = 0
        var drainTimeout: Duration?
        var abandoned = false
        var statistics = SlotStatistics()
        /// When the current connection was installed, whether its owner said it carried a frame
        /// (`noteTraffic`), and the slot's own byte counts then: a connection that ends within
        /// `briefConnection` having carried nothing is *brief*, and `briefStreak` counts them in
        /// a row (see `RedialPolicy.pause(afterBriefConnections:)`).
        var connectedAt: ContinuousClock.Instant?
        var carried = false
        var bytesAtConnect: UInt64 = 0
        var briefStreak = 0

        func immediateLease() -> Lease?? {
            switch phase {
            case .connected(let connection, let generation): return .some(Lease(connection: connection, generation: generation))
            case .closed: return .some(nil)
            case .empty: return .none
            }
        }

        mutating func connect(_ connection: Connection, previous: Connection?)
            -> (previous: Connection?, parked: [CheckedContinuation<Lease?, Never>], lease: Lease)
        {
            generation &+= 1
            phase = .connected(connection, generation)
            connectedAt = .now
            carried = false
            bytesAtConnect = statistics.bytesRead &+ statistics.bytesWritten
            statistics.connects &+= 1
            statistics.lastDialError = nil
            statistics.dialFailuresSinceConnected = 0
            let waiting = Array(parked.values)
            parked.removeAll()
            return (previous, waiting, Lease(connection: connection, generation: generation))
        }

        /// The current connection is ending: was it brief (see `briefStreak`)? Returns the
        /// streak so far.
        mutating func endConnection(briefUnder limit: Duration) -> Int {
            let carriedSomething = carried || statistics.bytesRead &+ statistics.bytesWritten != bytesAtConnect
            let brief = connectedAt.map { ContinuousClock.now - $0 < limit } ?? false
            briefStreak = brief && !carriedSomething ? briefStreak + 1 : 0
            connectedAt = nil
            return briefStreak
        }

        /// Claims the right to start a cycle: true if none is running and the slot can dial.
        mutating func claimCycle(canDial: Bool) -> Bool {
            guard canDial, case .idle = cycle else { return false }
            cycle = .dialing(kicked: false)
            return true
        }
    }
}

/// Resumes a continuation exactly once, whoever gets there first.
final class ResumeOnce<Value: Sendable>: Sendable {
    private let continuation: NIOLockedValueBox<CheckedContinuation<Value, Never>?>

    init(_ continuation: CheckedContinuation<Value, Never>) {
        self.continuation = NIOLockedValueBox(continuation)
    }

    /// Returns false if the continuation was already resumed.
    func resume(returning value: Value) -> Bool {
        guard let continuation = self.continuation.withLockedValue({ c -> CheckedContinuation<Value, Never>? in
            defer { c = nil }
            return c
        }) else { return false }
        continuation.resume(returning: value)
        return true
    }
}
