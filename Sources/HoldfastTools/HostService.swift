import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// Messages of `holdfast host serve`'s local control socket (SOCK_SEQPACKET, control frames):
/// what `holdfast host run/ps/kill` send it.
public enum HostMessageType: UInt32, Sendable {
    case run = 0x2001
    case wait = 0x2002
    case list = 0x2003
    case signal = 0x2004
    case resize = 0x2005
    case migrate = 0x2006
    case attach = 0x2007
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
}

/// The defaults `holdfast host` shares with config/holdfast-dev.yaml: everything under the run
/// directory (`$HOLDFAST_RUN_DIR`, else /tmp/holdfast).
public enum HostDefaults {
    public static var runDirectory: String {
        getenv("HOLDFAST_RUN_DIR").map { String(cString: $0) } ?? "/tmp/holdfast"
    }
    public static var bridge: String { "unix:\(runDirectory)/host-bridge.sock" }
    /// The bridge key `host serve` creates if missing; config/holdfast-dev.yaml's `bridge.key_file`.
    public static var keyFile: String { "\(runDirectory)/bridge.key" }
    public static var streams: String { "unix:\(runDirectory)/host-streams.sock" }
    public static var control: String { "\(runDirectory)/host.sock" }
}

/// `holdfast host serve`: the host end for development, tests and demos. Accepts the guest's
/// bridge and stream connections (any number of reconnections), and serves `host run/ps/kill`
/// on a local control socket. Each stream of a process started with `host run` is handed to the
/// `run` client as a plain local socket; the resumable protocol stays in here.
public final class HostService: Sendable {
    public let bridge: BridgeServer
    public let streams: StreamServer<AsyncFD>
    private let control: Listener
    private let streamAddress: String
    private let say: @Sendable (String) -> Void
    private let exits = NIOLockedValueBox<(reports: [String: ExitReport], waiters: [String: [CheckedContinuation<ExitReport, Never>]])>(
        ([:], [:]))
    /// Per process started with `host run`: where each of its streams meets the client attached
    /// now ("stdin", "stdout", "stderr").
    private let outlets = NIOLockedValueBox<[String: [String: Outlet]]>([:])

    /// `bridgeKey`: the key the guest must prove it holds; nil accepts any guest (`bridge.authentication: none`).
    public init(
        bridge: SocketAddress, bridgeKey: BridgeKey?, streams: SocketAddress, control: String, say: @escaping @Sendable (String) -> Void
    ) throws {
        self.say = say
        self.bridge = try BridgeServer(
            listeningOn: bridge, authentication: bridgeKey.map { .key($0) } ?? .none, unixMode: 0o666, warn: { say("warning: \($0)") })
        self.streams = try StreamServer(listeningOn: streams, unixMode: 0o666)
        self.streamAddress = self.streams.address.description
        self.control = try Listener(binding: .unix(path: control), kind: .seqpacket, unixMode: 0o600)
    }

    /// Serves until the task is cancelled.
    public func run() async {
        bridge.start()
        streams.start()
        say("holdfast host: bridge \(bridge.address), streams \(streams.address), control \(control.address)")
        let hellos = Task { [bridge, say] in
            for await hello in bridge.hellos {
                say("guest connected: boot \(hello.bootID.prefix(8)), \(hello.processes.count) processes, \(hello.exits.count) unacknowledged exits")
            }
        }
        let exitFeed = Task { [self] in
            for await report in bridge.exits { recordExit(report) }
        }
        while !Task.isCancelled, let connection = try? await control.accept() {
            Task { await serveClient(FDChannel(connection)) }
        }
        hellos.cancel()
        exitFeed.cancel()
    }

    public func close() {
        control.close()
        bridge.close()
        streams.close()
    }

