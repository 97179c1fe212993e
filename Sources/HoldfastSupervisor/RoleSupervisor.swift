import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import Logging
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// Keeps one role process (the broker or the bridge worker) running: starts it, serves its
/// channel, and when it dies logs the cause and restarts it after an exponential back-off
/// (100 ms doubling to `maxBackoff`, 5 s unless configured; back to 100 ms once a run lasted 10 s).
final class RoleSupervisor: Sendable {
    struct Incarnation: Sendable {
        var pid: pid_t
        /// Its registration with the reaper (nil in tests that fake a role).
        var child: ChildReaper.Child?
        var channel: FDChannel
    }

    /// What happened to the role, for the service manager's status line.
    enum Event: Sendable {
        /// Started (`restarts`: how many times it had died before).
        case started(pid: pid_t, restarts: Int)
        /// Died while not stopping; restarted after `restartIn`.
        case died(cause: String, restartIn: Duration)
        /// Could not be started; tried again after `retryIn`.
        case cannotStart(error: String, retryIn: Duration)
    }

    let name: String
    private let logger: Logger
    private let reaper: ChildReaper
    /// Starts a new incarnation (spawn with a fresh socketpair).
    private let launch: @Sendable () throws -> Incarnation
    /// Serves the incarnation's channel; returns when it closes.
    private let serve: @Sendable (Incarnation) async -> Void
    private let onEvent: @Sendable (Event) -> Void
    private let state = NIOLockedValueBox(State())

    static let initialBackoff: Duration = .milliseconds(100)
    /// The longest back-off (`broker.restart_backoff_max` for the broker).
    private let maxBackoff: Duration
    /// A dead role's channel that stays open (`closeWhenRead`) is closed after this long
    /// without a message waiting in it...
    private let channelQuietFor: Duration
    /// ...or after this long in all.
    private let channelReadFor: Duration
    /// A role that ran this long was not crash-looping: its next restart is immediate again.
    /// (60 s made a bridge worker killed every 15–45 s come back after 5 s each time in the
    /// soak; a crash loop dies within milliseconds of starting.)
    static let healthyAfter: Duration = .seconds(10)

    private struct State: Sendable {
        var current: Incarnation?
        var startedAt: ContinuousClock.Instant?
        var restarts = 0
        var lastExit: String?
        var stopping = false
        /// The signal `stop` asked the role to end with.
        var stopSignal = SIGTERM
        /// A live upgrade holds the role down: its exit is not a death, it is not restarted
        /// until `release` (the upgrade failed) — or ever (this image was replaced).
        var held = false
        /// The upgrade waiting for the held incarnation's exit (and its channel served to the end).
        var holdWaiter: CheckedContinuation<ExitStatus?, Never>?
        /// The run loop waiting for `release` while held.
        var releaseWaiter: CheckedContinuation<Void, Never>?
        /// An incarnation is being started (`launch` runs: forked, its exec not yet known), and
        /// the holds waiting for that to be settled.
        var launching = false
        var launchWaiters: [CheckedContinuation<Void, Never>] = []
        /// Why the last start failed, until one succeeds: `status` says it (a broker refused for
        /// a process that took its uid is not "being restarted").
        var startFailure: String?
        /// Starts that failed since the last one that succeeded.
        var failedStarts = 0
        /// A failing start is retried every few seconds for as long as its cause lasts (a
        /// process holding the broker's uid, a pids limit): logged at once, then once a minute
        /// for the same reason, with how many went unlogged.
        var startFailureLog = LogPacer<String>(interval: RoleSupervisor.startFailureLogInterval)
    }

    static let startFailureLogInterval: Duration = .seconds(60)

    init(
        name: String, logger: Logger, reaper: ChildReaper, launch: @escaping @Sendable () throws -> Incarnation,
        serve: @escaping @Sendable (Incarnation) async -> Void, onEvent: @escaping @Sendable (Event) -> Void = { _ in },
        maxBackoff: Duration = .seconds(5), restarts: Int = 0, lastExit: String? = nil,
        channelQuietFor: Duration = .seconds(2), channelReadFor: Duration = .seconds(30)
    ) {
        self.channelQuietFor = channelQuietFor
        self.channelReadFor = channelReadFor
        state.withLockedValue {
            $0.restarts = restarts
            $0.lastExit = lastExit
        }
        self.name = name
        self.maxBackoff = maxBackoff
        self.logger = logger
        self.reaper = reaper
        self.launch = launch
        self.serve = serve
        self.onEvent = onEvent
    }

