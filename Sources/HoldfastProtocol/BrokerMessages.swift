/// The broker's control protocol (docs/PROTOCOL.md, "Broker control"): requests from the
/// supervisor on the internal socketpair and from container runtimes on the public handoff
/// socket, one SOCK_SEQPACKET message each, fds attached with SCM_RIGHTS.
public enum BrokerMessageType: UInt32, Sendable, CaseIterable {
    // Requests.
    case adopt = 0x0101
    case release = 0x0102
    case list = 0x0103
    case disconnectAll = 0x0104
    case bridgeUp = 0x0105
    case stats = 0x0106
    case processExited = 0x0107
    case closeStdin = 0x0108
    case resize = 0x0109
    case metrics = 0x010A
    /// Supervisor only, for a live upgrade: stop taking bytes from pipes at a moment when no
    /// stream is inside a take, and exit 0 (a successor resumes every stream exactly).
    case quiesce = 0x010B
    /// Supervisor only: every process the broker before this one held (and every release it
    /// was inside) has been handed to this one, so the handoff socket is served from now on. A
    /// runtime's request before that would not find its process (`no-such-process` for a
    /// process about to be handed back, an adopt that would then collide with it).
    case openHandoff = 0x010C
    /// Supervisor only: its answer to a `handoff-deposited` — whether it keeps the copies of the
    /// process's fds (the broker's answer to the runtime's `adopt` says what this says).
    case handoffKept = 0x010D
    // Responses (same id as the request).
    case ok = 0x0001
    case error = 0x0002
    // Notifications from the broker (id 0).
    case drained = 0x0201
    /// A process's stdin pipe was closed by the broker (the host ended it, or the process
    /// stopped reading): the supervisor closes its copy too, so the process sees end-of-file.
    case inputEnded = 0x0202
    /// A handoff peer's process was adopted: copies of its fds (attached) and its streams, with
    /// the checkpoint slots the broker gave them, for the supervisor to keep — so a broker
    /// started after a crash of this one is handed the process again, as the supervisor's own.
    case handoffDeposited = 0x0203
    /// A handoff peer's process is gone from the broker (released, drained or refused): the
    /// supervisor closes its copies.
    case handoffEnded = 0x0204
    /// A stdin the host ended finished seeing its END echo home (or gave up, bounded by the
    /// drain timeout): the supervisor, which keeps such a stdin past its process's exit report
    /// so that a broker crash in between does not lose the echo, lets it go.
    case inputSettled = 0x0205
    /// A handoff peer's process is being released: its streams are stopped and its fds are about
    /// to go back to the peer. Sent (and written) before the answer: a broker that dies between
    /// the two leaves the supervisor's copies neither relayed by the next broker (the peer may
    /// hold the fds already) nor closed (it may not), but kept for the peer's `release` to take
    /// (`AdoptRequest.releasing`). `handoff-ended` follows once the answer was written.
    case handoffReleasing = 0x0206
    /// A handoff peer said its process exited (`process-exited`): written before the answer, so
    /// that a broker dying during the drain leaves the supervisor knowing it, and the next broker
    /// is told `process-exited` for it too — it drains and lets the process go, where it would
    /// otherwise relay the process for good (the peer, answered, never says it again).
    case handoffExited = 0x0207
    /// An output reported `still-open` at its process's exit (an orphan of the process held it
    /// and wrote on) ended: the supervisor, which kept its checkpoint slots out of reuse while
    /// the broker relayed it into them, frees them.
    case outputSettled = 0x0208
}

/// What a stream carries.
public enum StreamKind: String, Codable, Sendable, CaseIterable {
    case stdin, stdout, stderr
    /// A pty master, relayed both ways: `address` receives the terminal's output, `inputAddress`
    /// (if any) sends the terminal its input.
    case tty

    /// Output streams go guest → host.
    public var isOutput: Bool { self != .stdin }
}

public enum StreamModeName: String, Codable, Sendable, CaseIterable {
    case raw, resumable
}

/// A window pipe's two ends, as indexes into the message's attached fds.
public struct WindowPipe: Codable, Sendable, Equatable {
    public var read: Int
    public var write: Int

    public init(read: Int, write: Int) {
        self.read = read
        self.write = write
    }
}