    private func recordExit(_ report: ExitReport) {
        say("process \(report.id) exited: code \(report.exitCode)\(report.undelivered > 0 ? ", \(report.undelivered) bytes undelivered" : "")")
        let waiters = exits.withLockedValue { e -> [CheckedContinuation<ExitReport, Never>] in
            e.reports[report.id] = report
            return e.waiters.removeValue(forKey: report.id) ?? []
        }
        for waiter in waiters { waiter.resume(returning: report) }
    }

    /// Exits seen so far (each once).
    public var exitsSeen: [ExitReport] { exits.withLockedValue { Array($0.reports.values) } }

    private func waitForExit(_ id: String) async -> ExitReport {
        await withCheckedContinuation { continuation in
            let done = exits.withLockedValue { e -> ExitReport? in
                if let report = e.reports[id] { return report }
                e.waiters[id, default: []].append(continuation)
                return nil
            }
            if let done { continuation.resume(returning: done) }
        }
    }

    private func serveClient(_ channel: FDChannel) async {
        defer { channel.close() }
        while let message = try? await channel.receive(maxPayload: ControlFrame.headerSize + ControlFrame.defaultMaxBody) {
            message.closeDescriptors()
            guard let frame = try? ControlFrame.decode(datagram: message.payload) else { return }
            Task {
                do throws(ErrorBody) {
                    let (body, descriptors) = try await handle(frame)
                    try? await channel.send(ControlFrame(type: BridgeMessageType.ok.rawValue, id: frame.id, body: body).encoded, descriptors: descriptors)
                    for fd in descriptors { _ = Glibc.close(fd) }  // the client has them now
                } catch {
                    try? await channel.send(ControlFrame(type: BridgeMessageType.error.rawValue, id: frame.id, body: ControlJSON.encode(error)).encoded)
                }
            }
        }
    }

    private func handle(_ frame: ControlFrame) async throws(ErrorBody) -> ([UInt8], [Int32]) {
        func decode<T: Decodable>(_: T.Type) throws(ErrorBody) -> T {
            do {
                return try ControlJSON.decode(T.self, from: frame.body, frameType: frame.type)
            } catch {
                throw ErrorBody(code: "bad-request", message: error.description)
            }
        }
        switch HostMessageType(rawValue: frame.type) {
        case .run:
            return try await start(try decode(HostRunRequest.self))
        case .wait:
            return (ControlJSON.encode(await waitForExit(try decode(WaitRequest.self).id)), [])
        case .list:
            return (ControlJSON.encode(try await bridge.list()), [])
        case .signal:
            let request = try decode(SignalRequest.self)
            try await bridge.signal(request.id, request.signal)
            return (ControlJSON.encode([String: String]()), [])
        case .resize:
            let request = try decode(ProcessResizeRequest.self)
            try await bridge.resize(request.id, rows: request.rows, columns: request.columns)
            return (ControlJSON.encode([String: String]()), [])
        case .attach:
            return try attach(try decode(ProcessIDRequest.self).id)
        case .migrate:
            let request = try decode(MigrateRequest.self)
            guard (0...600_000).contains(request.blackoutMilliseconds) else {
                throw ErrorBody(code: "bad-request", message: "blackout must be 0 to 600000 ms")
            }
            await migrate(blackout: .milliseconds(request.blackoutMilliseconds))
            return (ControlJSON.encode([String: String]()), [])
        default:
            throw ErrorBody(code: "unknown-type", message: "unknown request type 0x\(String(frame.type, radix: 16))")
        }
    }

    /// What a live migration looks like to the guest: the bridge and every stream connection
    /// drop at once, and nothing is accepted for `blackout`.
    public func migrate(blackout: Duration) async {
        say("--- migration: every connection dropped, \(blackout) blackout ---")
        streams.setRefusing(true)
        bridge.drop(refusing: true)
        streams.dropAllConnections()
        try? await Task.sleep(for: blackout)
        streams.setRefusing(false)
        bridge.drop(refusing: false)
        say("--- migration done: accepting again ---")
    }

