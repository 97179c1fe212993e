/// What the broker needs from the configuration. The supervisor validates the configuration
/// file and hands the broker this, already checked, so the broker never reads a file after it
/// dropped its privileges.
public struct BrokerSettings: Codable, Sendable, Equatable {
    public var user: String?
    public var seccomp: SeccompAction
    public var redialAttempts: Int
    public var redialIntervalMilliseconds: Int
    public var connectTimeoutMilliseconds: Int
    public var drainTimeoutMilliseconds: Int
    public var ringCapacity: Int
    public var handoffAllowedUIDs: [UInt32]
    public var handoffAllowedGIDs: [UInt32]
    /// Admitted handoff connections served at once (`handoff.max_connections`).
    public var handoffMaxConnections: Int
    /// How long a release a crash interrupted, or whose answer did not reach its peer, is kept
    /// for the peer's next `release` (`handoff.release_kept_for`). Nil: the default.
    public var handoffReleaseKeptForMilliseconds: Int?

    /// `handoff.release_kept_for` by default.
    public static let defaultReleaseKeptFor = 60_000

    public var handoffReleaseKeptFor: Duration { .milliseconds(handoffReleaseKeptForMilliseconds ?? Self.defaultReleaseKeptFor) }

    public init(
        user: String? = nil, seccomp: SeccompAction = .kill, redialAttempts: Int = 60, redialIntervalMilliseconds: Int = 100,
        connectTimeoutMilliseconds: Int = 2000, drainTimeoutMilliseconds: Int = 30_000, ringCapacity: Int = 1 << 20,
        handoffAllowedUIDs: [UInt32] = [0], handoffAllowedGIDs: [UInt32] = [], handoffMaxConnections: Int = 256,
        handoffReleaseKeptForMilliseconds: Int? = nil
    ) {
        self.user = user
        self.seccomp = seccomp
        self.redialAttempts = redialAttempts
        self.redialIntervalMilliseconds = redialIntervalMilliseconds
        self.connectTimeoutMilliseconds = connectTimeoutMilliseconds
        self.drainTimeoutMilliseconds = drainTimeoutMilliseconds
        self.ringCapacity = ringCapacity
        self.handoffAllowedUIDs = handoffAllowedUIDs
        self.handoffAllowedGIDs = handoffAllowedGIDs
        self.handoffMaxConnections = handoffMaxConnections
        self.handoffReleaseKeptForMilliseconds = handoffReleaseKeptForMilliseconds
    }
}

/// What the filter does with a syscall outside the broker's allow-list
/// (`broker.seccomp` in the configuration).
public enum SeccompAction: String, Sendable, Codable, CaseIterable {
    /// Kill the whole process (SIGSYS): the production default.
    case kill
    /// Allow it but log it to the kernel audit log: for auditing a new build.
    case log
    /// No filter at all (debugging only; the broker still drops its privileges).
    case off
}
