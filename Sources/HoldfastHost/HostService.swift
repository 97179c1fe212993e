import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import NIOConcurrencyHelpers
import Synchronization

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
    /// Where host serve keeps its processes' records, output and outcomes across its own
    /// restart (`HostStateDirectory`).
    public static var stateDirectory: String { "\(runDirectory)/host-state" }
    /// After a process's outcome is known, how long an output stream may go without a byte
    /// before host serve ends it: the guest's own default `streams.drain_timeout`.
    public static let drainTimeout: Duration = .seconds(30)
    /// What host serve keeps of each process's output for `host logs` (bytes).
    public static let logSize = 1 << 20
    /// How many finished processes' logs host serve keeps.
    public static let logsKept = 64
    /// `host stop`: how long the first signal gets before SIGKILL.
    public static let stopTimeout: Duration = .seconds(10)
    /// How long a create waits for a guest to be connected to the bridge.
    public static let guestWait: Duration = .seconds(30)
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
/// `rememberedOutcomes` and its log (`logSize` bytes at most) among the last `logsKept`, so fds
/// and memory do not grow with processes run.
public final class HostService: Sendable {
    public let bridge: BridgeServer
    public let streams: StreamServer<AsyncFD>
    private let control: Listener
    private let streamAddress: String
    private let say: @Sendable (String) -> Void

    /// Says which offsets of a stream a crash of the guest's broker took (GAP frames): never
    /// silent. The exit report counts them too.
    static func reportLoss(of stream: ResumableStream<AsyncFD>, id: String, kind: String, say: @Sendable (String) -> Void) {
        let lost = stream.statistics.lost
        guard lost.bytes > 0 else { return }
        // A stdin's loss is the host's: bytes a host serve that died had taken from a client and
        // not delivered (a restart on its state directory counts them). An output's is the
        // guest's broker's.
        let cause = kind == "stdin" ? "taken by a host serve that died and never delivered" : "lost with the guest's broker"
        say("process \(id) \(kind): \(lost.bytes) bytes \(cause) (offsets \(lost.summary))")
    }
    private let listInterval: Duration
    private let table: HostProcessTable
    private let logSize: Int
    private let stateDirectory: HostStateDirectory?
    /// Processes restored whose create had not been answered when the earlier host serve died:
    /// sent again with the same idempotency key once the bridge is up (`createAgain`).
    private let restoredUnanswered: [(HostedProcess, HostProcessRecord)]

    /// Outcomes kept for a `wait` or `attach` that comes after the process was forgotten.
    public static let rememberedOutcomes = HostProcessTable.rememberedOutcomes

    /// `bridgeKey`: the key the guest must prove it holds; nil accepts any guest (`bridge.authentication: none`).
    /// `logSize`: bytes of each process's output kept for `host logs`; `logsKept`: how many
    /// finished processes' logs are kept. `guestStreams`: the address the guest dials to reach
    /// `streams`, when it is not `streams` itself — a VMM that hands the guest's vsock
    /// connections to a Unix socket (Firecracker's and Cloud Hypervisor's hybrid vsock: listen
    /// on `unix:UDS_PATH_PORT`, the guest dials `vsock://2:PORT`). `stateDirectory`: where its
    /// processes are kept across its own restart (`HostStateDirectory`); a host serve started
    /// again on the same directory takes them up where they were, nothing lost. Nil keeps
    /// everything in memory only.
    public init(
        bridge: SocketAddress, bridgeKey: BridgeKey?, streams: SocketAddress, guestStreams: SocketAddress? = nil, control: String,
        listInterval: Duration = .seconds(1), logSize: Int = HostDefaults.logSize, logsKept: Int = HostDefaults.logsKept,
        stateDirectory: String? = nil, say: @escaping @Sendable (String) -> Void
    ) throws {
        // Each line written out where it holds control characters: lines carry what the guest
        // sent (an exit's id, its boot id, an error's text), and a compromised guest's escape
        // sequence reached the operator's terminal, its newline forged a line of the log.
        let say: @Sendable (String) -> Void = { text in say(TerminalText.escaped(text)) }
        self.say = say
        self.listInterval = listInterval
        self.logSize = logSize
        let kept = try stateDirectory.map { path throws(HoldfastError) in try HostStateDirectory(path: path) }
        self.stateDirectory = kept
        let table = HostProcessTable(logsKept: logsKept, stateDirectory: kept, say: say)
        self.table = table
        // With a state directory an exit is acknowledged to the guest only once it is written
        // down: a host serve killed in between is given it again by the guest's next hello.
        let bridgeServer = try BridgeServer(
            listeningOn: bridge, authentication: bridgeKey.map { .key($0) } ?? .none, unixMode: 0o666, warn: { say("warning: \($0)") },
            observer: { [table] event in table.guestSaid(event) }, exitAcknowledgement: kept == nil ? .onDelivery : .byCaller)
        self.bridge = bridgeServer
        if kept != nil { table.acknowledgeExits { [weak bridgeServer] id in bridgeServer?.acknowledgeExit(id) } }
        let streamServer = try StreamServer<AsyncFD>(listeningOn: streams, unixMode: 0o666)
        self.streams = streamServer
        self.streamAddress = (guestStreams ?? streamServer.address).description
        self.control = try Listener(binding: .unix(path: control), kind: .seqpacket, unixMode: 0o600)
        restoredUnanswered = kept.map {
            Self.restore(from: $0, table: table, streams: streamServer, logSize: logSize, say: say)
        } ?? []
    }

