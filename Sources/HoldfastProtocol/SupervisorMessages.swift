/// Messages of the supervisor's local control socket (`holdfast status`, tools, tests) and of
/// the bridge worker's channel to the supervisor. Control frames (see ControlFrame), one per
/// SOCK_SEQPACKET message.
public enum SupervisorMessageType: UInt32, Sendable, CaseIterable {
    // Bridge worker → supervisor (notifications).
    case bridgeUp = 0x0301
    case bridgeDown = 0x0302
    // Bridge worker → supervisor (request): what the next bridge hello must carry.
    case bridgeHello = 0x0303
    // Supervisor → bridge worker (notification), at a daemon stop before the worker is stopped:
    // write every reply owed to the host; answered with `bridgeFinished` (notification) once done.
    case bridgeFinish = 0x0304
    case bridgeFinished = 0x0305
    // Local control socket requests.
    case status = 0x0401
    case launch = 0x0402
    case signal = 0x0403
    case wait = 0x0404
    case upgrade = 0x0405
    // Responses.
    case ok = 0x0001
    case error = 0x0002
}

/// One stdio stream of a process to launch: where the guest dials, and how.
public struct StreamSpec: Codable, Sendable, Equatable {
    public var address: String
    public var mode: StreamModeName
    public var token: String?
    /// Resumable mode: the stream's secret, chosen by the host (`StreamSecret.random()`): every
    /// hello for the stream must prove it (docs/PROTOCOL.md, "Authentication").
    public var secret: StreamSecret?

    public init(address: String, mode: StreamModeName = .resumable, token: String? = nil, secret: StreamSecret? = nil) {
        self.address = address
        self.mode = mode
        self.token = token
        self.secret = secret
    }
}

/// What starts a process.
public enum RuntimeName: String, Codable, Sendable, CaseIterable {
    /// fork + exec of `argv`, as a plain child of the supervisor.
    case direct
    /// An OCI container run by runc: `bundle` for a new container, or `container` (the id of a
    /// running runc container) with `argv` for a process exec'd into it.
    case runc
}

/// A process to start: what the bridge's create request and the local `launch` request carry.
public struct ProcessSpec: Codable, Sendable, Equatable {
    public var id: String
    /// The program and its arguments. Empty for a runc container (its bundle names the program).
    public var argv: [String]
    /// `direct` when absent.
    public var runtime: RuntimeName?
    /// runc: the OCI bundle directory (config.json and the rootfs) of a new container.
    public var bundle: String?
    /// runc: exec `argv` into this running container (the id its create request gave it).
    public var container: String?
    /// The environment, "NAME=value" each; a minimal PATH when absent.
    public var env: [String]?
    public var cwd: String?
    /// A user name or a numeric uid; the daemon's user when absent.
    public var user: String?
    public var group: UInt32?
    public var tty: Bool
    public var rows: UInt16?
    public var columns: UInt16?
    /// A stream absent here is connected to /dev/null (a tty: no input stream).
    public var stdin: StreamSpec?
    public var stdout: StreamSpec?
    public var stderr: StreamSpec?
    /// Names this one create, so that sending it again (the reply was lost with the bridge)
    /// starts nothing new: the guest answers with the first one's pid (docs/PROTOCOL.md,
    /// "Repeating a create"). 1 to 256 bytes; the host side library sets a random one.
    public var idempotencyKey: String?

    public static let maxIdempotencyKeyLength = 256

    /// Refuses an idempotency key (a create's or a signal's) that is empty or too long.
    public static func checkIdempotencyKey(_ key: String?) throws(HoldfastError) {
        if let key, key.isEmpty || key.utf8.count > maxIdempotencyKeyLength {
            throw HoldfastError(.badRequest, "idempotencyKey must be 1 to \(maxIdempotencyKeyLength) bytes")
        }
    }

    public init(
        id: String, argv: [String], env: [String]? = nil, cwd: String? = nil, user: String? = nil, group: UInt32? = nil,
        tty: Bool = false, rows: UInt16? = nil, columns: UInt16? = nil, stdin: StreamSpec? = nil, stdout: StreamSpec? = nil,
        stderr: StreamSpec? = nil, runtime: RuntimeName? = nil, bundle: String? = nil, container: String? = nil,
        idempotencyKey: String? = nil
    ) {
        self.id = id
        self.idempotencyKey = idempotencyKey
        self.argv = argv
        self.runtime = runtime
        self.bundle = bundle
        self.container = container
        self.env = env
        self.cwd = cwd
        self.user = user
        self.group = group
        self.tty = tty
        self.rows = rows
        self.columns = columns
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
    }
}

