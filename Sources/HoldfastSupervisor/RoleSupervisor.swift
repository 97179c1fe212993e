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
    }

    init(
        name: String, logger: Logger, reaper: ChildReaper, launch: @escaping @Sendable () throws -> Incarnation,
        serve: @escaping @Sendable (Incarnation) async -> Void, onEvent: @escaping @Sendable (Event) -> Void = { _ in },
        maxBackoff: Duration = .seconds(5)
    ) {
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
                uptimeSeconds: s.startedAt.map { Double((ContinuousClock.now - $0).components.seconds) } ?? 0,
                restarts: s.restarts, lastExit: s.lastExit)
        }
    }

    var pid: pid_t? { state.withLockedValue { $0.current?.pid } }

    /// Runs until `stop()`: start, serve, reap, back off, restart.
    func run() async {
        var backoff = Self.initialBackoff
        while !state.withLockedValue({ $0.stopping }) {
            let incarnation: Incarnation
            do {
                incarnation = try launch()
            } catch {
                logger.error("cannot start role", metadata: ["role": "\(name)", "error": "\(error)"])
                onEvent(.cannotStart(error: "\(error)", retryIn: backoff))
                try? await Task.sleep(for: backoff)
                backoff = min(backoff * 2, maxBackoff)
                continue
            }
            reaper.expect(incarnation.pid)
            let started = ContinuousClock.now
            let restarts = state.withLockedValue {
                $0.current = incarnation
                $0.startedAt = started
                return $0.restarts
            }
            logger.info("role started", metadata: ["role": "\(name)", "pid": "\(incarnation.pid)"])
            onEvent(.started(pid: incarnation.pid, restarts: restarts))
            let serving = Task { await serve(incarnation) }
            let status = await reaper.wait(incarnation.pid)
            incarnation.channel.close()
            await serving.value
            let stopping = state.withLockedValue { s -> Bool in
                s.current = nil
                s.lastExit = status.description
                if !s.stopping { s.restarts += 1 }
                return s.stopping
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

    /// Stops restarting and signals the current incarnation.
    func stop(signal: Int32 = SIGTERM) {
        let pid = state.withLockedValue { s -> pid_t? in
            s.stopping = true
            return s.current?.pid
        }
        if let pid { Glibc.kill(pid, signal) }
    }

    /// Kills the current incarnation (tests and shutdown escalation).
    func kill(signal: Int32) {
        if let pid = pid { Glibc.kill(pid, signal) }
    }

    var channel: FDChannel? { state.withLockedValue { $0.current?.channel } }
}
