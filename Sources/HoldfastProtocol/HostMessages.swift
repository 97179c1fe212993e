/// Messages of `holdfast host serve`'s local control socket (SOCK_SEQPACKET, control frames, the
/// same framing as the daemon's control socket): what `holdfast host run/attach/ps/kill/migrate`
/// send it. Replies are `ok` (0x0001, the reply's JSON) or `error` (0x0002, an `HoldfastError`).
///
/// | type | request | reply |
/// |---|---|---|
/// | run | `HostRunRequest` | `HostRunResponse`, with one local socket per stream by SCM_RIGHTS (none when detached) |
/// | attach | `ProcessIDRequest` | `HostRunResponse` and new sockets (the previous client's close) |
/// | wait | `HostWaitRequest` | `HostWaitResponse`: once the process's outcome is known and its output handed over (or, `untilExit`, once the outcome is known) |
/// | closeStdin | `ProcessIDRequest` | `{}`: the attached client's stdin ended, after the last byte it wrote on its stdin socket |
/// | list | `{}` | the guest's `BridgeListResponse` |
/// | processes | `HostProcessesRequest` | `HostProcessList`: the guest's processes with what host serve knows of them (`ps`, `ps -a`) |
/// | signal | `SignalRequest` | `{}` |
/// | stop | `HostStopRequest` | `HostStopResponse`: a signal, then SIGKILL after the timeout, answered with the outcome |
/// | logs | `HostLogsRequest` | `HostRunResponse` and one socket per output stream, carrying what host serve kept of it |
/// | detach | `ProcessIDRequest` | `{}`: the client detached (its keys, Ctrl-C): the process's output goes on into its log while no client is attached, as a `--detach` start's does |
/// | resize | `ProcessResizeRequest` | `{}` |
/// | migrate | `MigrateRequest` | `HostMigrateResponse` after the blackout |
/// | stats | `{}` | `HostStats`: what host serve holds (leak checks), whether a guest is connected |
public enum HostMessageType: UInt32, Sendable {
    case run = 0x2001
    case wait = 0x2002
    case list = 0x2003
    case signal = 0x2004
    case resize = 0x2005
    case migrate = 0x2006
    case attach = 0x2007
    case stats = 0x2008
    case closeStdin = 0x2009
    case processes = 0x200A
    case stop = 0x200B
    case logs = 0x200C
    case detach = 0x200D
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
    /// Whether a guest is connected to the bridge now, and where host serve listens for it.
    public var guestConnected: Bool?
    public var bridgeAddress: String?