/// One stream of a process being handed to the broker.
public struct StreamDescription: Codable, Sendable, Equatable {
    public var kind: StreamKind
    /// Index into the message's attached fds.
    public var fd: Int
    /// Where the guest dials for this stream (for a tty: its output).
    public var address: String
    public var mode: StreamModeName
    /// The resumable stream's token (required in resumable mode).
    public var token: String?
    /// The resumable stream's secret (required in resumable mode): hellos prove it.
    public var secret: StreamSecret?
    /// A tty's input stream.
    public var inputAddress: String?
    public var inputToken: String?
    public var inputSecret: StreamSecret?
    /// Resumable streams handed over by the supervisor: the slot of the shared checkpoint area
    /// (the broker's `--checkpoints-fd`) where the stream keeps its progress, so a broker
    /// started after this one crashed can resume it (docs/PROTOCOL.md, "Broker control").
    public var checkpoint: Int?
    /// The slot of a tty's input stream.
    public var inputCheckpoint: Int?
    /// A checkpointed stream's window: a pipe the supervisor holds between the process's fd and
    /// the broker (an output's bytes pass through it on their way to the ring, an input's on
    /// their way to the process), so a crash inside a read or a write is measured from its
    /// level, never guessed. Requires `checkpoint`.
    public var window: WindowPipe?
    /// A tty input's window (its stage). Requires `inputCheckpoint`.
    public var inputWindow: WindowPipe?
    /// True: this process's streams were held by a broker that crashed; they resume where
    /// their checkpoints say (and tell the host of any bytes the crash took). Supervisor only.
    public var resume: Bool?
    /// True: a stdin the host ended (every byte written, the pipe closed), handed over with
    /// /dev/null in place of its pipe, only to acknowledge and echo the END the crashed broker
    /// may not have. It counts as ended from the start. Supervisor only.
    public var ended: Bool?

    public init(
        kind: StreamKind, fd: Int, address: String, mode: StreamModeName, token: String? = nil, secret: StreamSecret? = nil,
        inputAddress: String? = nil, inputToken: String? = nil, inputSecret: StreamSecret? = nil, checkpoint: Int? = nil,
        inputCheckpoint: Int? = nil, resume: Bool? = nil
    ) {
        self.checkpoint = checkpoint
        self.inputCheckpoint = inputCheckpoint
        self.resume = resume
        self.kind = kind
        self.fd = fd
        self.address = address
        self.mode = mode
        self.token = token
        self.secret = secret
        self.inputAddress = inputAddress
        self.inputToken = inputToken
        self.inputSecret = inputSecret
    }
}

public struct AdoptRequest: Codable, Sendable, Equatable {
    /// The process the streams belong to (the host's id, unique among live processes).
    public var process: String
    public var streams: [StreamDescription]
    /// The uid of the handoff peer that first handed the process over, when the supervisor
    /// hands it to a broker started after a crash: that peer still manages it. Supervisor only.
    public var handoffOwner: UInt32?
    /// True: the process is done and its exit was reported; all that is left of it is its
    /// ended stdin (`ended`), whose END echo a crashed broker may not have delivered. The broker
    /// relays it and reports `input-settled`; no `process-exited` follows. Supervisor only.
    public var endingInput: Bool?
    /// True: a handoff peer's process whose `release` a broker crash interrupted. The broker
    /// relays nothing of it and keeps its fds for that peer's next `release` (they answer it),
    /// closing them if none comes within `handoff.release_kept_for`. Supervisor only.
    public var releasing: Bool?
    /// True: the process is done and its exit was reported, but an orphan of it still holds
    /// these outputs (each resumable, with its checkpoint) and writes on: the broker before
    /// relayed them past the exit and died. The broker resumes them, relays them until they end
    /// and reports each `output-settled`; the id is not taken (the host may have a new process
    /// of that name). Supervisor only.
    public var orphanedOutput: Bool?

    public init(
        process: String, streams: [StreamDescription], handoffOwner: UInt32? = nil, endingInput: Bool? = nil, releasing: Bool? = nil,
        orphanedOutput: Bool? = nil
    ) {
        self.process = process
        self.streams = streams
        self.handoffOwner = handoffOwner
        self.endingInput = endingInput
        self.releasing = releasing
        self.orphanedOutput = orphanedOutput
    }
}

/// What a broker deposits with the supervisor for a process a handoff peer handed over
/// (`handoffDeposited`): the request as adopted, checkpoint slots named, and the peer's uid.
public struct HandoffDeposit: Codable, Sendable, Equatable {
    public var request: AdoptRequest
    public var owner: UInt32
    /// Names this deposit: the supervisor's `handoff-kept` echoes it, so that a late answer to
    /// an earlier deposit of the same process id is not taken for this one's. Absent from an
    /// older broker.
    public var deposit: UInt64?

    public init(request: AdoptRequest, owner: UInt32, deposit: UInt64? = nil) {
        self.request = request
        self.owner = owner
        self.deposit = deposit
    }
}