    /// Takes up the processes an earlier host serve kept in `directory`: each unfinished one's
    /// streams opened again with their tokens and secrets, resuming where its files end (before
    /// the stream server and the bridge start, so that the guest finds them there), and the
    /// finished ones remembered for `wait`, `ps -a` and `logs`.
    private static func restore(
        from directory: HostStateDirectory, table: HostProcessTable, streams: StreamServer<AsyncFD>, logSize: Int,
        say: @escaping @Sendable (String) -> Void
    ) -> [(HostedProcess, HostProcessRecord)] {
        var unanswered: [(HostedProcess, HostProcessRecord)] = []
        var running = 0
        var finished = 0
        for found in directory.restore(say: say) {
            let record = found.record
            let outputKinds = record.streams.map(\.kind).filter { $0 != "stdin" }
            let log = ProcessLog(capacity: logSize, streams: outputKinds)
            if found.finished, let outcome = found.outcome {
                for kind in outputKinds {
                    if let file = found.files.existingOutputLog(kind, keep: logSize) {
                        log.append(kind, file.tail(logSize))
                        file.close()
                    }
                }
                log.endAll()
                let info = HostProcessInfo(
                    id: record.id, pid: record.pid, state: outcome.exit == nil ? .lost : .exited, exitCode: outcome.exit?.exitCode,
                    command: record.command, oomKilled: outcome.exit?.wasLikelyOOMKilled == true ? true : nil)
                table.restoreFinished(info, outcome: outcome, log: log.byteCount > 0 ? log : nil, files: found.files)
                finished += 1
                continue
            }
            var input: InputRelay?
            var outputs: [OutputRelay] = []
            do {
                for stream in record.streams {
                    let token = Array(stream.token.utf8)
                    if stream.kind == "stdin" {
                        input = try InputRelay(
                            token: token, server: streams, secret: stream.secret, offset: try found.files.inputOffset(), files: found.files,
                            resume: true, ended: found.files.stdinEnded, say: { say("process \(record.id): \($0)") })
                    } else {
                        let file = try found.files.outputLog(stream.kind, keep: logSize)
                        log.append(stream.kind, file.tail(logSize))
                        if found.files.hasEnded(stream.kind) {
                            // Its END had arrived: the guest no longer has the stream.
                            file.close()
                            log.end(stream.kind)
                            continue
                        }
                        // Not held: no client is attached after a restart; what comes goes into
                        // the log, and an `attach` follows it from then on.
                        outputs.append(
                            try OutputRelay(
                                kind: stream.kind, token: token, server: streams, log: log, held: false, secret: stream.secret, file: file,
                                files: found.files, resume: true, say: { say("process \(record.id): \($0)") }))
                    }
                }
            } catch {
                input?.close()
                for output in outputs { output.discard() }
                say("warning: process \(record.id) kept in \(found.files.directory) cannot be taken up again: \(error)")
                continue
            }
            let process = HostedProcess(
                id: record.id, outputs: outputs, input: input, log: log, command: record.command ?? "", tty: record.tty,
                drainTimeout: HostDefaults.drainTimeout, files: found.files)
            let guest = record.bootID.map { GuestIdentity(bootID: $0, instanceID: record.instanceID) }
            table.restore(process, pid: record.pid, guest: guest, outcome: found.outcome)
            startRelays(of: process, table: table, say: say)
            if record.pid == nil, found.outcome == nil { unanswered.append((process, record)) }
            running += 1
        }
        if running + finished > 0 {
            say("holdfast host: took up \(running) processes and \(finished) finished ones from \(directory.path)")
        }
        return unanswered
    }

    /// Relays a process's streams until they end.
    private static func startRelays(of process: HostedProcess, table: HostProcessTable, say: @escaping @Sendable (String) -> Void) {
        let id = process.id
        if let input = process.input {
            Task {
                await input.run()
                Self.reportLoss(of: input.stream, id: id, kind: "stdin", say: say)
            }
        }
        for output in process.outputs {
            Task { [table] in
                await output.run(endEchoTimeout: { process.state.withLockedValue { $0.drainTimeout } }) {
                    Self.reportLoss(of: output.stream, id: id, kind: output.kind, say: say)
                    table.outputFinished(process)
                }
            }
        }
    }