    /// Opens the process's streams here, creates it in the guest, and returns one local socket
    /// per stream for the client.
    private func start(_ request: HostRunRequest) async throws(ErrorBody) -> ([UInt8], [Int32]) {
        let id = request.id ?? request.container.map { "\($0).exec\(UInt16.random(in: 0..<UInt16.max))" } ?? "p\(UInt32.random(in: 0..<UInt32.max))"
        var kinds = request.tty ? ["stdin", "stdout"] : ["stdin", "stdout", "stderr"]
        var local: [Int32] = []
        var relays: [Task<Void, Never>] = []
        var specs: [String: StreamSpec] = [:]
        if request.mode == .raw {
            // Raw streams go straight to the listeners named; nothing is relayed here.
            for (kind, address) in request.rawAddresses ?? [:] where kinds.contains(kind) {
                specs[kind] = StreamSpec(address: address, mode: .raw)
            }
            kinds = []
        }
        do {
            var processOutlets: [String: Outlet] = [:]
            for kind in kinds {
                let pair = try Self.streamPair()
                local.append(pair.theirs)
                let token = "\(id)-\(kind)"
                let outlet = Outlet()
                outlet.attach(try AsyncFD(adopting: pair.ours))
                processOutlets[kind] = outlet
                if kind == "stdin" {
                    let stream = streams.open(token: Array(token.utf8), direction: .send)
                    relays.append(Task { await Self.pump(from: outlet, to: stream) })
                } else {
                    let stream = streams.open(token: Array(token.utf8), direction: .receive)
                    relays.append(Task { await Self.pump(from: stream, to: outlet) })
                }
                specs[kind] = StreamSpec(address: streamAddress, mode: request.mode, token: request.mode == .resumable ? token : nil)
            }
            if !processOutlets.isEmpty { outlets.withLockedValue { $0[id] = processOutlets } }
        } catch {
            for fd in local { _ = Glibc.close(fd) }
            for relay in relays { relay.cancel() }
            throw ErrorBody(code: "local-failed", message: "\(error)")
        }
        let spec = ProcessSpec(
            id: id, argv: request.argv, env: request.env, cwd: request.cwd, tty: request.tty, rows: request.rows,
            columns: request.columns, stdin: specs["stdin"], stdout: specs["stdout"], stderr: specs["stderr"],
            runtime: request.runtime, bundle: request.bundle, container: request.container)
        let pid: Int32
        do {
            pid = try await bridge.create(spec)
        } catch {
            for fd in local { _ = Glibc.close(fd) }
            for relay in relays { relay.cancel() }
            for kind in kinds { streams.close(token: Array("\(id)-\(kind)".utf8)) }
            throw error
        }
        say("process \(id) started in the guest: pid \(pid), \(request.bundle.map { "runc container from \($0)" } ?? "\(request.argv)")")
        return (ControlJSON.encode(HostRunResponse(id: id, pid: pid, streams: kinds)), local)
    }

    /// `host attach`: new local sockets for a process's streams; the previous client's are
    /// closed. Output produced while no client was attached waited for this one.
    private func attach(_ id: String) throws(ErrorBody) -> ([UInt8], [Int32]) {
        guard let processOutlets = outlets.withLockedValue({ $0[id] }) else {
            throw ErrorBody(code: "no-such-process", message: "no process '\(id)' started by this host serve")
        }
        var kinds: [String] = []
        var local: [Int32] = []
        for kind in ["stdin", "stdout", "stderr"] {
            guard let outlet = processOutlets[kind], !outlet.isClosed else { continue }
            do {
                let pair = try Self.streamPair()
                outlet.attach(try AsyncFD(adopting: pair.ours))
                local.append(pair.theirs)
                kinds.append(kind)
            } catch {
                for fd in local { _ = Glibc.close(fd) }
                throw ErrorBody(code: "local-failed", message: "\(error)")
            }
        }
        say("process \(id): client attached (\(kinds.joined(separator: ", ")))")
        return (ControlJSON.encode(HostRunResponse(id: id, pid: 0, streams: kinds)), local)
    }