public struct LaunchResponse: Codable, Sendable, Equatable {
    public var pid: Int32
    /// True when this create repeated an earlier one with the same idempotency key: nothing new
    /// was started, `pid` is the first one's.
    public var repeated: Bool?
    public init(pid: Int32, repeated: Bool? = nil) {
        self.pid = pid
        self.repeated = repeated
    }
}

public struct SignalRequest: Codable, Sendable, Equatable {
    public var id: String
    public var signal: Int32
    /// Names this signal so that sending it again (its reply was lost with the bridge) does not
    /// deliver it twice: the guest answers a repeat without signalling again. 1 to
    /// `ProcessSpec.maxIdempotencyKeyLength` bytes; `BridgeServer.signal` sets a random one.
    public var idempotencyKey: String?
    public init(id: String, signal: Int32, idempotencyKey: String? = nil) {
        self.id = id
        self.signal = signal
        self.idempotencyKey = idempotencyKey
    }
}

public struct WaitRequest: Codable, Sendable, Equatable {
    public var id: String
    public init(id: String) { self.id = id }
}

/// How a process ended, reported after its output was delivered (or given up on).
public struct ExitReport: Codable, Sendable, Equatable {
    public var id: String
    /// The exit code, or 128 + the signal number.
    public var exitCode: Int32
    public var signal: Int32?
    public var undelivered: UInt64
    /// True when the process's output could not drain before its exit was reported: the daemon
    /// was stopping (its shutdown timeout left no more time) or the broker holding the streams
    /// died. `undelivered` is then a lower bound, not a count. Absent (nil) otherwise.
    public var outputCutShort: Bool?
    /// Bytes of the process's streams a broker crash took (the offsets are in the daemon's log
    /// and the host's): at most the few the crashed broker held in memory. Absent when none.
    public var lost: UInt64?
    /// Bytes of its stdin a broker crash may have written to the process twice (the crash came
    /// inside a write to its pipe: whether that write happened cannot be known, so it is done
    /// again; the offsets are in the daemon's log). Absent when none.
    public var inputRepeated: UInt64?
    /// How many processes the kernel's OOM killer killed in the process's memory cgroup while
    /// it ran: a runc container's (for its init, the container's life; for an exec, from its start
    /// to its exit, so a kill of another process in the container counts too). With `signal` 9 it
    /// says the process itself was most likely the one (`wasLikelyOOMKilled`). Absent when none,
    /// and where the kernel keeps no count the daemon can read: a direct process (no memory
    /// cgroup of its own), a container without memory accounting.
    public var oomKills: UInt64?
    /// For a process killed by SIGKILL, any runtime's: whether the kernel's OOM killer was the
    /// one, as its own log says ("Killed process PID"). Absent for any other exit, where the
    /// daemon cannot read the kernel's log (`/dev/kmsg`), and where the answer cannot be known
    /// (records of it may have gone unread; a process an older binary started).
    public var oomKilled: Bool?

    /// Killed by the OOM killer: what other tools call "OOMKilled". `oomKilled` where it is
    /// known; otherwise a SIGKILL while the OOM killer killed in its container (another
    /// process's SIGKILL in the same moment cannot be told apart then).
    public var wasLikelyOOMKilled: Bool { oomKilled ?? (signal == 9 /* SIGKILL */ && (oomKills ?? 0) > 0) }

    public init(
        id: String, exitCode: Int32, signal: Int32?, undelivered: UInt64, outputCutShort: Bool? = nil, lost: UInt64? = nil, inputRepeated: UInt64? = nil,
        oomKills: UInt64? = nil, oomKilled: Bool? = nil
    ) {
        self.oomKills = oomKills
        self.oomKilled = oomKilled
        self.inputRepeated = inputRepeated
        self.id = id
        self.exitCode = exitCode
        self.signal = signal
        self.undelivered = undelivered
        self.outputCutShort = outputCutShort
        self.lost = lost
    }
}

