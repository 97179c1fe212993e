/// Messages of `holdfast host serve`'s local control socket (SOCK_SEQPACKET, control frames, the
/// same framing as the daemon's control socket): what `holdfast host run/attach/ps/kill/migrate`
/// send it. Replies are `ok` (0x0001, the reply's JSON) or `error` (0x0002, an `HoldfastError`).
///
/// | type | request | reply |
/// |---|---|---|
/// | run | `HostRunRequest` | `HostRunResponse`, with one local socket per stream by SCM_RIGHTS |
/// | attach | `ProcessIDRequest` | `HostRunResponse` and new sockets (the previous client's close) |
/// | wait | `HostWaitRequest` | `HostWaitResponse`: once the process's outcome is known and its output handed over |
/// | list | `{}` | the guest's `BridgeListResponse` |
/// | signal | `SignalRequest` | `{}` |
/// | resize | `ProcessResizeRequest` | `{}` |
/// | migrate | `MigrateRequest` | `{}` after the blackout |
/// | stats | `{}` | `HostStats`: what host serve holds (leak checks) |
public enum HostMessageType: UInt32, Sendable {
    case run = 0x2001
    case wait = 0x2002
    case list = 0x2003
    case signal = 0x2004
    case resize = 0x2005
    case migrate = 0x2006
    case attach = 0x2007
    case stats = 0x2008
}

/// `stats`: what host serve holds now. Each figure returns to its idle value once the processes
/// started through it are done (the bounded memories of past outcomes and exits aside).
public struct HostStats: Codable, Sendable, Equatable {
    /// Processes whose outcome or output is still pending.
    public var processes: Int
    /// Resumable streams open (three per process: stdin, stdout, stderr).
    public var streams: Int
    /// Outcomes kept for a late `wait`/`attach` (at most `HostService.rememberedOutcomes`).
    public var rememberedOutcomes: Int
    /// Exit ids the bridge keeps against repeats (at most its cap).
    public var rememberedExits: Int
    /// Open fds, from /proc/self/fd.
    public var descriptors: Int
    /// Bytes malloc has handed out and not had back: grows with a leak, not with fragmentation.
    public var heapInUse: Int
    /// Bytes free inside malloc's heap and arenas (resident, not in use).
    public var heapFree: Int

    public init(processes: Int, streams: Int, rememberedOutcomes: Int, rememberedExits: Int, descriptors: Int, heapInUse: Int, heapFree: Int) {
        self.processes = processes
        self.streams = streams
        self.rememberedOutcomes = rememberedOutcomes
        self.rememberedExits = rememberedExits
        self.descriptors = descriptors
        self.heapInUse = heapInUse
        self.heapFree = heapFree
    }
}

/// `host migrate`: how long nothing is accepted after every connection is dropped.
public struct MigrateRequest: Codable, Sendable, Equatable {
    public var blackoutMilliseconds: Int
    public init(blackoutMilliseconds: Int) { self.blackoutMilliseconds = blackoutMilliseconds }
}

/// `host run`: what to start. The reply carries one local socket per stream (stdin, stdout,
/// stderr, in that order, those that exist) by SCM_RIGHTS.
public struct HostRunRequest: Codable, Sendable, Equatable {
    public var id: String?
    public var argv: [String]
    public var tty: Bool
    public var mode: StreamModeName
    public var rows: UInt16?
    public var columns: UInt16?
    public var env: [String]?
    public var cwd: String?
    /// Raw mode: where the guest dials for each stream ("stdin", "stdout", "stderr"), so any
    /// listener (socat) can be the host end; a stream not named is /dev/null.
    public var rawAddresses: [String: String]?
    /// `runc`: a container from `bundle` (argv empty), or `argv` exec'd into `container`.
    public var runtime: RuntimeName?
    public var bundle: String?
    public var container: String?

