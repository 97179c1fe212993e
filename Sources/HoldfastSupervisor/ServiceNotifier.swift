import HoldfastPosix
import HoldfastProtocol
import Logging

#if canImport(Glibc)
import Glibc
#endif

/// The supervisor's side of systemd's notification protocol: READY=1 once the roles are up,
/// STATUS= on notable changes, STOPPING=1 on shutdown, WATCHDOG=1 every WatchdogSec/2. Without
/// `$NOTIFY_SOCKET` (not started by systemd, or Type= is not notify) every call is a no-op.
///
/// Messages are sent in the order they are posted, by one task, so a status line never
/// overtakes a newer one; `finish()` waits until every posted message is out.
public final class ServiceNotifier: Sendable {
    private let socket: NotifySocket?
    private let logger: Logger
    private let queue: AsyncStream<[ServiceNotify.Field]>.Continuation
    private let sender: Task<Void, Never>
    /// Half of WatchdogSec (nil: no watchdog).
    public let watchdogInterval: Duration?

    /// Reads `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID` from `environment`. An
    /// unusable `$NOTIFY_SOCKET` is logged and ignored: the daemon still runs.
    public init(environment: [String: String], logger: Logger) {
        self.logger = logger
        var socket: NotifySocket?
        switch ServiceNotify.Address.parse(environment["NOTIFY_SOCKET"]) {
        case .success(let address?):
            do {
                socket = try NotifySocket(address: address)
            } catch {
                logger.warning("cannot notify the service manager", metadata: ["NOTIFY_SOCKET": "\(address)", "error": "\(error)"])
            }
        case .success(nil):
            break
        case .failure(let problem):
            logger.warning("NOTIFY_SOCKET ignored", metadata: ["reason": "\(problem)"])
        }
        self.socket = socket
        watchdogInterval = socket == nil ? nil : ServiceNotify.watchdogInterval(environment: environment, pid: getpid())
        let (stream, continuation) = AsyncStream<[ServiceNotify.Field]>.makeStream()
        queue = continuation
        sender = Task { [socket, logger] in
            guard let socket else {
                for await _ in stream {}
                return
            }
            var failed = false
            for await fields in stream {
                do {
                    try await socket.send(fields)
                    failed = false
                } catch {
                    // Said once per run of failures: the watchdog would repeat it every few seconds.
                    if !failed {
                        logger.warning("cannot notify the service manager", metadata: ["NOTIFY_SOCKET": "\(socket.address)", "error": "\(error)"])
                    }
                    failed = true
                }
            }
        }
    }

    /// Whether a service manager listens (tests and logs).
    public var isActive: Bool { socket != nil }

    /// Queues one message (one datagram).
    public func post(_ fields: [ServiceNotify.Field]) {
        guard socket != nil else { return }
        queue.yield(fields)
    }

    public func status(_ text: String) { post([.status(text)]) }

    /// WATCHDOG=1 every `watchdogInterval` until the task is cancelled. The ping comes from the
    /// supervisor's own task scheduler: a supervisor whose runtime is wedged stops pinging, and
    /// systemd restarts it.
    public func runWatchdog() async {
        guard let interval = watchdogInterval else { return }
        logger.info("systemd watchdog", metadata: ["interval": "\(interval)"])
        while !Task.isCancelled {
            post([.watchdog])
            try? await Task.sleep(for: interval)
        }
    }

    /// Sends what is queued and stops; later posts are dropped.
    public func finish() async {
        queue.finish()
        await sender.value
    }
}
