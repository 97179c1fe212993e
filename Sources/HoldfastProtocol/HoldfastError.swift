/// What went wrong, anywhere in Holdfast: one error type with a code a program can switch on,
/// a message a person can read, and (for logs only) the error underneath.
///
/// On every control protocol it travels as `{"code": "...", "message": "..."}` in an `error`
/// frame; `wire` and `init(wire:)` are the one mapping between the two (docs/PROTOCOL.md lists
/// the codes).
public struct HoldfastError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Code: String, Sendable, Codable, CaseIterable {
        // The request itself.
        case badRequest = "bad-request"
        case unknownType = "unknown-type"
        case badFrame = "bad-frame"
        case frameTooLarge = "frame-too-large"
        case badAddress = "bad-address"
        case badUser = "bad-user"
        case badDescriptor = "bad-descriptor"
        case permissionDenied = "permission-denied"
        case needsRoot = "needs-root"
        // Processes.
        case processExists = "process-exists"
        case noSuchProcess = "no-such-process"
        case notRunning = "not-running"
        case noSuchContainer = "no-such-container"
        case tokenInUse = "token-in-use"
        case noStdin = "no-stdin"
        case noTTY = "no-tty"
        case stdioFailed = "stdio-failed"
        /// The supervisor is near its limit on open files: a create is refused while it keeps
        /// enough for a broker restart to take every running process over.
        case tooManyOpenFiles = "too-many-open-files"
        /// A kernel resource ran short where the request needed it (an epoll watch — the uid's
        /// `fs.epoll.max_user_watches` — or memory): nothing was kept; asking again once it is
        /// back may succeed.
        case resourceShortage = "resource-shortage"
        /// No task is left for a new process (fork's EAGAIN: the guest's `kernel.pid_max` or
        /// `threads-max`, or a pids limit of the daemon's cgroup, such as its unit's
        /// `TasksMax=`): nothing was started; asking again once processes end may succeed.
        case tooManyProcesses = "too-many-processes"
        /// The broker already serves `handoff.max_connections` handoff connections.
        case tooManyConnections = "too-many-connections"
        case startFailed = "start-failed"
        /// The program does not exist (exec's ENOENT, runc's "executable file not found"): a
        /// shell's 127.
        case commandNotFound = "command-not-found"
        /// The program exists but cannot be run (EACCES, ENOEXEC, a directory): a shell's 126.
        case cannotExecute = "cannot-execute"
        case signalFailed = "signal-failed"
        case resizeFailed = "resize-failed"
        case runtimeFailed = "runtime-failed"
        case runtimeMissing = "runtime-missing"
        // The daemon and its channels.
        case brokerUnavailable = "broker-unavailable"
        case shuttingDown = "shutting-down"
        /// State written by another version (a snapshot) that this binary cannot read.
        case incompatibleState = "incompatible-state"
        /// A live upgrade did not happen (the new binary is missing, cannot run, or cannot read
        /// this daemon's state; another upgrade is under way): the running daemon goes on.
        case upgradeFailed = "upgrade-failed"
        case channelClosed = "channel-closed"
        case badReply = "bad-reply"
        // The host side (`holdfast host`, BridgeServer).
        case noGuest = "no-guest"
        case bridgeLost = "bridge-lost"
        /// The guest took a request and did not answer it within the caller's time (its daemon
        /// stopped, traced or overloaded): the request may still be carried out.
        case guestNotAnswering = "guest-not-answering"
        case noHostService = "no-host-service"
        case hostServeGone = "host-serve-gone"
        /// Another client attached to the process: this one's streams were handed to it.
        case attachedElsewhere = "attached-elsewhere"
        case closing = "closing"
        case localFailed = "local-failed"
        /// A code this build does not know (a newer peer's): the message starts with it.
        case unknown = "error"
    }

    public var code: Code
    public var message: String
    /// The error underneath, for logs and `description`; never sent to a peer.
    public var cause: (any Error & Sendable)?

    public init(_ code: Code, _ message: String, cause: (any Error & Sendable)? = nil) {
        self.code = code
        self.message = message
        self.cause = cause
    }

    public var description: String { "\(code.rawValue): \(message)" }

    public static func == (lhs: HoldfastError, rhs: HoldfastError) -> Bool {
        lhs.code == rhs.code && lhs.message == rhs.message
    }

    // MARK: The wire

    /// The body of an `error` frame saying this. A message that names what the peer sent (an id,
    /// a path) is cut to `maxWireMessage` bytes: an error about a 60 KiB id must still fit the
    /// frame the peer can read (past it, the peer's channel broke — a bridge worker restarted
    /// and every stream parked over one bad request).
    public var errorFrameBody: [UInt8] {
        guard message.utf8.count > Self.maxWireMessage else { return ControlJSON.encode(self) }
        var cut = self
        cut.message = String(decoding: message.utf8.prefix(Self.maxWireMessage), as: UTF8.self) + "… (cut to \(Self.maxWireMessage) bytes)"
        return ControlJSON.encode(cut)
    }

    /// The most of a message an `error` frame carries (well inside a frame even escaped).
    public static let maxWireMessage = 4096

    /// From an `error` frame's body; a body that is not a JSON error keeps its text.
    public init(errorFrameBody body: [UInt8], frameType: UInt32) {
        do {
            self = try ControlJSON.decode(HoldfastError.self, from: body, frameType: frameType)
        } catch {
            self.init(.unknown, String(decoding: body, as: UTF8.self))
        }
    }
}

/// The one mapping to the wire: `{"code": "...", "message": "..."}` in an `error` frame on every
/// control protocol. A code this build does not know decodes as `.unknown`, its text kept at the
/// front of the message; the cause is never sent.
extension HoldfastError: Codable {
    private enum Keys: String, CodingKey { case code, message }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: Keys.self)
        let raw = try container.decode(String.self, forKey: .code)
        let message = try container.decode(String.self, forKey: .message)
        if let code = Code(rawValue: raw) {
            self.init(code, message)
        } else {
            self.init(.unknown, "\(raw): \(message)")
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: Keys.self)
        try container.encode(code.rawValue, forKey: .code)
        try container.encode(message, forKey: .message)
    }
}