    static func streamPair() throws -> (ours: Int32, theirs: Int32) {
        var fds: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
            throw SystemError.last("socketpair")
        }
        return (fds[0], fds[1])
    }

    /// Guest output → the attached client. A client that goes away does not lose the output:
    /// the chunk waits for the next `attach`. The end of the stream closes the client's socket.
    static func pump(from stream: some InboundStream, to outlet: Outlet) async {
        defer { outlet.close() }
        for await chunk in stream.chunks() {
            while true {
                guard let socket = await outlet.current() else { return }
                do {
                    try await chunk.withUnsafeBytesAsync { try await socket.writeAll($0) }
                    break
                } catch {
                    outlet.detach(socket)
                }
            }
        }
    }

    /// The attached client's input → guest stdin. Its end-of-file is the explicit end of stdin.
    static func pump(from outlet: Outlet, to stream: some OutboundStream) async {
        defer { outlet.close() }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 * 1024, alignment: 8)
        defer { buffer.deallocate() }
        while let socket = await outlet.current() {
            let count: Int
            do {
                count = try await socket.read(into: buffer)
            } catch {
                outlet.detach(socket)  // replaced by a newer client: read from that one
                continue
            }
            if count == 0 { break }
            do {
                try await stream.send(UnsafeRawBufferPointer(rebasing: buffer[..<count]))
            } catch {
                return
            }
        }
        _ = await stream.finish()
    }
}

/// Where one stream of a `host run` process meets the client attached now. With no client, the
/// stream's relay waits here (a suspended task).
final class Outlet: Sendable {
    private let state = NIOLockedValueBox<(socket: AsyncFD?, waiters: [CheckedContinuation<AsyncFD?, Never>], closed: Bool)>((nil, [], false))

    var isClosed: Bool { state.withLockedValue { $0.closed } }

    /// The attached client's socket, waiting for one; nil once closed.
    func current() async -> AsyncFD? {
        await withCheckedContinuation { continuation in
            let ready = state.withLockedValue { s -> AsyncFD?? in
                if s.closed { return .some(nil) }
                if let socket = s.socket { return .some(socket) }
                s.waiters.append(continuation)
                return .none
            }
            if let ready { continuation.resume(returning: ready) }
        }
    }

    /// A new client: the previous one's socket is closed.
    func attach(_ socket: AsyncFD) {
        let (previous, waiters, rejected) = state.withLockedValue { s -> (AsyncFD?, [CheckedContinuation<AsyncFD?, Never>], Bool) in
            if s.closed { return (nil, [], true) }
            let previous = s.socket
            s.socket = socket
            defer { s.waiters.removeAll() }
            return (previous, s.waiters, false)
        }
        if rejected { socket.close() }
        previous?.close()
        for waiter in waiters { waiter.resume(returning: socket) }
    }

    /// The client on `socket` is gone.
    func detach(_ socket: AsyncFD) {
        let gone = state.withLockedValue { s -> Bool in
            guard s.socket === socket else { return false }
            s.socket = nil
            return true
        }
        if gone { socket.close() }
    }

    func close() {
        let (socket, waiters) = state.withLockedValue { s -> (AsyncFD?, [CheckedContinuation<AsyncFD?, Never>]) in
            s.closed = true
            defer {
                s.socket = nil
                s.waiters.removeAll()
            }
            return (s.socket, s.waiters)
        }
        socket?.close()
        for waiter in waiters { waiter.resume(returning: nil) }
    }
}

extension Array where Element == UInt8 {
    func withUnsafeBytesAsync(_ body: (UnsafeRawBufferPointer) async throws -> Void) async throws {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Swift.max(count, 1), alignment: 1)
        defer { buffer.deallocate() }
        buffer.copyBytes(from: self)
        try await body(UnsafeRawBufferPointer(rebasing: buffer[..<count]))
    }
}

extension AsyncFD {
    func writeAll(_ bytes: UnsafeRawBufferPointer) async throws {
        try await write(bytes)
    }
}