public struct RoleStatus: Codable, Sendable, Equatable {
    public var name: String
    public var pid: Int32?
    public var uptimeSeconds: Double
    public var restarts: Int
    public var lastExit: String?
    /// Set when the role did not answer the supervisor within the status's bound (the broker's
    /// stream list), or is stopped (the bridge worker, which is not asked): what its process is
    /// doing, as the kernel says.
    public var notAnswering: String?

    public init(name: String, pid: Int32?, uptimeSeconds: Double, restarts: Int, lastExit: String?) {
        self.name = name
        self.pid = pid
        self.uptimeSeconds = uptimeSeconds
        self.restarts = restarts
        self.lastExit = lastExit
    }
}

/// Where a process is in its life, as the supervisor sees it.
public enum ProcessState: String, Codable, Sendable, CaseIterable {
    /// A create in progress: the id is taken, nothing runs yet (pid 0).
    case starting
    case running
    /// Exited; its output is still draining to the host.
    case exited
    /// Exited and drained: its exit is final (and, for a bridge process, reported).
    case done
}

/// Whether the bridge worker has the host.
public enum BridgeState: String, Codable, Sendable {
    case up, down
}

public struct ProcessStatus: Codable, Sendable, Equatable {
    public var id: String
    public var pid: Int32
    public var state: ProcessState
    public var exitCode: Int32?
    /// `status` only, for a direct process in a cgroup of its own: the CPU time of everything
    /// in it (the process and all it started, also what ended), in seconds, and how many
    /// processes are in it now.
    public var cpuSeconds: Double?
    public var tasks: Int?
    /// `status` only, for a runc container's process whose memory cgroup counts OOM kills: how
    /// many processes the OOM killer killed in its container since it started.
    public var oomKills: UInt64?
    /// Once its exit is final (`done`), what its exit report says was lost, until the exit is
    /// taken: bytes of its output never delivered (`undelivered`), bytes broker crashes took
    /// (`lost`), and whether the count was cut short. Absent when none. Before, a process whose
    /// output was given up on showed `done` and its exit code, as if its output were whole.
    public var undelivered: UInt64?
    public var lost: UInt64?
    public var outputCutShort: Bool?

    public init(id: String, pid: Int32, state: ProcessState, exitCode: Int32?) {
        self.id = id
        self.pid = pid
        self.state = state
        self.exitCode = exitCode
    }
}

public struct StatusReport: Codable, Sendable, Equatable {
    public var version: String
    public var pid: Int32
    public var uptimeSeconds: Double
    public var bridge: BridgeState
    public var roles: [RoleStatus]
    public var processes: [ProcessStatus]
    public var streams: [StreamStatus]
    /// Every stream counted by state (connected, parked...), the ones left out included.
    public var streamStates: [String: Int]?
    /// How many did not fit the reply (absent when none was left out).
    public var omittedProcesses: Int?
    public var omittedStreams: Int?
    /// The sha256 (hex) of the executable this daemon runs (absent if it could not be read).
    public var executableSHA256: String?
    /// Live upgrades (`holdfast upgrade`) since the daemon started: the pid, the containers and
    /// `uptimeSeconds` span them.
    public var upgrades: Int?
    /// Live upgrades whose new binary started but could not take over, so that this binary
    /// took over again (every process and stream kept), and what the last one said (absent:
    /// none since the start).
    public var upgradesFellBack: Int?
    public var lastUpgradeFailure: String?
    /// The supervisor's own malloc, in KiB: handed out and not returned (a leak grows it), and
    /// free inside its heap and arenas (RSS that is not in use). The soak tracks both.
    public var mallocInUseKiB: Int?
    public var mallocFreeKiB: Int?
    /// Keys the configuration file changed that a live upgrade cannot apply (the fds they name
    /// are passed across it): they take effect at the next start (absent: none).
    public var settingsAwaitingRestart: [PendingSetting]?

    /// A configured value not in effect until the next start.
    public struct PendingSetting: Codable, Sendable, Equatable {
        public var key: String
        public var running: String
        public var configured: String

        public init(key: String, running: String, configured: String) {
            self.key = key
            self.running = running
            self.configured = configured
        }
    }

    public init(
        version: String, pid: Int32, uptimeSeconds: Double, bridge: BridgeState, roles: [RoleStatus], processes: [ProcessStatus],
        streams: [StreamStatus]
    ) {
        self.version = version
        self.pid = pid
        self.uptimeSeconds = uptimeSeconds
        self.bridge = bridge
        self.roles = roles
        self.processes = processes
        self.streams = streams
    }
}
