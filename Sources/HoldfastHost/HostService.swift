import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

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
    /// After a process's outcome is known, how long an output stream may go without a byte
    /// before host serve ends it: the guest's own default `streams.drain_timeout`.
    public static let drainTimeout: Duration = .seconds(30)
}

/// `holdfast host serve`: the host end for development, tests and demos. Accepts the guest's
/// bridge and stream connections (any number of reconnections), and serves `host run/ps/kill`
/// on a local control socket (`HostMessageType`). Each stream of a process started with
/// `host run` is handed to the `run` client as a plain local socket; the resumable protocol
/// stays in here.
///
/// Nothing waits for what cannot come: a process's `wait` is answered with its exit once the
/// guest reports it (its output streams then get the drain timeout of silence at most), and
/// with a loss when a hello shows another daemon (instance id) or guest (boot id), or the
/// daemon's process list no longer has it. A finished process is forgotten — its streams
/// closed, their connections too — keeping only its outcome among the last
/// `rememberedOutcomes`, so fds and memory do not grow with processes run.
public final class HostService: Sendable {
    public let bridge: BridgeServer
    public let streams: StreamServer<AsyncFD>
    private let control: Listener
    private let streamAddress: String
    private let say: @Sendable (String) -> Void
    private let listInterval: Duration
    private let table: HostProcessTable

    /// Outcomes kept for a `wait` or `attach` that comes after the process was forgotten.
    public static let rememberedOutcomes = HostProcessTable.rememberedOutcomes

    /// `bridgeKey`: the key the guest must prove it holds; nil accepts any guest (`bridge.authentication: none`).
    public init(
        bridge: SocketAddress, bridgeKey: BridgeKey?, streams: SocketAddress, control: String, listInterval: Duration = .seconds(1),
        say: @escaping @Sendable (String) -> Void
    ) throws {
        self.say = say
        self.listInterval = listInterval
        let table = HostProcessTable(say: say)
        self.table = table
        self.bridge = try BridgeServer(
            listeningOn: bridge, authentication: bridgeKey.map { .key($0) } ?? .none, unixMode: 0o666, warn: { say("warning: \($0)") }
        ) { [table] event in table.guestSaid(event) }
        self.streams = try StreamServer(listeningOn: streams, unixMode: 0o666)
        self.streamAddress = self.streams.address.description
        self.control = try Listener(binding: .unix(path: control), kind: .seqpacket, unixMode: 0o600)
    }

    /// Serves until the task is cancelled.
    public func run() async {
        bridge.start()
        streams.start()
        say("holdfast host: bridge \(bridge.address), streams \(streams.address), control \(control.address)")
        let poller = Task { await pollGuestList() }
        while !Task.isCancelled, let connection = try? await control.accept() {
            Task { await serveClient(FDChannel(connection)) }
        }
        poller.cancel()
    }

    public func close() {
        for process in table.close() { process.abandon() }
        control.close()
        bridge.close()
        streams.close()
    }

    /// Exits seen so far, each once: the outcomes of processes started here, and the exits of
    /// any others (the newest `rememberedOutcomes` of each).
    public var exitsSeen: [ExitReport] { table.exitsSeen }

    /// Processes started here whose outcome or output is still pending (a leak check).
    public var processesHeld: Int { table.counts.processes }

    public var stats: HostStats {
        let counts = table.counts
        let heap = Memory.mallocUsage()
        return HostStats(
            processes: counts.processes, streams: streams.statistics.streams, rememberedOutcomes: counts.outcomes,
            rememberedExits: bridge.rememberedExits, descriptors: Self.openDescriptors(), heapInUse: heap.inUse, heapFree: heap.free)
    }

    private static func openDescriptors() -> Int {
        guard let directory = opendir("/proc/self/fd") else { return -1 }
        defer { closedir(directory) }
        var count = 0
        while readdir(directory) != nil { count += 1 }
        return count - 3  // ".", ".." and the directory stream's own fd
    }