    public init(
        processes: Int, streams: Int, rememberedOutcomes: Int, rememberedExits: Int, descriptors: Int, heapInUse: Int, heapFree: Int,
        guestConnected: Bool? = nil, bridgeAddress: String? = nil
    ) {
        self.guestConnected = guestConnected
        self.bridgeAddress = bridgeAddress
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

/// `host migrate`'s answer: what was dropped, and when the guest was back.
public struct HostMigrateResponse: Codable, Sendable, Equatable {
    /// Whether a guest was connected to the bridge when the migration began.
    public var bridgeDropped: Bool
    /// Stream connections dropped (stdin, stdout and stderr of every process count apart).
    public var streamConnectionsDropped: Int
    public var blackoutMilliseconds: Int
    /// How long after the blackout the guest's bridge was back; absent if it was not back
    /// within `HostMigrateResponse.reconnectWait` (or no guest was connected before).
    public var guestBackAfterMilliseconds: Int?

    public static let reconnectWait: Duration = .seconds(10)

    public init(bridgeDropped: Bool, streamConnectionsDropped: Int, blackoutMilliseconds: Int, guestBackAfterMilliseconds: Int?) {
        self.bridgeDropped = bridgeDropped
        self.streamConnectionsDropped = streamConnectionsDropped
        self.blackoutMilliseconds = blackoutMilliseconds
        self.guestBackAfterMilliseconds = guestBackAfterMilliseconds
    }
}

/// `host ps`: the guest's processes; `all` adds the finished ones host serve remembers.
public struct HostProcessesRequest: Codable, Sendable, Equatable {
    public var all: Bool?
    public init(all: Bool? = nil) { self.all = all }
}

/// One line of `host ps`.
public struct HostProcessInfo: Codable, Sendable, Equatable {
    public enum State: String, Codable, Sendable {
        /// The create is on its way.
        case starting
        case running
        /// Exited (the guest may still be draining its output).
        case exited
        /// Its exit will never be known (`LostProcess`).
        case lost
    }

    public var id: String
    /// The guest's pid; absent when host serve only remembers the process.
    public var pid: Int32?
    public var state: State
    /// The exit code, or 128 + the signal that killed it.
    public var exitCode: Int32?
    /// The command as started through host serve (absent for a process it did not start).
    public var command: String?
    /// Killed by the guest kernel's OOM killer (`ExitReport.wasLikelyOOMKilled`); absent otherwise.
    public var oomKilled: Bool?

    public init(id: String, pid: Int32?, state: State, exitCode: Int32?, command: String?, oomKilled: Bool? = nil) {
        self.oomKilled = oomKilled
        self.id = id
        self.pid = pid
        self.state = state
        self.exitCode = exitCode
        self.command = command
    }
}

public struct HostProcessList: Codable, Sendable, Equatable {
    public var processes: [HostProcessInfo]
    /// False when the guest could not be asked: the list is host serve's own knowledge.
    public var guestAnswered: Bool

    public init(processes: [HostProcessInfo], guestAnswered: Bool) {
        self.processes = processes
        self.guestAnswered = guestAnswered
    }
}

/// `host stop`: `signal` (default SIGTERM), then SIGKILL if the process has not exited
/// `timeoutMilliseconds` later (default 10 s).
public struct HostStopRequest: Codable, Sendable, Equatable {
    public var id: String
    public var signal: Int32?
    public var timeoutMilliseconds: Int?

    public init(id: String, signal: Int32? = nil, timeoutMilliseconds: Int? = nil) {
        self.id = id
        self.signal = signal
        self.timeoutMilliseconds = timeoutMilliseconds
    }
}

public struct HostStopResponse: Codable, Sendable, Equatable {
    /// How it ended.
    public var outcome: HostWaitResponse
    /// True when SIGKILL was needed (the first signal did not end it in time).
    public var killed: Bool
    /// True when it had already ended before the stop.
    public var alreadyEnded: Bool?

    public init(outcome: HostWaitResponse, killed: Bool, alreadyEnded: Bool? = nil) {
        self.outcome = outcome
        self.killed = killed
        self.alreadyEnded = alreadyEnded
    }
}

/// `host logs`: what host serve kept of a process's output; `follow` goes on until the output
/// ends. The reply's sockets (one per output stream) carry it, then end-of-file.
public struct HostLogsRequest: Codable, Sendable, Equatable {
    public var id: String
    public var follow: Bool?

    public init(id: String, follow: Bool? = nil) {
        self.id = id
        self.follow = follow
    }
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
    /// A user name or uid (direct), or `uid[:gid]` (runc exec); `group`: a gid (direct).
    public var user: String?
    public var group: UInt32?
    /// Start it without a client: the reply has no sockets, and its output is not held for one
    /// (it goes to the process's log; `attach` follows it from then on).
    public var detach: Bool?
    /// With `detach`: keep stdin, for a later `attach` (without it a detached process's stdin
    /// is empty). A process in the foreground always has its stdin.
    public var interactive: Bool?
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
                container: String? = nil, user: String? = nil, group: UInt32? = nil, detach: Bool? = nil,
                interactive: Bool? = nil) {
        self.user = user
        self.group = group
        self.detach = detach
        self.interactive = interactive
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
    /// The process has a terminal (an `attach` client makes its own terminal raw).
    public var tty: Bool?

    public init(id: String, pid: Int32, streams: [String], tty: Bool? = nil) {
        self.id = id
        self.pid = pid
        self.streams = streams
        self.tty = tty
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
    /// Answer once the outcome is known, whether or not the output has been handed over (`host
    /// wait`, `host stop`).
    public var untilExit: Bool?

    public init(id: String, drainTimeoutMilliseconds: Int? = nil, untilExit: Bool? = nil) {
        self.id = id
        self.drainTimeoutMilliseconds = drainTimeoutMilliseconds
        self.untilExit = untilExit
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
    /// The client let go (the detach keys, Ctrl-C, or a signal it passed on): the process runs
    /// on (unless that signal ends it), its stdin open and its output going into its log for
    /// `host attach ID` or `host logs ID`.
    case detached(id: String, by: DetachCause)

    public enum DetachCause: Sendable, Equatable {
        case detachKeys
        case interrupt
        /// The client was sent this signal (SIGTERM, SIGHUP: `timeout`, a cancelled job, a
        /// closed terminal) and passed it on to the process before it let go, as podman's
        /// `--sig-proxy` does.
        case passedOn(signal: Int32)
        /// Another client attached to the process (`host attach` elsewhere) and took its
        /// streams: this one let go, passing nothing on.
        case anotherClient
        /// The client's output was closed by its reader (`host attach ID | head -1`): it let go,
        /// the process runs on.
        case readerGone
    }

    /// The client's exit status: the process's own (its code, or 128 + the signal that killed
    /// it); `HostExitCode.holdfastFailure` when it was lost; 0 when the client detached.
    public var exitCode: Int32 {
        switch self {
        case .exited(let report, _): return report.exitCode
        case .lost: return HostExitCode.holdfastFailure
        case .detached: return 0
        }
    }
}

public enum HostExitCode {
    /// `holdfast host run/exec/attach` could not give the process's own status: host serve or
    /// the guest refused or failed, or the process was lost (a one-line reason on stderr says
    /// which). podman's convention: 125 is the tool's own error, where a process's code is
    /// 0-124 by habit (126/127 are the shell's "cannot run"/"not found", 128+N a signal).
    public static let holdfastFailure: Int32 = 125
    /// The program exists but cannot be executed (the shell's and podman's 126).
    public static let cannotExecute: Int32 = 126
    /// The program was not found (the shell's and podman's 127).
    public static let commandNotFound: Int32 = 127

    /// The exit status for a Holdfast error: 126 or 127 when the program could not be started,
    /// 125 for anything else.
    public static func status(for error: HoldfastError) -> Int32 {
        switch error.code {
        case .commandNotFound: return commandNotFound
        case .cannotExecute: return cannotExecute
        default: return holdfastFailure
        }
    }
}