    var status: RoleStatus {
        state.withLockedValue { s in
            RoleStatus(
                name: name, pid: s.current?.pid,
                // Not running: no uptime (a broker that could not start for hours showed hours).
                uptimeSeconds: s.current == nil ? 0 : s.startedAt.map { Double((ContinuousClock.now - $0).components.seconds) } ?? 0,
                restarts: s.restarts, lastExit: s.lastExit)
        }
    }

    var pid: pid_t? { state.withLockedValue { $0.current?.pid } }

    /// Why the role is not running, when its last start failed (nil once one succeeds).
    var startFailure: String? { state.withLockedValue { $0.current == nil ? $0.startFailure : nil } }

    /// Runs until `stop()`: start, serve, reap, back off, restart.
    func run() async {
        var backoff = Self.initialBackoff
        while !state.withLockedValue({ $0.stopping }) {
            if await waitWhileHeld() {
                backoff = Self.initialBackoff
                continue
            }
            let incarnation: Incarnation
            state.withLockedValue { $0.launching = true }
            do {
                incarnation = try launch()
            } catch {
                endLaunch()
                let unlogged = state.withLockedValue { s -> Int? in
                    s.startFailure = "\(error)"
                    s.failedStarts += 1
                    // Keyed by the text without its numbers: a refusal naming a pid (another
                    // process running as the broker's user) is the same failure each time, and
                    // keyed whole it was never paced and each new pid stayed in the pacer.
                    return s.startFailureLog.note(String("\(error)".filter { !$0.isNumber }))
                }
                if let unlogged {
                    var metadata: Logger.Metadata = ["role": "\(name)", "error": "\(error)"]
                    if unlogged > 0 { metadata["failedStartsNotLogged"] = "\(unlogged)" }
                    logger.error("cannot start role", metadata: metadata)
                }
                onEvent(.cannotStart(error: "\(error)", retryIn: backoff))
                try? await Task.sleep(for: backoff)
                backoff = min(backoff * 2, maxBackoff)
                continue
            }
            let started = ContinuousClock.now
            // A live upgrade's hold that came while this one was being started found none
            // running, and went on without it: this one must not serve. (It did: the old image's
            // broker took every stream while the state was written, outlived the exec — its
            // channel closed, no parent-death signal, as it was forked by the thread that execs —
            // and its orderly end cleared the rings the new image's broker was resuming from.)
            // Decided under the lock `hold` reads `current` under: one or the other sees it.
            let admitted = state.withLockedValue { s -> (restarts: Int, stopSignal: Int32?, failedStarts: Int)? in
                guard !s.held else { return nil }
                s.current = incarnation
                s.startedAt = started
                s.startFailure = nil
                defer {
                    s.failedStarts = 0
                    s.startFailureLog = LogPacer(interval: Self.startFailureLogInterval)
                }
                return (s.restarts, s.stopping ? s.stopSignal : nil, s.failedStarts)
            }
            guard let (restarts, stopSignal, failedStarts) = admitted else {
                logger.info("role started while a live upgrade held it down: ended before it served", metadata: [
                    "role": "\(name)", "pid": "\(incarnation.pid)",
                ])
                send(SIGKILL, to: incarnation)
                _ = if let child = incarnation.child { await reaper.wait(child) } else { await reaper.wait(incarnation.pid) }
                incarnation.channel.close()
                endLaunch()
                continue
            }
            endLaunch()
            var metadata: Logger.Metadata = ["role": "\(name)", "pid": "\(incarnation.pid)"]
            if failedStarts > 0 { metadata["afterFailedStarts"] = "\(failedStarts)" }
            logger.info("role started", metadata: metadata)
            onEvent(.started(pid: incarnation.pid, restarts: restarts))
            // A stop that came while it was being started found no incarnation to ask: this one
            // is asked now. (It was not: the daemon's stop waited for ever for a bridge worker
            // started just after its SIGTERM, which nobody told to end.)
            if let stopSignal { askToEnd(incarnation, signal: stopSignal) }
            let serving = Task { await serve(incarnation) }
            let status = if let child = incarnation.child { await reaper.wait(child) } else { await reaper.wait(incarnation.pid) }
            // Its end of the channel closed with it: the reader reaches end-of-file after the
            // last frames it wrote, and those are handled before the next incarnation starts (a
            // broker's `handoff-releasing` or `handoff-deposited` written just before it died
            // decides what the next one is handed). Closing our end at once threw unread frames
            // away: a loaded run reaped the broker before its last notification was read. Closed
            // here only if end-of-file does not come (a copy of its end left in another process).
            let closer = Task { await closeWhenRead(incarnation.channel) }
            await serving.value
            closer.cancel()
            incarnation.channel.close()
            let (stopping, holder) = state.withLockedValue { s -> (Bool, CheckedContinuation<ExitStatus?, Never>?) in
                s.current = nil
                if s.held {
                    defer { s.holdWaiter = nil }
                    return (s.stopping, s.holdWaiter)
                }
                s.lastExit = status.description
                if !s.stopping { s.restarts += 1 }
                return (s.stopping, nil)
            }
            if let holder {
                logger.info("role stopped for a live upgrade", metadata: ["role": "\(name)", "status": "\(status)"])
                holder.resume(returning: status)
                continue
            }
            if stopping {
                logger.info("role stopped", metadata: ["role": "\(name)", "status": "\(status)"])
                return
            }
            if ContinuousClock.now - started >= Self.healthyAfter { backoff = Self.initialBackoff }
            logger.error("role died; restarting", metadata: [
                "role": "\(name)", "pid": "\(incarnation.pid)", "cause": "\(status)", "backoff": "\(backoff)",
            ])
            onEvent(.died(cause: status.description, restartIn: backoff))
            try? await Task.sleep(for: backoff)
            backoff = min(backoff * 2, maxBackoff)
        }
    }