    /// Serves until the task is cancelled.
    public func run() async {
        // Each process it serves holds its streams' sockets and its log: a shell's soft limit of
        // 1,024 would refuse the streams of a few hundred processes.
        ResourceLimits.raiseOpenFileLimit()
        // The streams first: a guest that says hello learns nothing of a restored process's
        // stream being unknown for a moment.
        streams.start()
        bridge.start()
        let dialled = streamAddress == streams.address.description ? "" : " (the guest dials \(streamAddress))"
        say("holdfast host: bridge \(bridge.address), streams \(streams.address)\(dialled), control \(control.address)")
        let poller = Task { await pollGuestList() }
        for (process, record) in restoredUnanswered {
            Task { [bridge, table, say] in
                await Self.createAgain(process, record: record, in: table, bridge: bridge, say: say)
            }
        }
        // An accept that fails (EMFILE with many processes' sockets and logs held) is a moment of
        // scarcity: tried again, said at most every 10 s. Before, the loop ended at the first
        // one, and every `holdfast host` command after it hung in the backlog until its bound.
        var failures = LogPacer<Int>(interval: .seconds(10))
        let say = say
        while let connection = await control.nextConnection(failed: { error in
            guard let unsaid = failures.note(0) else { return }
            say("warning: a control connection could not be accepted (\(error)); it waits and is accepted again\(unsaid > 0 ? " (\(unsaid) more since the last warning)" : "")")
        }) {
            Task { await serveClient(FDChannel(connection)) }
        }
        poller.cancel()
    }