/// The supervisor's answer to a deposit (`handoff-kept`): whether it keeps the copies, and if
/// not, why (its log says so too).
public struct HandoffKept: Codable, Sendable, Equatable {
    public var process: String
    public var kept: Bool
    public var reason: String?
    /// The deposit this answers (`HandoffDeposit.deposit`, echoed).
    public var deposit: UInt64?

    public init(process: String, kept: Bool, reason: String? = nil, deposit: UInt64? = nil) {
        self.process = process
        self.kept = kept
        self.reason = reason
        self.deposit = deposit
    }
}

public struct ProcessRequest: Codable, Sendable, Equatable {
    public var process: String
    public init(process: String) { self.process = process }
}

/// The broker closed a process's stdin (notification `input-ended`). `endedByHost`: the host
/// ended it (an END received, every byte before it written), rather than the process stopping
/// reading: a broker started after a crash then still owes the host its acknowledgements and
/// the END echo. Absent from brokers before it (decoded as not ended by the host).
public struct InputEndedNotification: Codable, Sendable, Equatable {
    public var process: String
    public var endedByHost: Bool?
    public init(process: String, endedByHost: Bool) {
        self.process = process
        self.endedByHost = endedByHost
    }
}

/// A stream a process's exit report no longer waits for is done with its checkpoint slot:
/// `input-settled`, a stdin the host ended is done with its END echo (the echo reached the host,
/// or the stream gave up after the drain timeout); `output-settled`, an output held open past
/// the exit ended. `checkpoint` is its slot, which tells the stream from a later process's of
/// the same id.
public struct SlotSettledNotification: Codable, Sendable, Equatable {
    public var process: String
    public var checkpoint: Int
    public init(process: String, checkpoint: Int) {
        self.process = process
        self.checkpoint = checkpoint
    }
}

public typealias InputSettledNotification = SlotSettledNotification
public typealias OutputSettledNotification = SlotSettledNotification

public struct ResizeRequest: Codable, Sendable, Equatable {
    public var process: String
    public var rows: UInt16
    public var columns: UInt16
    public init(process: String, rows: UInt16, columns: UInt16) {
        self.process = process
        self.rows = rows
        self.columns = columns
    }
}

public struct ProcessExitedRequest: Codable, Sendable, Equatable {
    public var process: String
    /// How long a stream may make no progress before it gives up (milliseconds); the broker's
    /// configured drain timeout when absent.
    public var drainTimeoutMilliseconds: Int?
    /// The longest drain timeout a request may ask for (milliseconds): a day.
    public static let longestDrainTimeout = 86_400_000
    public init(process: String, drainTimeoutMilliseconds: Int? = nil) {
        self.process = process
        self.drainTimeoutMilliseconds = drainTimeoutMilliseconds
    }
}

/// A stream as the broker reports it.
/// Where a stream's connection is.
public enum StreamState: String, Codable, Sendable, CaseIterable {
    case connected
    /// No connection: the host is away (a migration) or being redialled.
    case parked
    /// Ended: everything delivered, or released.
    case closed
    /// Given up on after the drain timeout; what was not delivered is counted.
    case abandoned
    /// Released, but the answer with its fd may not have reached the runtime (the broker died
    /// inside the release, or the runtime left): not relayed, the fd kept for the runtime's next
    /// `release` (`handoff.release_kept_for`).
    case kept
}

public struct StreamStatus: Codable, Sendable, Equatable {
    public var process: String
    public var kind: StreamKind
    /// "input" for a tty's input stream, else absent.
    public var direction: String?
    public var mode: StreamModeName
    public var address: String
    public var state: StreamState
    public var bytesToHost: UInt64
    public var bytesFromHost: UInt64
    public var reconnects: UInt64
    public var undelivered: UInt64
    /// While parked: why its last dial failed (a refused or unreachable listener, a socket the
    /// broker's user may not open, a hello the host refused). Absent once it connects.
    public var lastDialError: String?
    /// Dials that failed since its last connection (absent when none).
    public var failedDials: UInt64?
    /// Bytes a broker crash took from this stream, reported to the host as a gap (absent when
    /// none).
    public var lostBytes: UInt64?
    /// False for a stream of a process a runtime handed over that the supervisor holds no copy
    /// of (its `adopt` was answered `survivesBrokerCrash: false`): a broker crash ends its relay.
    /// Absent otherwise.
    public var survivesBrokerCrash: Bool?
    /// True for an output its process's exit left open (an orphan of it, `sh -c 'cmd &'`,
    /// writes on): relayed until the orphan lets go; its process's exit was reported long ago
    /// (with the bytes then in flight). Absent otherwise.
    public var heldOpenPastExit: Bool?

