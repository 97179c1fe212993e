/// The bridge: the one control connection between the host and the guest (docs/PROTOCOL.md,
/// "Bridge"). The guest dials; after every connect it says hello first. Control frames (a
/// 16-byte header, then JSON) on a stream socket; requests go host → guest with a non-zero id
/// and are answered with `ok` or `error` and the same id; notifications carry id 0.
public enum BridgeMessageType: UInt32, Sendable, CaseIterable {
    // Guest → host.
    case hello = 0x1001
    case exit = 0x1201
    // Host → guest requests.
    case create = 0x1101
    case signal = 0x1102
    case resize = 0x1103
    case closeStdin = 0x1104
    case list = 0x1105
    case stats = 0x1106
    case acknowledgeExit = 0x1107
    // Responses (guest → host), with the request's id.
    case ok = 0x0001
    case error = 0x0002

    /// The requests a host may send.
    public static let requests: Set<BridgeMessageType> = [.create, .signal, .resize, .closeStdin, .list, .stats, .acknowledgeExit]
}

public enum BridgeProtocol {
    public static let version = 1
    /// The largest frame body either side accepts; a bigger one closes that connection.
    public static let maxBody = 64 * 1024
    /// Requests of one connection the guest works on at once, replies not yet written included.
    /// A host that pipelines more waits, in its own `write(2)`, for earlier replies to go out:
    /// the guest's memory stays bounded (about this many requests and replies of at most
    /// `maxBody` each), whatever the host sends and however slowly it reads.
    public static let requestsInFlight = 32
}

/// The guest's first frame on every connection: who it is and what the host may have missed.
public struct BridgeHello: Codable, Sendable, Equatable {
    public var version: Int
    /// The kernel's boot id: a new one means the VM rebooted (every earlier process is gone);
    /// the same one after a migration means everything is still there.
    public var bootID: String
    /// Processes the guest is running or whose output is still draining.
    public var processes: [ProcessStatus]
    /// Exits the host has not acknowledged yet, oldest first.
    public var exits: [ExitReport]
    /// The daemon's: new each time it starts. The same boot id with a new instance id means the
    /// daemon restarted (every process it had, and every exit not yet acknowledged, is gone);
    /// the same instance id means only the connection was lost (a migration, a host restart).
    public var instanceID: String?
    /// The daemon's release (`holdfast --version`). After a live upgrade the instance id is the
    /// same and this is the new binary's: the host tells an upgrade (same instance, processes
    /// still there) from a restart (new instance, everything gone).
    public var daemonVersion: String?
    /// Live upgrades this instance went through (absent: none, or an older daemon).
    public var upgrades: Int?
    /// The daemon sends a signal that carries an idempotency key once, however often it is
    /// repeated (docs/PROTOCOL.md, "Repeating a signal"). Absent: an older daemon, which would
    /// send a repeat again — the host does not repeat a signal to it.
    public var keyedSignals: Bool?

    public init(
        version: Int = BridgeProtocol.version, bootID: String, processes: [ProcessStatus], exits: [ExitReport], instanceID: String? = nil,
        daemonVersion: String? = nil, upgrades: Int? = nil, keyedSignals: Bool? = nil
    ) {
        self.keyedSignals = keyedSignals
        self.instanceID = instanceID
        self.daemonVersion = daemonVersion
        self.upgrades = upgrades
        self.version = version
        self.bootID = bootID
        self.processes = processes
        self.exits = exits
    }
}

/// `list`: processes and their streams. A reply holds what fits one frame; the counts of what
/// did not fit are in `omittedProcesses` / `omittedStreams` (absent when nothing was left out).
public struct BridgeListResponse: Codable, Sendable, Equatable {
    public var processes: [ProcessStatus]
    public var streams: [StreamStatus]
    public var omittedProcesses: Int?
    public var omittedStreams: Int?
    /// Set when the broker did not give its list within the guest's bound (stopped, traced,
    /// dying or restarting): `streams` is then empty for that reason, not because none exist.
    public var streamsUnavailable: String?
    public init(
        processes: [ProcessStatus], streams: [StreamStatus], omittedProcesses: Int? = nil, omittedStreams: Int? = nil,
        streamsUnavailable: String? = nil
    ) {
        self.processes = processes
        self.streams = streams
        self.omittedProcesses = omittedProcesses
        self.omittedStreams = omittedStreams
        self.streamsUnavailable = streamsUnavailable
    }
}

/// `list`'s body, every field optional: `{}` (or none) asks for everything, as before.
public struct BridgeListRequest: Codable, Sendable, Equatable {
    /// false: the processes alone, the broker not asked for its streams — what a host that polls
    /// for processes gone from the guest needs, every second (the streams cost the guest a
    /// listing of every stream each time, and crowded the processes out of the reply).
    public var streams: Bool?
    /// Only the processes whose id sorts after this one (by UTF-8 bytes): the next page of a list
    /// whose `omittedProcesses` was not 0 (its last process's id).
    public var processesAfter: String?
    /// The streams alone, from this index of the broker's list (sorted by process, as many as
    /// fit): the next page after one whose `omittedStreams` was not 0 (its offset plus the
    /// streams it carried). The processes are left out (`processes` empty). Without it the
    /// streams in trouble come first and the rest are only counted.
    public var streamsOffset: Int?

    public init(streams: Bool? = nil, processesAfter: String? = nil, streamsOffset: Int? = nil) {
        self.streams = streams
        self.processesAfter = processesAfter
        self.streamsOffset = streamsOffset
    }
}

/// `acknowledge-exit`: the host has the exit of `id`; the guest forgets it.
public struct AcknowledgeExitRequest: Codable, Sendable, Equatable {
    public var id: String
    public init(id: String) { self.id = id }
}

/// `resize` and `close-stdin` name the process by the id the host gave it.
public struct ProcessResizeRequest: Codable, Sendable, Equatable {
    public var id: String
    public var rows: UInt16
    public var columns: UInt16
    public init(id: String, rows: UInt16, columns: UInt16) {
        self.id = id
        self.rows = rows
        self.columns = columns
    }
}

public struct ProcessIDRequest: Codable, Sendable, Equatable {
    public var id: String
    public init(id: String) { self.id = id }
}

/// Random identifiers (idempotency keys, the daemon's instance id): 128 bits, hex.
public enum RandomIdentifier {
    public static func make() -> String {
        var generator = SystemRandomNumberGenerator()
        return (0..<2).map { _ in
            let word = String(generator.next() as UInt64, radix: 16)
            return String(repeating: "0", count: 16 - word.count) + word
        }.joined()
    }
}