    public func close() {
        // The bridge first: an exit that came after the table let go of its processes would be
        // taken for another client's, and acknowledged; the guest keeps it for the next one.
        bridge.close()
        for process in table.close() { process.abandon() }
        control.close()
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
            rememberedExits: bridge.rememberedExits, descriptors: ProcessFigures.openDescriptors(), heapInUse: heap.inUse, heapFree: heap.free,
            guestConnected: bridge.isConnected, bridgeAddress: bridge.address.description)
    }

    /// While processes wait for an outcome, asks the guest for its process list now and then
    /// (`HostProcessTable.listed` says what a missing process means).
    private func pollGuestList() async {
        while !Task.isCancelled {
            try? await Task.sleep(for: listInterval)
            let (waiting, round) = table.beginListRound()
            guard waiting, bridge.isConnected, let (ids, guest) = await guestProcessIDs() else { continue }
            table.listed(ids, by: guest, round: round)
        }
    }

    /// Every process id the guest lists, page by page, without its streams; nil if a page was
    /// not answered, or the pages came from two guests (a reconnect between them). Before, one
    /// `list` with the streams: past about 680 processes it was cut short and thrown away, and
    /// processes gone from the guest were no longer noticed at all.
    private func guestProcessIDs() async -> (Set<String>, GuestIdentity)? {
        var ids: Set<String> = []
        var guest: GuestIdentity?
        var after: String?
        for _ in 0..<Self.listPagesPerRound {
            let request = BridgeRequest.list(BridgeListRequest(streams: false, processesAfter: after))
            guard let (page, hello) = try? await bridge.callReportingHello(request, reply: BridgeListResponse.self, timeout: .seconds(5)) else {
                return nil
            }
            let identity = GuestIdentity(hello)
            if let guest, guest != identity { return nil }
            guest = identity
            ids.formUnion(page.processes.map(\.id))
            // An older guest ignores the paging and sends its whole list, or cuts it short: then
            // nothing is concluded from it, as before.
            guard let omitted = page.omittedProcesses, omitted > 0 else { return guest.map { (ids, $0) } }
            guard let last = page.processes.last?.id, last != after else { return nil }
            after = last
        }
        return nil
    }

    /// The most pages one round asks for (each up to the frame's 64 KiB: about 1,400 processes).
    static let listPagesPerRound = 64

    // MARK: The control socket

    /// One client of the control socket. Requests run concurrently; when the client goes, its
    /// waits are cancelled (a process attached to and left many times keeps no waiter per
    /// client).
    private func serveClient(_ channel: FDChannel) async {
        defer { channel.close() }
        let client = nextClient.wrappingAdd(1, ordering: .relaxed).newValue
        _ = await RPCServer.serve(channel, as: HostRequest.self, inFlight: 64, cancelWhenClosed: true) { [self] request, _ async throws(HoldfastError) -> RPCReply in
            try await handle(request, from: client)
        }
    }

    /// Numbers the control clients (which one has a process's sockets: `HostedProcess.attached`).
    private let nextClient = Atomic<UInt64>(0)

    private func handle(_ request: HostRequest, from client: UInt64) async throws(HoldfastError) -> RPCReply {
        switch request {
        case .run(let request):
            let (body, descriptors) = try await start(request, client: client)
            return RPCReply(body: body, descriptors: descriptors)
        case .wait(let request):
            return RPCReply(try await wait(request, from: client))
        case .closeStdin(let request):
            try closeStdin(request.id)
            return .empty
        case .detach(let request):
            try detach(request.id, client: client)
            return .empty
        case .list:
            return RPCReply(try await bridge.list())
        case .processes(let request):
            return RPCReply(await processes(all: request.all ?? false))
        case .signal(let request):
            try Self.checkSignal(request.signal)
            try await bridge.signal(request.id, request.signal)
            return .empty
        case .stop(let request):
            return RPCReply(try await stop(request))
        case .logs(let request):
            let (body, descriptors) = try logs(request)
            return RPCReply(body: body, descriptors: descriptors)
        case .resize(let request):
            try await bridge.resize(request.id, rows: request.rows, columns: request.columns)
            return .empty
        case .attach(let request):
            let (body, descriptors) = try attach(request.id, client: client)
            return RPCReply(body: body, descriptors: descriptors)
        case .stats:
            return RPCReply(stats)
        case .migrate(let request):
            guard (0...600_000).contains(request.blackoutMilliseconds) else {
                throw HoldfastError(.badRequest, "blackout must be 0 to 600000 ms")
            }
            // Unstructured: a client that goes away mid-blackout does not cut it short.
            return RPCReply(await Task { await migrate(blackout: .milliseconds(request.blackoutMilliseconds)) }.value)
        }
    }

    private static func checkSignal(_ signal: Int32) throws(HoldfastError) {
        guard (1...SignalNames.highest).contains(signal) else {
            throw HoldfastError(.badRequest, "\(signal) is not a signal: valid are \(SignalNames.validNames)")
        }
    }

    private func wait(_ request: HostWaitRequest, from client: UInt64) async throws(HoldfastError) -> HostWaitResponse {
        if let milliseconds = request.drainTimeoutMilliseconds, !(0...86_400_000).contains(milliseconds) {
            throw HoldfastError(.badRequest, "the drain timeout must be 0 to 86400000 ms")
        }
        guard let (process, known) = table.lookup(request.id) else { throw Self.closing }
        guard let process else {
            if let known { return known }
            throw Self.noSuchProcess(request.id)
        }
        if let milliseconds = request.drainTimeoutMilliseconds {
            process.state.withLockedValue { $0.drainTimeout = .milliseconds(milliseconds) }
        }
        let untilExit = request.untilExit ?? false
        if process.wasDisplaced(client) { throw Self.attachedElsewhere(request.id) }
        guard process.isAttached(client) else {
            guard let outcome = await process.waitForOutcome(untilExit: untilExit) else { throw Self.closing }
            return outcome
        }
        // The client with the sockets: it also hears when another client takes them (before, it
        // sat raw and deaf until the process ended, and a signal to it — its terminal closed —
        // was passed on to the process the other client now used).
        enum Ending: Sendable {
            case outcome(HostWaitResponse?)
            case displaced(Bool)
        }
        let ending = await withTaskGroup(of: Ending.self) { group in
            group.addTask { .outcome(await process.waitForOutcome(untilExit: untilExit)) }
            group.addTask { .displaced(await process.waitUntilDisplaced(client)) }
            var result: Ending = .outcome(nil)
            for await next in group {
                if case .displaced(false) = next { continue }  // cancelled: the outcome decides
                result = next
                break
            }
            group.cancelAll()
            return result
        }
        switch ending {
        case .outcome(let outcome?): return outcome
        case .outcome(nil): throw Self.closing
        case .displaced:
            throw Self.attachedElsewhere(request.id)
        }
    }

    private static func attachedElsewhere(_ id: String) -> HoldfastError {
        HoldfastError(.attachedElsewhere, "another client attached to '\(id)' and has its streams now")
    }

    private static let closing = HoldfastError(.closing, "host serve is closing")

    private static func noSuchProcess(_ id: String) -> HoldfastError {
        HoldfastError(.noSuchProcess, "no process '\(id)' started by this host serve (holdfast host ps -a lists them)")
    }

    /// The attached client's stdin ended (after its last byte on the stdin socket).
    private func closeStdin(_ id: String) throws(HoldfastError) {
        guard let (process, known) = table.lookup(id) else { throw Self.closing }
        guard let process else {
            if known != nil { return }  // finished: nothing reads its stdin any more
            throw Self.noSuchProcess(id)
        }
        guard let input = process.input else { throw HoldfastError(.noStdin, "process '\(id)' has no stdin stream") }
        // A terminal has no end-of-file to give: its process would never read one, and its
        // input would be gone for every later client.
        guard !process.tty else {
            throw HoldfastError(.badRequest, "process '\(id)' has a terminal, whose input has no end-of-file: type its EOF character (Ctrl-D) instead")
        }
        input.endOfInput()
    }

    /// `host ps`: the guest's list (asked briefly: a guest away leaves host serve's own view),
    /// each process with what host serve knows of it; `all` adds the finished ones it remembers.
    private func processes(all: Bool) async -> HostProcessList {
        let known = table.infos(finished: all)
        var byID: [String: HostProcessInfo] = [:]
        for info in known { byID[info.id] = info }
        var guestAnswered = false
        if bridge.isConnected, let list = try? await bridge.list(timeout: .seconds(2)) {
            guestAnswered = true
            for process in list.processes {
                let state: HostProcessInfo.State
                switch process.state {
                case .starting: state = .starting
                case .running: state = .running
                case .exited, .done: state = .exited
                }
                var info = byID[process.id] ?? HostProcessInfo(id: process.id, pid: nil, state: state, exitCode: nil, command: nil)
                info.pid = process.pid > 0 ? process.pid : info.pid
                if info.state != .lost {
                    info.state = state
                    info.exitCode = process.exitCode ?? info.exitCode
                }
                byID[process.id] = info
            }
            if !all {
                // Without -a: what runs (or still drains) in the guest, and ours still starting.
                let listed = Set(list.processes.map(\.id))
                byID = byID.filter { listed.contains($0.key) || $0.value.state == .starting || $0.value.state == .running }
            }
        }
        return HostProcessList(processes: byID.values.sorted { $0.id < $1.id }, guestAnswered: guestAnswered)
    }

    /// `host stop`: the signal, then SIGKILL if the outcome has not come within the timeout.
    private func stop(_ request: HostStopRequest) async throws(HoldfastError) -> HostStopResponse {
        let signal = request.signal ?? SIGTERM
        try Self.checkSignal(signal)
        let timeout = Duration.milliseconds(request.timeoutMilliseconds ?? Int(HostDefaults.stopTimeout.components.seconds * 1000))
        guard let (process, known) = table.lookup(request.id) else { throw Self.closing }
        guard let process else {
            if let known { return HostStopResponse(outcome: known, killed: false, alreadyEnded: true) }
            throw Self.noSuchProcess(request.id)
        }
        if let outcome = process.knownOutcome { return HostStopResponse(outcome: outcome, killed: false, alreadyEnded: true) }
        try await signalUnlessExited(request.id, signal)
        if let outcome = await process.waitForExit(within: timeout) { return HostStopResponse(outcome: outcome, killed: false) }
        say("process \(request.id) did not exit within \(timeout.spoken) of \(SignalNames.name(signal)): sending SIGKILL")
        try await signalUnlessExited(request.id, SIGKILL)
        guard let outcome = await process.waitForExit(within: HostDefaults.guestWait) else {
            throw HoldfastError(
                .notRunning,
                "process '\(request.id)' was sent SIGKILL \(timeout.spoken) after \(SignalNames.name(signal)), and no exit came within \(HostDefaults.guestWait.spoken) more (is the guest connected? holdfast host wait \(request.id) goes on waiting)")
        }
        return HostStopResponse(outcome: outcome, killed: true)
    }

    /// A signal to a process that may have exited already (its exit not reported yet: that is
    /// not an error for a stop).
    private func signalUnlessExited(_ id: String, _ signal: Int32) async throws(HoldfastError) {
        do {
            try await bridge.signal(id, signal)
        } catch where error.code == .notRunning {
            return
        }
    }

    /// `host logs`: a socket per output stream, carrying what the log kept of it (and, with
    /// `follow`, what comes next until the output ends), then end-of-file.
    private func logs(_ request: HostLogsRequest) throws(HoldfastError) -> ([UInt8], [Int32]) {
        guard let found = table.log(of: request.id) else { throw Self.noSuchProcess(request.id) }
        let kinds = ["stdout", "stderr"]
        var ours: [String: AsyncFD] = [:]
        var theirs: [Int32] = []
        do {
            for kind in kinds {
                let pair = try Self.streamPair()
                theirs.append(pair.theirs)
                ours[kind] = try AsyncFD(adopting: pair.ours)
            }
        } catch {
            for fd in theirs { _ = Glibc.close(fd) }
            for socket in ours.values { socket.close() }
            throw HoldfastError(.localFailed, "\(error)")
        }
        let log = found ?? ProcessLog(capacity: 0, streams: [])
        let follow = request.follow ?? false
        Task { await Self.sendLog(log, to: ours, follow: follow) }
        return (ControlJSON.encode(HostRunResponse(id: request.id, pid: 0, streams: kinds)), theirs)
    }

    private static func sendLog(_ log: ProcessLog, to sockets: [String: AsyncFD], follow: Bool) async {
        defer { for socket in sockets.values { socket.close() } }
        // The client never writes: its stdout socket becoming readable is its going away.
        let writer = Task {
            var cursor: UInt64 = 0
            while !Task.isCancelled {
                let (entries, ended) = log.entries(after: cursor)
                for entry in entries {
                    cursor = entry.sequence
                    guard let socket = sockets[entry.kind] else { continue }
                    do {
                        try await entry.bytes.withUnsafeBytesAsync { try await socket.write($0) }
                    } catch {
                        return
                    }
                }
                if !follow || (ended && log.entries(after: cursor).entries.isEmpty) { return }
                await log.waitForMore(after: cursor)
            }
        }
        let watcher = Task {
            guard let socket = sockets["stdout"] else { return }
            let byte = UnsafeMutableRawBufferPointer.allocate(byteCount: 1, alignment: 1)
            defer { byte.deallocate() }
            _ = try? await socket.read(into: byte)
            writer.cancel()
        }
        await writer.value
        watcher.cancel()
        for socket in sockets.values { socket.shutdownWrite() }
    }

    /// What a live migration looks like to the guest: the bridge and every stream connection
    /// drop at once, and nothing is accepted for `blackout`. Answered once the guest is back
    /// (or not, within `HostMigrateResponse.reconnectWait`).
    public func migrate(blackout: Duration) async -> HostMigrateResponse {
        let guestWasConnected = bridge.isConnected
        let helloBefore = bridge.acceptedConnections
        say("--- migration: every connection dropped, \(blackout.spoken) blackout ---")
        streams.setRefusing(true)
        bridge.drop(refusing: true)
        let dropped = streams.dropAllConnections()
        try? await Task.sleep(for: blackout)
        streams.setRefusing(false)
        bridge.drop(refusing: false)
        say("--- migration done: accepting again ---")
        let reopened = ContinuousClock.now
        var backAfter: Duration?
        if guestWasConnected {
            let deadline = reopened + HostMigrateResponse.reconnectWait
            while ContinuousClock.now < deadline {
                if bridge.isConnected, bridge.acceptedConnections > helloBefore {
                    backAfter = ContinuousClock.now - reopened
                    break
                }
                try? await Task.sleep(for: .milliseconds(10))
            }
        }
        return HostMigrateResponse(
            bridgeDropped: guestWasConnected, streamConnectionsDropped: dropped,
            blackoutMilliseconds: Int(blackout.components.seconds * 1000 + blackout.components.attoseconds / 1_000_000_000_000_000),
            guestBackAfterMilliseconds: backAfter.map { Int($0.components.seconds * 1000 + $0.components.attoseconds / 1_000_000_000_000_000) })
    }

    // MARK: Starting and attaching

    /// Opens the process's streams here, creates it in the guest, and returns one local socket
    /// per stream for the client (none for a detached start: its client is a later `attach`).
    private func start(_ request: HostRunRequest, client: UInt64) async throws(HoldfastError) -> ([UInt8], [Int32]) {
        let id = request.id ?? request.container.map { "\($0).exec\(UInt16.random(in: 0..<UInt16.max))" } ?? "p\(UInt32.random(in: 0..<UInt32.max))"
        let detached = request.detach ?? false
        // A detached process has stdin only if asked (-i) or if it has a terminal.
        let wantsInput = !detached || (request.interactive ?? false) || request.tty
        var kinds = request.tty ? ["stdin", "stdout"] : wantsInput ? ["stdin", "stdout", "stderr"] : ["stdout", "stderr"]
        var specs: [String: StreamSpec] = [:]
        if request.mode == .raw {
            // Raw streams go straight to the listeners named; nothing is relayed here.
            for (kind, address) in request.rawAddresses ?? [:] where kinds.contains(kind) {
                specs[kind] = StreamSpec(address: address, mode: .raw)
            }
            kinds = []
        }
        if table.isTaken(id) { throw HoldfastError(.processExists, "host serve already runs a process '\(id)'") }

        // With a state directory: the process's record, with its streams' secrets, is written
        // before the create goes out, and its output is kept there as it comes.
        let files = try stateDirectory?.newProcess()
        var input: InputRelay?
        var outputs: [OutputRelay] = []
        func discardStreams() {
            input?.close()
            for output in outputs { output.discard() }
            files?.remove()
        }
        let log = ProcessLog(capacity: logSize, streams: kinds.filter { $0 != "stdin" })
        var record = HostProcessRecord(id: id, command: nil, tty: request.tty, streams: [])
        do {
            for kind in kinds {
                let token = Array("\(id)-\(kind)".utf8)
                if kind == "stdin" {
                    let relay = try InputRelay(
                        token: token, server: streams, offset: try files?.inputOffset(), files: files, say: { [say] in say("process \(id): \($0)") })
                    input = relay
                    specs[kind] = relay.stream.streamSpec(at: streamAddress)
                    record.streams.append(HostProcessRecord.Stream(kind: kind, token: "\(id)-\(kind)", secret: relay.stream.secret))
                } else {
                    let relay = try OutputRelay(
                        kind: kind, token: token, server: streams, log: log, held: !detached, file: try files?.outputLog(kind, keep: logSize),
                        files: files, say: { [say] in say("process \(id): \($0)") })
                    outputs.append(relay)
                    specs[kind] = relay.stream.streamSpec(at: streamAddress)
                    record.streams.append(HostProcessRecord.Stream(kind: kind, token: "\(id)-\(kind)", secret: relay.stream.secret))
                }
            }
        } catch let error as HoldfastError {
            discardStreams()
            throw error
        } catch {
            discardStreams()
            throw HoldfastError(.processExists, "host serve already has a stream of a process '\(id)': \(error)")
        }
        let command = request.bundle.map { "runc container from \($0)" } ?? Self.commandLine(request.argv)
        record.command = command
        // Keyed here (not by the bridge) so that the record has the key: a host serve killed
        // before the answer sends this create again, and the guest knows it for the same one.
        let spec = ProcessSpec(
            id: id, argv: request.argv, env: request.env, cwd: request.cwd, user: request.user, group: request.group, tty: request.tty,
            rows: request.rows, columns: request.columns, stdin: specs["stdin"], stdout: specs["stdout"], stderr: specs["stderr"],
            runtime: request.runtime, bundle: request.bundle, container: request.container, idempotencyKey: RandomIdentifier.make())
        record.spec = spec
        // The daemon it goes to, as far as known: a restart that finds the create unanswered
        // sends it again only to that daemon (another one has no memory of its key, and would
        // run it a second time).
        if let guest = table.currentGuest {
            record.bootID = guest.bootID
            record.instanceID = guest.instanceID
        }
        do throws(HoldfastError) {
            try files?.write(record)
        } catch {
            discardStreams()
            throw error
        }
        let process = HostedProcess(
            id: id, outputs: outputs, input: input, log: log, command: command, tty: request.tty, drainTimeout: HostDefaults.drainTimeout,
            files: files)
        let local: [Int32]
        do {
            local = detached ? [] : try connectClient(to: kinds.compactMap { process.outlets[$0] })
        } catch {
            discardStreams()
            throw error
        }
        guard table.register(process) else {
            for fd in local { _ = Glibc.close(fd) }
            discardStreams()
            throw HoldfastError(.processExists, "host serve already runs a process '\(id)'")
        }
        let say = say
        Self.startRelays(of: process, table: table, say: say)

        let created: BridgeServer.CreatedProcess
        do {
            created = try await bridge.createProcess(spec, timeout: HostDefaults.guestWait)
        } catch {
            for fd in local { _ = Glibc.close(fd) }
            process.abandon()
            guard error.code == .guestNotAnswering || error.code == .bridgeLost else {
                table.unregister(process)
                files?.remove()
                throw error
            }
            // The guest took the create and did not answer (stopped, traced, a migration that
            // outlasted the wait): it may start the process yet — with no client, its streams
            // closed here, not in `ps`, unreachable by `attach`. It is ended if it does start,
            // and its id stays taken until that is settled (a new `run` of the id meanwhile
            // would be the one killed). Its record loses the create: a restart meanwhile must
            // not send again what its client was told had failed.
            if let files {
                var givenUp = record
                givenUp.spec = nil
                try? files.write(givenUp)
            }
            Task { [bridge, table, say] in
                await Self.endIfItStartsLate(process, in: table, bridge: bridge, say: say)
            }
            throw error
        }
        Failpoint.pass(Failpoint.hostServeCreateAnswered, process: "host-serve")
        // Which daemon runs it; if another one said hello meanwhile, it is already gone.
        record.pid = created.pid
        record.bootID = created.hello.bootID
        record.instanceID = created.hello.instanceID
        // Answered: the create (its environment too) is no longer needed on disk.
        record.spec = nil
        if let files {
            do throws(HoldfastError) {
                try files.write(record)
            } catch {
                say("warning: process \(id): \(error); a restart of host serve would take it for a create never answered")
            }
        }
        table.created(process, pid: created.pid, by: GuestIdentity(created.hello))
        if !detached { process.attached(by: client) }
        say("process \(id) started in the guest: pid \(created.pid), \(request.bundle.map { "runc container from \($0)" } ?? "\(request.argv)")\(detached ? " (detached)" : "")")
        return (ControlJSON.encode(HostRunResponse(id: id, pid: created.pid, streams: detached ? [] : kinds, tty: request.tty)), local)
    }

    /// A create whose answer did not come: SIGKILL to the id until the guest answers. A guest
    /// signals a process still starting once it has started, and answers `no-such-process` for
    /// one whose create failed or never came (an older guest answers that at once for one still
    /// starting: then the process is left, as before). Tried for up to an hour, then given up.
    /// Meanwhile the id stays taken (`process` registered, starting); the watch ends it with an
    /// outcome (so a `wait` or `attach` parked on it is answered), and stops at once if its exit
    /// came (host serve then forgot it: the id may be a new process's by the next signal).
    static func endIfItStartsLate(_ process: HostedProcess, in table: HostProcessTable, bridge: BridgeServer, say: @Sendable (String) -> Void) async {
        let id = process.id
        let giveUp = ContinuousClock.now + lateStartWatch
        func stillOurs() -> Bool { table.lookup(id)?.process === process }
        func end(_ message: String) {
            guard stillOurs() else { return }
            table.end(process, HostWaitResponse(lost: LostProcess(reason: .vanished, message: message)))
        }
        // `no-such-process` twice, 5 s apart: the guest handles requests concurrently, so a kill
        // sent after the create may be handled before it (then the process starts after all).
        var absent = 0
        while ContinuousClock.now < giveUp, stillOurs() {
            do throws(HoldfastError) {
                try await bridge.signal(id, SIGKILL, timeout: .seconds(60))
                say("process \(id) started after its create was given up on (no client had it): killed")
                end("process \(id) started after its create was given up on, with no client: killed")
                return
            } catch where error.code == .noSuchProcess || error.code == .notRunning {
                absent += 1
                if absent >= 2 || error.code == .notRunning {
                    end("process \(id): its create was given up on, and the guest never started it")
                    return
                }
                try? await Task.sleep(for: .seconds(5))
            } catch {
                absent = 0
                try? await Task.sleep(for: .seconds(2))
            }
        }
        guard stillOurs() else { return }
        say("process \(id): its create was given up on, and the guest did not say within \(lateStartWatch) whether it ran; if it did, 'holdfast host kill \(id)' ends it")
        end("process \(id): its create was given up on; whether the guest ran it is unknown")
    }

    static let lateStartWatch = Duration.seconds(3600)

    /// A process whose create an earlier host serve sent and died before the answer: sent
    /// again, same idempotency key, so the guest answers with the first one's pid (it started)
    /// or starts it now (it never came). Its output goes into its log: no client has it.
    static func createAgain(
        _ process: HostedProcess, record: HostProcessRecord, in table: HostProcessTable, bridge: BridgeServer,
        say: @escaping @Sendable (String) -> Void
    ) async {
        let id = process.id
        guard var spec = record.spec, spec.idempotencyKey != nil else {
            // A record without the create (it cannot be sent again): ended if it runs.
            say("process \(id): its create was not answered before host serve stopped; it is killed if it runs (no client has it)")
            await endIfItStartsLate(process, in: table, bridge: bridge, say: say)
            return
        }
        spec.id = id
        // Only to the daemon it was sent to: wait for the guest's hello (which ends the process
        // as lost if another daemon says it), then send it again if nothing settled it.
        let deadline = ContinuousClock.now + HostDefaults.guestWait
        while table.currentGuest == nil, ContinuousClock.now < deadline { try? await Task.sleep(for: .milliseconds(50)) }
        guard process.isUnresolved else { return }
        if let bootID = record.bootID, let now = table.currentGuest,
            let loss = GuestIdentity(bootID: bootID, instanceID: record.instanceID).loss(to: now, process: id)
        {
            table.end(process, HostWaitResponse(lost: loss))
            return
        }
        do throws(HoldfastError) {
            let created = try await bridge.createProcess(spec, timeout: HostDefaults.guestWait)
            var answered = record
            answered.pid = created.pid
            answered.bootID = created.hello.bootID
            answered.instanceID = created.hello.instanceID
            answered.spec = nil
            try? process.files?.write(answered)
            table.created(process, pid: created.pid, by: GuestIdentity(created.hello))
            say("process \(id): its create, unanswered when host serve stopped, is answered now: pid \(created.pid)")
        } catch where error.code == .guestNotAnswering || error.code == .bridgeLost {
            await endIfItStartsLate(process, in: table, bridge: bridge, say: say)
        } catch {
            table.end(process, HostWaitResponse(lost: LostProcess(reason: .vanished, message: "process \(id): its create was refused: \(error.message)")))
        }
    }

    /// argv as a shell would show it (`ps`): words with spaces or quotes quoted.
    static func commandLine(_ argv: [String]) -> String {
        argv.map { word in
            let plain = !word.isEmpty && word.allSatisfy { $0.isLetter || $0.isNumber || "-_./=:@%+,".contains($0) }
            return plain ? word : "'" + word.split(separator: "'", omittingEmptySubsequences: false).joined(separator: "'\\''") + "'"
        }.joined(separator: " ")
    }

    /// `host attach`: new local sockets for a process's streams; the previous client's are
    /// closed. Output produced while no client was attached waited for this one. A process
    /// already finished gets no sockets; its `wait` answers at once.
    private func attach(_ id: String, client: UInt64) throws(HoldfastError) -> ([UInt8], [Int32]) {
        guard let (process, known) = table.lookup(id) else { throw Self.closing }
        guard let process else {
            if known != nil { return (ControlJSON.encode(HostRunResponse(id: id, pid: 0, streams: [])), []) }
            throw HoldfastError(.noSuchProcess, "no process '\(id)' started by this host serve")
        }
        let outlets = process.outlets
        let kinds = ["stdin", "stdout", "stderr"].filter { outlets[$0].map { !$0.isClosed } ?? false }
        let local = try connectClient(to: kinds.compactMap { outlets[$0] })
        process.attached(by: client)
        say("process \(id): client attached (\(kinds.joined(separator: ", ")))")
        let pid = process.state.withLockedValue { $0.pid } ?? 0
        return (ControlJSON.encode(HostRunResponse(id: id, pid: pid, streams: kinds, tty: process.tty)), local)
    }

    /// The client of `id` detached on purpose (its keys, Ctrl-C): the process's outputs stop
    /// waiting for the next client and go on into its log, as a detached start's do — before,
    /// they waited: `logs -f` showed nothing new, and the process blocked once its pipes and
    /// rings were full, until someone attached.
    private func detach(_ id: String, client: UInt64) throws(HoldfastError) {
        guard let (process, known) = table.lookup(id) else { throw Self.closing }
        guard let process else {
            if known != nil { return }  // it ended meanwhile
            throw HoldfastError(.noSuchProcess, "no process '\(id)' started by this host serve")
        }
        // A client another one displaced (its keys or Ctrl-C before it heard): the output is
        // the new client's, not to be let go of.
        guard !process.wasDisplaced(client) else { throw Self.attachedElsewhere(id) }
        for kind in ["stdout", "stderr"] { process.outlets[kind]?.letGoOfOutput() }
        say("process \(id): client detached; its output goes on into its log")
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
