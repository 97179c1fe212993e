/// The pure half of systemd's notification protocol (sd_notify(3)), spoken without libsystemd:
/// where to send (`$NOTIFY_SOCKET`), what to send (newline-separated `KEY=VALUE` assignments in
/// one datagram), and how often to ping the watchdog (`$WATCHDOG_USEC`, `$WATCHDOG_PID`).
/// `HoldfastPosix.NotifySocket` sends the datagrams.
public enum ServiceNotify {
    /// One assignment of a notification message.
    public enum Field: Sendable, Equatable {
        /// Start-up is finished (Type=notify waits for this).
        case ready
        /// The service is shutting down.
        case stopping
        /// Keep-alive for WatchdogSec=.
        case watchdog
        /// A one-line status for `systemctl status`.
        case status(String)
        /// The main process (only needed when another process notifies on its behalf).
        case mainPID(Int32)
        /// Asks systemd (236 and later) for this much more time from now for the current
        /// start or stop, past the unit's TimeoutStopSec= (which does not know our own bound).
        case extendTimeout(microseconds: UInt64)

        public var assignment: String {
            switch self {
            case .ready: return "READY=1"
            case .stopping: return "STOPPING=1"
            case .watchdog: return "WATCHDOG=1"
            // A newline would start a new assignment: status text is one line.
            case .status(let text): return "STATUS=" + String(text.map { $0.isNewline ? " " : $0 })
            case .mainPID(let pid): return "MAINPID=\(pid)"
            case .extendTimeout(let microseconds): return "EXTEND_TIMEOUT_USEC=\(microseconds)"
            }
        }
    }

    /// The datagram for `fields`: one assignment per line, as sd_notify sends it.
    public static func message(_ fields: [Field]) -> [UInt8] {
        Array(fields.map(\.assignment).joined(separator: "\n").utf8)
    }

    /// Where `$NOTIFY_SOCKET` points.
    public enum Address: Sendable, Equatable, CustomStringConvertible {
        /// A socket file (`/run/systemd/notify`).
        case path(String)
        /// An abstract socket (`@name`: the name without the '@', sent with a leading NUL).
        case abstract(String)

        /// The 108-byte `sun_path` of a sockaddr_un holds the name and (for a path) its NUL.
        static let maxPathBytes = 107

        /// nil with a reason when `$NOTIFY_SOCKET` is set but unusable; `.none` when unset/empty.
        public static func parse(_ value: String?) -> Result<Address?, Problem> {
            guard let value, !value.isEmpty else { return .success(nil) }
            if value.hasPrefix("@") {
                let name = String(value.dropFirst())
                guard !name.isEmpty else { return .failure(Problem("'@' names no abstract socket")) }
                guard name.utf8.count <= maxPathBytes else { return .failure(Problem("the abstract name is longer than 107 bytes")) }
                return .success(.abstract(name))
            }
            if value.hasPrefix("/") {
                guard value.utf8.count <= maxPathBytes else { return .failure(Problem("the path is longer than 107 bytes")) }
                return .success(.path(value))
            }
            // systemd 253+ also accepts vsock:CID:PORT (a VM notifying its host's manager).
            return .failure(Problem("'\(value)' is neither an absolute path nor an '@' abstract name (vsock: is not supported)"))
        }

        public var description: String {
            switch self {
            case .path(let path): return path
            case .abstract(let name): return "@" + name
            }
        }
    }

    /// Why a notification setting is unusable.
    public struct Problem: Error, Sendable, Equatable, CustomStringConvertible {
        public var reason: String
        public init(_ reason: String) { self.reason = reason }
        public var description: String { reason }
    }

    /// How often to send WATCHDOG=1, as sd_watchdog_enabled(3) decides it: half of
    /// `$WATCHDOG_USEC`, if that is a positive number and `$WATCHDOG_PID` is unset or names this
    /// process. nil: no watchdog.
    public static func watchdogInterval(environment: [String: String], pid: Int32) -> Duration? {
        guard let text = environment["WATCHDOG_USEC"], let usec = UInt64(text), usec > 0 else { return nil }
        if let owner = environment["WATCHDOG_PID"], !owner.isEmpty {
            guard let ownerPID = Int32(owner), ownerPID == pid else { return nil }
        }
        return .microseconds(Int64(clamping: usec / 2))
    }

    /// The variables a service manager sets for the main process only: the supervisor's children
    /// (roles, container processes) must not inherit them, or they could speak for the service.
    public static let environmentVariables: Set<String> = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"]
}