    /// While processes wait for an outcome, asks the guest for its process list now and then
    /// (`HostProcessTable.listed` says what a missing process means).
    private func pollGuestList() async {
        while !Task.isCancelled {
            try? await Task.sleep(for: listInterval)
            let (waiting, round) = table.beginListRound()
            guard waiting, bridge.isConnected,
                let (list, hello) = try? await bridge.callReportingHello(.list, reply: BridgeListResponse.self, timeout: .seconds(5)),
                (list.omittedProcesses ?? 0) == 0
            else { continue }
            table.listed(Set(list.processes.map(\.id)), by: GuestIdentity(hello), round: round)
        }
    }

    // MARK: The control socket

    /// One client of the control socket. Requests run concurrently; when the client goes, its
    /// waits are cancelled (a process attached to and left many times keeps no waiter per
    /// client).
    private func serveClient(_ channel: FDChannel) async {
        defer { channel.close() }
        _ = await RPCServer.serve(channel, as: HostRequest.self, inFlight: 64, cancelWhenClosed: true) { [self] request, _ async throws(HoldfastError) -> RPCReply in
            try await handle(request)
        }
    }

    private func handle(_ request: HostRequest) async throws(HoldfastError) -> RPCReply {
        switch request {
        case .run(let request):
            let (body, descriptors) = try await start(request)
            return RPCReply(body: body, descriptors: descriptors)
        case .wait(let request):
            return RPCReply(try await wait(request))
        case .list:
            return RPCReply(try await bridge.list())
        case .signal(let request):
            try await bridge.signal(request.id, request.signal)
            return .empty
        case .resize(let request):
            try await bridge.resize(request.id, rows: request.rows, columns: request.columns)
            return .empty
        case .attach(let request):
            let (body, descriptors) = try attach(request.id)
            return RPCReply(body: body, descriptors: descriptors)
        case .stats:
            return RPCReply(stats)
        case .migrate(let request):
            guard (0...600_000).contains(request.blackoutMilliseconds) else {
                throw HoldfastError(.badRequest, "blackout must be 0 to 600000 ms")
            }
            // Unstructured: a client that goes away mid-blackout does not cut it short.
            await Task { await migrate(blackout: .milliseconds(request.blackoutMilliseconds)) }.value
            return .empty
        }
    }

    private func wait(_ request: HostWaitRequest) async throws(HoldfastError) -> HostWaitResponse {
        if let milliseconds = request.drainTimeoutMilliseconds, !(0...86_400_000).contains(milliseconds) {
            throw HoldfastError(.badRequest, "the drain timeout must be 0 to 86400000 ms")
        }
        guard let (process, known) = table.lookup(request.id) else { throw Self.closing }
        guard let process else {
            if let known { return known }
            throw HoldfastError(.noSuchProcess, "no process '\(request.id)' started by this host serve")
        }
        if let milliseconds = request.drainTimeoutMilliseconds {
            process.state.withLockedValue { $0.drainTimeout = .milliseconds(milliseconds) }
        }
        guard let outcome = await process.waitForOutcome() else { throw Self.closing }
        return outcome
    }

    private static let closing = HoldfastError(.closing, "host serve is closing")

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

    // MARK: Starting and attaching