    public init(
        process: String, kind: StreamKind, direction: String? = nil, mode: StreamModeName, address: String, state: StreamState,
        bytesToHost: UInt64, bytesFromHost: UInt64, reconnects: UInt64, undelivered: UInt64, lastDialError: String? = nil,
        failedDials: UInt64? = nil, lostBytes: UInt64? = nil, survivesBrokerCrash: Bool? = nil
    ) {
        self.survivesBrokerCrash = survivesBrokerCrash
        self.lostBytes = lostBytes
        self.lastDialError = lastDialError
        self.failedDials = failedDials
        self.process = process
        self.kind = kind
        self.direction = direction
        self.mode = mode
        self.address = address
        self.state = state
        self.bytesToHost = bytesToHost
        self.bytesFromHost = bytesFromHost
        self.reconnects = reconnects
        self.undelivered = undelivered
    }
}

extension StreamDescription {
    /// As a release gives it back to its runtime: what the supervisor alone may name (its
    /// checkpoint slots, the windows, a resume or an ended input) left out, so that the runtime
    /// can adopt it again as it is (naming them is refused `permission-denied`).
    public var asReleased: StreamDescription {
        var released = self
        released.window = nil
        released.inputWindow = nil
        released.checkpoint = nil
        released.inputCheckpoint = nil
        released.resume = nil
        released.ended = nil
        return released
    }
}

extension StreamStatus {
    /// How much an operator needs to see it, lowest first: a stream that lost bytes or was given
    /// up on, then one that cannot connect or would not survive a broker crash, then the rest.
    /// A report cut to one frame keeps the lowest, so that with thousands of streams the few in
    /// trouble are the ones shown, not the first by id.
    public var attentionRank: Int {
        if state == .abandoned || (lostBytes ?? 0) > 0 { return 0 }
        if (state == .parked && lastDialError != nil) || survivesBrokerCrash == false || state == .kept { return 1 }
        return 2
    }
}

extension Array where Element == StreamStatus {
    /// The streams with those needing attention first, each rank in its former order.
    public func troubledFirst() -> [StreamStatus] {
        enumerated().sorted { ($0.element.attentionRank, $0.offset) < ($1.element.attentionRank, $1.offset) }.map(\.element)
    }
}

/// `list`: a page of streams, `offset` into the broker's list (sorted by process), at most
/// `limit` (and never more than fits one frame).
public struct ListRequest: Codable, Sendable, Equatable {
    public var offset: Int?
    public var limit: Int?
    public init(offset: Int? = nil, limit: Int? = nil) {
        self.offset = offset
        self.limit = limit
    }
}

public struct ListResponse: Codable, Sendable, Equatable {
    public var streams: [StreamStatus]
    /// How many streams the broker has in all (more pages follow when offset + count < total).
    public var total: Int?
    public init(streams: [StreamStatus], total: Int? = nil) {
        self.streams = streams
        self.total = total
    }
}

/// `metrics`: the broker's metrics in the Prometheus text format.
public struct MetricsResponse: Codable, Sendable, Equatable {
    public var text: String
    public init(text: String) { self.text = text }
}

public struct CountResponse: Codable, Sendable, Equatable {
    public var count: Int
    public init(count: Int) { self.count = count }
}

public struct BrokerStats: Codable, Sendable, Equatable {
    public var processes: Int
    public var streams: Int
    public var connected: Int
    public var parked: Int
    public var bytesToHost: UInt64
    public var bytesFromHost: UInt64
    public var reconnects: UInt64
    public var undelivered: UInt64
    public var openDescriptors: Int
    public var residentKiB: Int
    /// What the broker's malloc has handed out and not had back: a leak grows this.
    public var mallocInUseKiB: Int?
    /// Free memory malloc holds inside its heap and arenas (fragmentation: resident, unused).
    public var mallocFreeKiB: Int?
    /// Process and stream objects alive in the broker (diagnostics: when it holds no process,
    /// anything above zero is a leak).
    public var liveProcessObjects: Int?
    public var liveStreamObjects: Int?
    /// Bytes broker crashes took from this broker's streams (its predecessors' crashes: it found
    /// and reported the gaps when it resumed them). Absent when none.
    public var lostBytes: UInt64?
    /// Times the broker's I/O thread was found stuck inside one syscall (a guest process holding
    /// a pipe's lock in the kernel) and a new thread took over; absent when none.
    public var reactorStalls: Int?
    /// Threads left stuck in such a syscall now; absent when none.
    public var strandedReactorThreads: Int?
    /// Handoff connections the broker serves now, and those it refused or closed at once since
    /// it started (`handoff.max_connections`, the allow-lists); absent from an older broker.
    public var handoffConnections: Int?
    public var handoffTurnedAway: UInt64?
    /// Handoff peers' processes whose fds wait for the peer's next `release` (a release the
    /// broker died inside, or whose answer the peer was gone for); absent when none.
    public var keptReleases: Int?
    /// Reads, writes and splices of streams the kernel refused for want of memory (ENOMEM,
    /// ENOBUFS, EFAULT) and the broker tried again after a pause, since it started; absent
    /// when none.
    public var ioShortages: UInt64?