    /// How long a role may take to end once asked to stop before it is killed: one an operator
    /// stopped is continued with the request, but a debugger's stop (ptrace) holds a signal other
    /// than SIGKILL for as long as the debugger likes, and the daemon's stop must not.
    static let stopLimit: Duration = .seconds(10)

    /// Closes a dead role's channel that has not reached end-of-file (a copy of its end kept
    /// elsewhere) once nothing is left in it to read: checked every `channelQuietFor`, at
    /// most `channelReadFor` in all. Why not a fixed bound: a supervisor slow to read (a loaded
    /// guest, or one stopped a moment by an operator, whose clock ran on meanwhile) found its
    /// channel closed under the dead role's last notifications, and a lost `handoff-exited` or
    /// `drained` is a process never let go. Why a bound all the same: a reader stuck for good
    /// must not hold the role's restart for good. The bound counts checks, not the clock: time
    /// the supervisor did not run (stopped by an operator or a debugger, the guest suspended —
    /// the clock counts both) is not time it could read in. Counted by the clock, the first
    /// check after a stop longer than the bound closed the channel under what it had not read.
    private func closeWhenRead(_ channel: FDChannel) async {
        var waited = Duration.zero
        while (try? await Task.sleep(for: channelQuietFor)) != nil {
            waited += channelQuietFor
            if channel.hasUnreadMessage, waited < channelReadFor { continue }
            if channel.hasUnreadMessage {
                logger.error("a dead role's last messages were not read in time: its channel is closed under them", metadata: [
                    "role": "\(name)", "waited": "\(channelReadFor)",
                ])
            }
            channel.close()
            return
        }
    }

    /// Stops restarting and signals the current incarnation; kills it if it has not ended
    /// within `stopLimit`.
    /// One being started meanwhile is asked as soon as it is (`run`).
    func stop(signal: Int32 = SIGTERM) {
        let (current, released) = state.withLockedValue { s -> (Incarnation?, CheckedContinuation<Void, Never>?) in
            s.stopping = true
            s.stopSignal = signal
            defer { s.releaseWaiter = nil }
            return (s.current, s.releaseWaiter)
        }
        if let current { askToEnd(current, signal: signal) }
        released?.resume()
    }

    /// Signals `incarnation` to end, and kills it if it has not `stopLimit` later.
    private func askToEnd(_ incarnation: Incarnation, signal: Int32) {
        send(signal, to: incarnation)
        // Through its registration only: once reaped, nothing is sent (a fake role in a test
        // has none, and its pid may be anyone's by then).
        if let child = incarnation.child {
            _ = TimeoutWheel.shared.schedule(after: Self.stopLimit) { [self] in
                guard reaper.signal(child, SIGKILL) == .sent else { return }
                logger.warning("role did not end within \(Self.stopLimit.spoken) of being asked to stop: killed", metadata: [
                    "role": "\(name)", "pid": "\(child.pid)", "state": "\(ProcessRunState.of(child.pid).explanation)",
                ])
            }
        }
    }