    /// Opens the process's streams here, creates it in the guest, and returns one local socket
    /// per stream for the client.
    private func start(_ request: HostRunRequest) async throws(HoldfastError) -> ([UInt8], [Int32]) {
        let id = request.id ?? request.container.map { "\($0).exec\(UInt16.random(in: 0..<UInt16.max))" } ?? "p\(UInt32.random(in: 0..<UInt32.max))"
        var kinds = request.tty ? ["stdin", "stdout"] : ["stdin", "stdout", "stderr"]
        var specs: [String: StreamSpec] = [:]
        if request.mode == .raw {
            // Raw streams go straight to the listeners named; nothing is relayed here.
            for (kind, address) in request.rawAddresses ?? [:] where kinds.contains(kind) {
                specs[kind] = StreamSpec(address: address, mode: .raw)
            }
            kinds = []
        }
        if table.isTaken(id) { throw HoldfastError(.processExists, "host serve already runs a process '\(id)'") }

        var input: InputRelay?
        var outputs: [OutputRelay] = []
        do throws(StreamServerError) {
            for kind in kinds {
                let token = Array("\(id)-\(kind)".utf8)
                if kind == "stdin" {
                    let relay = try InputRelay(token: token, server: streams)
                    input = relay
                    specs[kind] = relay.stream.streamSpec(at: streamAddress)
                } else {
                    let relay = try OutputRelay(kind: kind, token: token, server: streams)
                    outputs.append(relay)
                    specs[kind] = relay.stream.streamSpec(at: streamAddress)
                }
            }
        } catch {
            input?.close()
            for output in outputs { output.discard() }
            throw HoldfastError(.processExists, "host serve already has a stream of a process '\(id)': \(error)")
        }
        let process = HostedProcess(id: id, outputs: outputs, input: input, drainTimeout: HostDefaults.drainTimeout)
        let local: [Int32]
        do {
            local = try connectClient(to: kinds.compactMap { process.outlets[$0] })
        } catch {
            input?.close()
            for output in outputs { output.discard() }
            throw error
        }
        guard table.register(process) else {
            for fd in local { _ = Glibc.close(fd) }
            input?.close()
            for output in outputs { output.discard() }
            throw HoldfastError(.processExists, "host serve already runs a process '\(id)'")
        }
        if let input { Task { await input.run() } }
        for output in outputs {
            Task { [table] in
                await output.run(endEchoTimeout: { process.state.withLockedValue { $0.drainTimeout } }) {
                    table.outputFinished(process)
                }
            }
        }

        let spec = ProcessSpec(
            id: id, argv: request.argv, env: request.env, cwd: request.cwd, tty: request.tty, rows: request.rows,
            columns: request.columns, stdin: specs["stdin"], stdout: specs["stdout"], stderr: specs["stderr"],
            runtime: request.runtime, bundle: request.bundle, container: request.container)
        let created: BridgeServer.CreatedProcess
        do {
            created = try await bridge.createProcess(spec)
        } catch {
            for fd in local { _ = Glibc.close(fd) }
            table.unregister(process)
            process.abandon()
            throw error
        }
        // Which daemon runs it; if another one said hello meanwhile, it is already gone.
        table.created(process, by: GuestIdentity(created.hello))
        say("process \(id) started in the guest: pid \(created.pid), \(request.bundle.map { "runc container from \($0)" } ?? "\(request.argv)")")
        return (ControlJSON.encode(HostRunResponse(id: id, pid: created.pid, streams: kinds)), local)
    }

    /// `host attach`: new local sockets for a process's streams; the previous client's are
    /// closed. Output produced while no client was attached waited for this one. A process
    /// already finished gets no sockets; its `wait` answers at once.
    private func attach(_ id: String) throws(HoldfastError) -> ([UInt8], [Int32]) {
        guard let (process, known) = table.lookup(id) else { throw Self.closing }
        guard let process else {
            if known != nil { return (ControlJSON.encode(HostRunResponse(id: id, pid: 0, streams: [])), []) }
            throw HoldfastError(.noSuchProcess, "no process '\(id)' started by this host serve")
        }
        let outlets = process.outlets
        let kinds = ["stdin", "stdout", "stderr"].filter { outlets[$0].map { !$0.isClosed } ?? false }
        let local = try connectClient(to: kinds.compactMap { outlets[$0] })
        say("process \(id): client attached (\(kinds.joined(separator: ", ")))")
        return (ControlJSON.encode(HostRunResponse(id: id, pid: 0, streams: kinds)), local)
    }

    /// A socket pair per outlet: ours attached to the outlet, theirs returned for the client.
    private func connectClient(to outlets: [Outlet]) throws(HoldfastError) -> [Int32] {
        var local: [Int32] = []
        for outlet in outlets {
            do {
                let pair = try Self.streamPair()
                local.append(pair.theirs)
                do {
                    outlet.attach(try AsyncFD(adopting: pair.ours))
                } catch {
                    _ = Glibc.close(pair.ours)
                    throw error
                }
            } catch {
                for fd in local { _ = Glibc.close(fd) }
                throw HoldfastError(.localFailed, "\(error)")
            }
        }
        return local
    }

    static func streamPair() throws -> (ours: Int32, theirs: Int32) {
        var fds: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
            throw SystemError.last("socketpair")
        }
        return (fds[0], fds[1])
    }
}