    public init(
        processes: Int, streams: Int, connected: Int, parked: Int, bytesToHost: UInt64, bytesFromHost: UInt64,
        reconnects: UInt64, undelivered: UInt64, openDescriptors: Int, residentKiB: Int, mallocInUseKiB: Int? = nil,
        mallocFreeKiB: Int? = nil, liveProcessObjects: Int? = nil, liveStreamObjects: Int? = nil, lostBytes: UInt64? = nil,
        reactorStalls: Int? = nil, strandedReactorThreads: Int? = nil
    ) {
        self.reactorStalls = reactorStalls
        self.strandedReactorThreads = strandedReactorThreads
        self.lostBytes = lostBytes
        self.liveProcessObjects = liveProcessObjects
        self.liveStreamObjects = liveStreamObjects
        self.mallocInUseKiB = mallocInUseKiB
        self.mallocFreeKiB = mallocFreeKiB
        self.processes = processes
        self.streams = streams
        self.connected = connected
        self.parked = parked
        self.bytesToHost = bytesToHost
        self.bytesFromHost = bytesFromHost
        self.reconnects = reconnects
        self.undelivered = undelivered
        self.openDescriptors = openDescriptors
        self.residentKiB = residentKiB
    }
}

/// Sent by the broker when every stream of an exited process finished: output delivered (or
/// abandoned after the drain timeout), so the process's exit can be reported after its output.
public struct DrainedNotification: Codable, Sendable, Equatable {
    public struct StreamResult: Codable, Sendable, Equatable {
        /// `ending` of an output the exit could not wait for (held open by another process, or
        /// still flowing): its `undelivered` is what was still on its way, not a final count.
        public static let stillOpen = "still-open"

        public var kind: StreamKind
        public var bytes: UInt64
        public var undelivered: UInt64
        public var ending: String
        /// Bytes a broker crash took (told to the host as a gap; absent when none). Not in
        /// `undelivered`: the exit report carries them as `lost`.
        public var lost: UInt64?
        /// Input streams: bytes a broker crash inside a write to the process's pipe may have
        /// delivered twice (absent when none).
        public var repeated: UInt64?
        /// Raw mode's loss: bytes connections had taken when they died, which may or may not
        /// have reached the host (absent when none). Not in `undelivered` (the broker's totals
        /// count them apart); the exit report's `undelivered` adds them.
        public var unconfirmed: UInt64?
        public init(
            kind: StreamKind, bytes: UInt64, undelivered: UInt64, ending: String, lost: UInt64? = nil, repeated: UInt64? = nil,
            unconfirmed: UInt64? = nil
        ) {
            self.unconfirmed = unconfirmed
            self.repeated = repeated
            self.kind = kind
            self.bytes = bytes
            self.undelivered = undelivered
            self.ending = ending
            self.lost = lost
        }
    }

    public var process: String
    public var streams: [StreamResult]
    public init(process: String, streams: [StreamResult]) {
        self.process = process
        self.streams = streams
    }
}

/// What a handoff peer's `adopt` is answered (the supervisor's gets `{}`).
public struct AdoptResponse: Codable, Sendable, Equatable {
    /// Whether the broker deposited copies of the process's fds with the supervisor and gave
    /// its resumable streams checkpoint slots, so a broker crash costs it nothing. False when it
    /// could not (no slot of its range free, no fd for the copies, no checkpoint area, the
    /// supervisor refused the copies or did not answer within 5 s; `reason` and its log say
    /// which): the process is relayed all the same, but gone with the broker if it dies.
    public var survivesBrokerCrash: Bool
    /// Why not, when `survivesBrokerCrash` is false (the broker's log says the same).
    public var reason: String?
    public init(survivesBrokerCrash: Bool, reason: String? = nil) {
        self.survivesBrokerCrash = survivesBrokerCrash
        self.reason = reason
    }
}

/// A release hands the fds back, in the order of `streams`.
public struct ReleaseResponse: Codable, Sendable, Equatable {
    public var streams: [StreamDescription]
    public init(streams: [StreamDescription]) { self.streams = streams }
}