    /// Signals an incarnation through its registration with the reaper: never a pid the kernel
    /// gave to another process after the role died (`ChildReaper.signal`). A signal that asks it
    /// to end is followed by SIGCONT, as systemd does: a role an operator stopped (SIGSTOP,
    /// Ctrl-Z) would otherwise hold it until continued, and its stop or a live upgrade with it.
    func send(_ signal: Int32, to incarnation: Incarnation) {
        let continues = EndingSignal.isFollowedByContinue(signal)
        if let child = incarnation.child {
            _ = reaper.signal(child, signal)
            if continues { _ = reaper.signal(child, SIGCONT) }
        } else {
            Glibc.kill(incarnation.pid, signal)
            if continues { Glibc.kill(incarnation.pid, SIGCONT) }
        }
    }

    /// Continues the current incarnation if an operator stopped it (SIGSTOP, Ctrl-Z): a live
    /// upgrade is about to ask it to end, which a stopped broker would not hear. True if it was
    /// stopped. (A debugger's stop is not ended by SIGCONT: that one is killed after the limit.)
    func continueIfStopped() -> Bool {
        guard let current = state.withLockedValue({ $0.current }), ProcessRunState.of(current.pid) == .stopped else { return false }
        send(SIGCONT, to: current)
        return true
    }

    // MARK: Live upgrade

    /// Takes the role down for a live upgrade and keeps it down: `ask` makes the current
    /// incarnation exit (a SIGTERM, the broker's quiesce); after `limit` it is killed. Returns
    /// its exit status once it was reaped and its channel served to the end (every notification
    /// it sent handled), nil if none was running (it was between restarts).
    func hold(within limit: Duration, ask: @Sendable (Incarnation) -> Void) async -> ExitStatus? {
        // One being started is settled first (killed unserved, as `run` sees the hold): it is
        // forked already, and an exec of this image meanwhile would leave it running.
        let launching = state.withLockedValue { s -> Bool in
            s.held = true
            return s.launching
        }
        if launching {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let settled = state.withLockedValue { s -> Bool in
                    guard s.launching else { return true }
                    s.launchWaiters.append(continuation)
                    return false
                }
                if settled { continuation.resume() }
            }
        }
        let incarnation = state.withLockedValue { $0.current }
        guard let incarnation else { return nil }
        let killer = TimeoutWheel.shared.schedule(after: limit) { [self] in send(SIGKILL, to: incarnation) }
        defer { TimeoutWheel.shared.cancel(killer) }
        return await withCheckedContinuation { continuation in
            let gone = state.withLockedValue { s -> Bool in
                guard s.current?.pid == incarnation.pid else { return true }
                s.holdWaiter = continuation
                return false
            }
            if gone { continuation.resume(returning: nil) } else { ask(incarnation) }
        }
    }

    /// The upgrade did not happen: the role starts again at once (or, if the held incarnation
    /// has not ended yet, once it has: its end then counts as a death, and is restarted). An
    /// upgrade that gave up waiting for it leaves its `hold` waiting: answered now, with nil.
    func release() {
        let (waiter, holder) = state.withLockedValue { s -> (CheckedContinuation<Void, Never>?, CheckedContinuation<ExitStatus?, Never>?) in
            s.held = false
            defer {
                s.releaseWaiter = nil
                s.holdWaiter = nil
            }
            return (s.releaseWaiter, s.holdWaiter)
        }
        waiter?.resume()
        holder?.resume(returning: nil)
    }

    /// A start is settled (started, refused, or killed unserved): the holds waiting go on.
    private func endLaunch() {
        let waiters = state.withLockedValue { s -> [CheckedContinuation<Void, Never>] in
            s.launching = false
            defer { s.launchWaiters = [] }
            return s.launchWaiters
        }
        for waiter in waiters { waiter.resume() }
    }

    /// Whether a live upgrade holds the role down (tests).
    var isHeld: Bool { state.withLockedValue { $0.held } }

    /// Waits while held; true if it waited (the role starts afresh).
    private func waitWhileHeld() async -> Bool {
        guard state.withLockedValue({ $0.held && !$0.stopping }) else { return false }
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let free = state.withLockedValue { s -> Bool in
                guard s.held, !s.stopping else { return true }
                s.releaseWaiter = continuation
                return false
            }
            if free { continuation.resume() }
        }
        return true
    }

    var restarts: Int { state.withLockedValue { $0.restarts } }
    var lastExit: String? { state.withLockedValue { $0.lastExit } }

    /// Kills the current incarnation (tests and shutdown escalation).
    func kill(signal: Int32) {
        if let current = state.withLockedValue({ $0.current }) { send(signal, to: current) }
    }

    var channel: FDChannel? { state.withLockedValue { $0.current?.channel } }
}