    public init(id: String? = nil, argv: [String], tty: Bool = false, mode: StreamModeName = .resumable,
                rows: UInt16? = nil, columns: UInt16? = nil, env: [String]? = nil, cwd: String? = nil,
                rawAddresses: [String: String]? = nil, runtime: RuntimeName? = nil, bundle: String? = nil,
                container: String? = nil) {
        self.runtime = runtime
        self.bundle = bundle
        self.container = container
        self.id = id
        self.argv = argv
        self.tty = tty
        self.mode = mode
        self.rows = rows
        self.columns = columns
        self.env = env
        self.cwd = cwd
        self.rawAddresses = rawAddresses
    }
}

public struct HostRunResponse: Codable, Sendable, Equatable {
    public var id: String
    public var pid: Int32
    /// Which local sockets came with the reply, in order: "stdin", "stdout", "stderr".
    public var streams: [String]

    public init(id: String, pid: Int32, streams: [String]) {
        self.id = id
        self.pid = pid
        self.streams = streams
    }
}

/// `wait`: answered once the process's outcome is known — its exit, reported by the guest, or
/// its loss — and every output stream has been handed to the client: ended by the guest, or ended
/// by host serve after going `drainTimeoutMilliseconds` without a byte once the outcome was
/// known. host serve closes the client's output sockets before it answers, so the client reads
/// end-of-file on each right after the reply. (The `id`-only `WaitRequest` decodes as this.)
public struct HostWaitRequest: Codable, Sendable, Equatable {
    public var id: String
    /// The latest client's value applies; absent: `HostDefaults.drainTimeout`.
    public var drainTimeoutMilliseconds: Int?

    public init(id: String, drainTimeoutMilliseconds: Int? = nil) {
        self.id = id
        self.drainTimeoutMilliseconds = drainTimeoutMilliseconds
    }
}

/// How a process started through host serve ended, as far as the host can know.
public struct HostWaitResponse: Codable, Sendable, Equatable {
    /// The guest's exit report; absent when the process was lost.
    public var exit: ExitReport?
    /// Why the host will never learn the exit; absent when `exit` is there.
    public var lost: LostProcess?
    /// Output streams host serve ended itself (no END from the guest within the drain timeout
    /// after the outcome was known: an orphan holding the pipe, a broker that died with them).
    public var endedByHost: [String]?

    public init(exit: ExitReport? = nil, lost: LostProcess? = nil, endedByHost: [String]? = nil) {
        self.exit = exit
        self.lost = lost
        self.endedByHost = endedByHost
    }

    public var outcome: HostRunOutcome {
        if let exit { return .exited(exit, endedByHost: endedByHost ?? []) }
        return .lost(lost ?? LostProcess(reason: .vanished, message: "host serve gave no outcome"), endedByHost: endedByHost ?? [])
    }
}

/// A process whose exit the host will never learn.
public struct LostProcess: Codable, Sendable, Equatable {
    public enum Reason: String, Codable, Sendable {
        /// A hello from a daemon with another instance id: the daemon that ran it stopped or
        /// crashed, and with it every process it had and every exit not yet acknowledged.
        case daemonRestarted = "daemon-restarted"
        /// A hello with another boot id: the guest rebooted.
        case guestRebooted = "guest-rebooted"
        /// The same daemon's process list no longer has it, and no exit came.
        case vanished
    }

    public var reason: Reason
    /// One line, for a person.
    public var message: String

    public init(reason: Reason, message: String) {
        self.reason = reason
        self.message = message
    }
}

/// What `host run`, `host exec` and `host attach` end with.
public enum HostRunOutcome: Sendable, Equatable {
    case exited(ExitReport, endedByHost: [String])
    case lost(LostProcess, endedByHost: [String])

    /// The client's exit status: the process's own (its code, or 128 + the signal that killed
    /// it); `HostExitCode.holdfastFailure` when it was lost.
    public var exitCode: Int32 {
        switch self {
        case .exited(let report, _): return report.exitCode
        case .lost: return HostExitCode.holdfastFailure
        }
    }
}

public enum HostExitCode {
    /// `holdfast host run/exec/attach` could not give the process's own status: host serve or
    /// the guest refused or failed, or the process was lost (a one-line reason on stderr says
    /// which). podman's convention: 125 is the tool's own error, where a process's code is
    /// 0-124 by habit (126/127 are the shell's "cannot run"/"not found", 128+N a signal).
    public static let holdfastFailure: Int32 = 125
}
