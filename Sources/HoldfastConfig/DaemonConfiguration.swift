import HoldfastCore
import HoldfastProtocol

/// The daemon's configuration: `config/holdfast.yaml` documents every key.
///
/// Loaded by `ConfigurationLoader` from a YAML or JSON file, with `HOLDFAST_*` environment
/// variables overriding individual keys (`HOLDFAST_BRIDGE_ADDRESS` for `bridge.address`). Every
/// value is checked at start-up; a bad one stops it with the file, the key and the reason.
public struct DaemonConfiguration: Codable, Sendable, Equatable {
    public struct Bridge: Codable, Sendable, Equatable {
        /// Where the host's bridge listens; the guest dials it.
        public var address: SocketAddress
        /// Whether each end proves it holds the bridge key before anything else is said.
        public var authentication: BridgeAuthenticationMethod
        /// The bridge key (hex digits, root-only); unused with `authentication: none`.
        public var keyFile: String
        /// First pause after a lost bridge, doubling up to `reconnectMax`.
        public var reconnectInitial: Milliseconds
        public var reconnectMax: Milliseconds
    }

    public struct Broker: Codable, Sendable, Equatable {
        /// The unprivileged user the broker runs as: a name, or `uid:N` (a uid with no password
        /// entry); nil keeps the daemon's user (a uid shared with the supervisor).
        public var user: String?
        public var seccomp: String
        /// Start the broker even though other processes run as its uid (they could signal it).
        /// Off by default: the supervisor refuses, at start-up and at every restart.
        public var allowSharedUID: Bool
        /// A broker that died is restarted after a back-off that starts at 100 ms and doubles
        /// up to this (its streams wait that long; the supervisor holds their pipes meanwhile).
        public var restartBackoffMax: Milliseconds

        public init(user: String?, seccomp: String, allowSharedUID: Bool = false, restartBackoffMax: Milliseconds = 5000) {
            self.user = user
            self.seccomp = seccomp
            self.allowSharedUID = allowSharedUID
            self.restartBackoffMax = restartBackoffMax
        }
    }

    public struct Handoff: Codable, Sendable, Equatable {
        /// The broker's public handoff socket; empty disables it.
        public var socket: String
        public var mode: UInt32
        public var allowedUIDs: [UInt32]
        public var allowedGIDs: [UInt32]
        /// Admitted peers' connections the broker serves at once; more are refused.
        public var maxConnections: Int
        /// How long the fds of a `release` whose answer may not have reached its peer (a broker
        /// crash between the two, or the peer gone) wait for the peer's next `release`. Nil in a
        /// configuration an older image wrote down in a live upgrade: the default.
        public var releaseKeptFor: Milliseconds?
    }

    public struct Streams: Codable, Sendable, Equatable {
        public var redialAttempts: Int
        public var redialInterval: Milliseconds
        public var connectTimeout: Milliseconds
        public var drainTimeout: Milliseconds
        public var ringCapacity: Int
    }

    public struct Shutdown: Codable, Sendable, Equatable {
        /// Sent to container processes first.
        public var signal: Int32
        /// Then SIGKILL after this.
        public var grace: Milliseconds
        /// The whole shutdown, relays draining included, ends within this.
        public var timeout: Milliseconds

        /// Why this timeout leaves the drains too little, or nil. After the grace's SIGKILL the
        /// output drains and the exits go out in what is left of it: with under 2 s left (grace
        /// = timeout) every output not drained by then is cut. A warning, not a refusal (a file
        /// that loaded before must not stop a reboot's start).
        public var timeoutWarning: String? {
            guard timeout < grace + 2_000 else { return nil }
            return "WARNING: less than 2s longer than shutdown.grace: the output's drain and the exits after the grace's SIGKILL get \(max(0, timeout - grace))ms"
        }
    }

    public struct Runc: Codable, Sendable, Equatable {
        /// The runc binary (a bare name is looked up in PATH).
        public var path: String
        /// runc's state directory for Holdfast's containers (`runc --root`), kept apart from
        /// other users of runc on the guest.
        public var root: String
    }

    public struct Metrics: Codable, Sendable, Equatable {
        /// Where `GET /metrics` is served (Prometheus text format); nil: no endpoint.
        public var address: SocketAddress?
    }

    public struct Processes: Codable, Sendable, Equatable {
        /// Every direct process starts under a seccomp filter that refuses (EPERM) a signal from
        /// it, or from anything it starts, to the supervisor (its pid or process group) or, for
        /// one started as root, to every process at once (kill -1): a root one's external
        /// `kill $PPID` or `pkill` would otherwise stop the daemon and every container.
        public var signalGuard: Bool
        /// How long a direct process may take to reach its exec (its working directory entered,
        /// its binary opened) before it is killed and its create fails: one on a file system
        /// that does not answer would otherwise hold its create — a host request in flight, a
        /// live upgrade's wait — for ever. Absent from a state an earlier binary wrote.
        public var startTimeout: Milliseconds?

        public static let defaultStartTimeout: Milliseconds = 60_000

        public init(signalGuard: Bool = true, startTimeout: Milliseconds = Processes.defaultStartTimeout) {
            self.signalGuard = signalGuard
            self.startTimeout = startTimeout
        }
    }

    public struct Control: Codable, Sendable, Equatable {
        /// The local socket `holdfast status` talks to.
        public var socket: String
    }

    public var bridge: Bridge
    public var broker: Broker
    public var handoff: Handoff
    public var streams: Streams
    public var shutdown: Shutdown
    public var control: Control
    public var runc: Runc
    public var metrics: Metrics
    /// Where the daemon keeps its sockets (created if missing).
    public var runDirectory: String
    /// Nil in a configuration an older image wrote down in a live upgrade: the defaults.
    public var processes: Processes? = nil
}

/// A duration in whole milliseconds (JSON-friendly; the config file says "100ms", "2s", "1m").
public typealias Milliseconds = Int

extension Int {
    public var milliseconds: Duration { .milliseconds(self) }
}

/// A configuration problem: which file, which key, what is wrong with it.
public struct ConfigurationError: Error, Sendable, Equatable, CustomStringConvertible {
    public var file: String
    public var key: String
    public var reason: String

    public init(file: String, key: String, reason: String) {
        self.file = file
        self.key = key
        self.reason = reason
    }

    public var description: String {
        key.isEmpty ? "\(file): \(reason)" : "\(file): \(key): \(reason)"
    }
}
