import HoldfastConfig
import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import Logging
import NIOConcurrencyHelpers
import ServiceLifecycle

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

#if canImport(Glibc)
import Glibc
#endif

/// The supervisor: `holdfast daemon`. Root, the child subreaper, small. It starts the broker and
/// the bridge worker (re-executing its own binary), restarts them when they die, starts
/// container processes and hands their stdio to the broker, reaps every child, and shuts all of
/// it down gracefully on SIGTERM/SIGINT.
public final class Supervisor: Sendable {
    public let configuration: DaemonConfiguration
    let logger: Logger
    let executable: String
    let reaper = ChildReaper()
    let startedAt = ContinuousClock.now
    /// The broker's control channel while it runs; a create waits for it while it (re)starts.
    private let brokerClient = Rendezvous<ControlClient>()
    /// How long a create waits for a broker that is starting or restarting.
    static let brokerWait = Duration.seconds(15)
    /// The processes, the create ledger and the exits the host has not acknowledged, one value
    /// under one lock (ProcessTable.swift): checking that an id is free and reserving it, or
    /// forgetting a process and remembering its key, are single steps.
    private let table: NIOLockedValueBox<ProcessTable>
    /// The daemon's own moving parts: not process state, not in the table's snapshot.
    private struct Session {
        var bridge: BridgeState = .down
        var broker: RoleSupervisor?
        var bridgeWorker: RoleSupervisor?
        /// The bridge worker's channel while it runs (exits are pushed through it).
        var bridgeChannel: FDChannel?
        var shuttingDown = false
        /// While stopping: when every drain must be over, so that the exits still reach the host
        /// before the shutdown timeout (a process that exits now drains only until then).
        var drainDeadline: ContinuousClock.Instant?
        /// READY=1 has been sent: role restarts from now on are news.
        var ready = false
    }
    private let session = NIOLockedValueBox(Session())
    /// Rings when a process finishes, an exit is acknowledged or the bridge changes state: the
    /// stop waits on it instead of polling.
    private let changes = ChangeSignal()
    /// The bridge worker's pid once it started (readiness waits for it).
    private let bridgeStarted = Rendezvous<pid_t>()
    /// systemd's notification socket (a no-op when not started by systemd with Type=notify).
    let notifier: ServiceNotifier

    let runc: RuncRuntime
    let metrics = SupervisorMetrics()
    /// Gives malloc's free pages back after bursts of requests.
    let tidier = MemoryTidier()
    /// New at every start, in every hello: tells the host a daemon restart from a lost connection.
    var instanceID: String { table.withLockedValue { $0.instanceID } }

    /// `executable` is what the roles run: `/proc/self/exe` keeps them on this very binary even
    /// after a package upgrade has replaced the file (a restarted role must speak our protocol).
    public init(configuration: DaemonConfiguration, logger: Logger, executable: String, notifier: ServiceNotifier? = nil) {
        self.configuration = configuration
        self.logger = logger
        self.executable = executable
        self.notifier = notifier ?? ServiceNotifier(environment: [:], logger: logger)
        table = NIOLockedValueBox(ProcessTable(instanceID: RandomIdentifier.make()))
        runc = RuncRuntime(
            path: configuration.runc.path, root: configuration.runc.root, workDirectory: configuration.runDirectory + "/runc-work",
            reaper: reaper, logger: logger)
    }

    // MARK: Running

    /// Runs until SIGTERM or SIGINT, then shuts down; returns the exit code.
    /// Refuses to start (`StartRefused`, exit code 2) on an unsafe run directory, another
    /// daemon holding it, a broker uid other processes use, or a socket path that is not ours.
    public func run() async throws -> Int32 {
        let lock = try claimRunDirectory()
        defer { withExtendedLifetime(lock) {} }
        try checkBrokerUIDIsItsOwn()
        try Subreaper.become()
        let signals = try SignalPipe(signals: [SIGCHLD, SIGTERM, SIGINT])
        SignalDisposition.ignore(SIGPIPE)
        try makeRunDirectory()
        let handoff = try bindHandoff()
        let control = try Listener(
            binding: .unix(path: configuration.control.socket), kind: .seqpacket, unixMode: 0o600)

        notifier.status("Starting the broker and the bridge worker")
        let broker = RoleSupervisor(
            name: "broker", logger: logger, reaper: reaper, launch: { [self] in try launchBroker(handoff: handoff) },
            serve: { [self] incarnation in await serveBroker(incarnation) },
            onEvent: { [self] event in roleEvent("broker", event) })
        let bridge = RoleSupervisor(
            name: "bridge", logger: logger, reaper: reaper, launch: { [self] in try launchBridge() },
            serve: { [self] incarnation in await serveBridge(incarnation) },
            onEvent: { [self] event in roleEvent("bridge worker", event) })
        session.withLockedValue {
            $0.broker = broker
            $0.bridgeWorker = bridge
        }
        // Started in this order and stopped in the reverse one: the processes stop first (with
        // the roles, the bridge and the control socket still serving, so their exits reach the
        // host), then the watchdog, metrics and control socket, then the bridge worker, the broker.
        var services: [any Service] = [
            DaemonService("broker", stop: { broker.stop() }) { await broker.run() },
            DaemonService("bridge worker", stop: { bridge.stop() }) { await bridge.run() },
            DaemonService("control socket", stop: { control.close() }) { [self] in await serveControl(control) },
        ]
        if let metrics = try metricsService() { services.append(metrics) }
        services += [
            DaemonService("systemd watchdog") { [notifier] in await notifier.runWatchdog() },
            DaemonService("memory tidier") { [tidier] in await tidier.run() },
            ShutdownSequence(description: "container processes") { [self] in await stopProcesses() },
        ]
        let group = ServiceGroup(configuration: ServiceGroupConfiguration(services: services, logger: logger))
        let running = Task { try await group.run() }
        let readiness = Task { await announceReadiness() }
        logger.info("holdfast daemon started", metadata: [
            "pid": "\(getpid())", "bridge": "\(configuration.bridge.address)", "control": "\(configuration.control.socket)",
            "systemd": "\(notifier.isActive ? "notify" : "no")",
        ])

        // Signals: children are reaped until the very end; the first SIGTERM or SIGINT starts
        // the stop.
        let signalLoop = Task { [self] in
            reaper.reapAll()
            var stopping = false
            while let signal = await signals.next() {
                switch signal {
                case SIGCHLD:
                    reaper.reapAll()
                case SIGTERM, SIGINT:
                    guard !stopping else { continue }
                    stopping = true
                    readiness.cancel()
                    beginStop(signal)
                    await group.triggerGracefulShutdown()
                default:
                    break
                }
            }
        }
        var clean = true
        do {
            try await running.value
        } catch {
            clean = false
            logger.error("the daemon's services failed", metadata: ["error": "\(error)"])
        }
        signalLoop.cancel()
        readiness.cancel()
        handoff?.close()
        await notifier.finish()
        logger.info("holdfast daemon stopped", metadata: ["clean": "\(clean && stopWasClean.withLockedValue { $0 })"])
        return 0
    }

    /// Whether every process ended and drained within the shutdown timeout.
    private let stopWasClean = NIOLockedValueBox(true)

    /// The stop begins: creates are refused from now on, systemd hears why.
    private func beginStop(_ signal: Int32) {
        session.withLockedValue { $0.shuttingDown = true }
        logger.info("shutting down", metadata: ["signal": "\(signalName(signal))"])
        let running = table.withLockedValue { $0.ids(in: .running).count }
        notifier.post([
            .stopping,
            .status("Shutting down (\(signalName(signal))): stopping \(running) container process\(running == 1 ? "" : "es")"),
        ])
    }

    /// The metrics endpoint, when `metrics.address` names one.
    private func metricsService() throws -> DaemonService? {
        guard let address = configuration.metrics.address else { return nil }
        let listener = try Listener(binding: address, unixMode: 0o644)
        let endpoint = MetricsEndpoint(listener: listener, logger: logger) { [self] in await metricsText() }
        logger.info("metrics endpoint", metadata: ["address": "\(listener.boundAddress)"])
        return DaemonService("metrics endpoint", stop: { listener.close() }) { await endpoint.serve() }
    }

    /// The supervisor's metrics, then the broker's (absent while it restarts).
    func metricsText() async -> String {
        var text = metrics.render(roles: roleStatuses)
        if let broker = broker(),
            let reply = try? await broker.call(BrokerRequest.metrics, reply: MetricsResponse.self)
        {
            text += reply.text
        }
        return text
    }

    // MARK: Service manager

    /// READY=1 once both roles are up: the broker has answered a request on its control channel
    /// (so it dropped privileges, loaded its seccomp filter and serves), and the bridge worker
    /// process runs (it was exec'd: the spawn reports exec failures). The host's bridge being
    /// reachable is not part of readiness: the worker redials it forever, and a guest service
    /// must not fail its start because the host is late.
    private func announceReadiness() async {
        while !Task.isCancelled {
            // Each wait ends when the part is there (or, bounded, to look at cancellation again).
            guard await bridgeStarted.wait(timeout: .seconds(1)) != nil, let broker = await brokerClient.wait(timeout: .seconds(1)),
                (try? await broker.call(BrokerRequest.list(ListRequest()), reply: ListResponse.self)) != nil,
                rolePID("bridge") != nil
            else { continue }
            guard !session.withLockedValue({ $0.shuttingDown }) else { return }
            session.withLockedValue { $0.ready = true }
            notifier.post([.ready, .status("Ready: broker and bridge worker up; \(bridgeSummary)")])
            logger.info("daemon ready", metadata: ["broker": "\(rolePID("broker") ?? 0)", "bridge": "\(rolePID("bridge") ?? 0)"])
            return
        }
    }

    private var bridgeSummary: String {
        let state = session.withLockedValue { $0.bridge }
        return "bridge to \(configuration.bridge.address) \(state == .up ? "up" : "down (redialling)")"
    }

    /// A role started, died or could not start: the status line says so (restarts only once the
    /// service is ready; the first starts are what readiness reports).
    private func roleEvent(_ role: String, _ event: RoleSupervisor.Event) {
        if role == "bridge worker" {
            switch event {
            case .started(let pid, _): bridgeStarted.set(pid)
            case .died, .cannotStart: bridgeStarted.clear { _ in true }
            }
        }
        guard !session.withLockedValue({ $0.shuttingDown }) else { return }
        switch event {
        case .started(let pid, let restarts):
            guard restarts > 0, session.withLockedValue({ $0.ready }) else { return }
            notifier.status("Ready: the \(role) was restarted (pid \(pid), restart \(restarts)); \(bridgeSummary)")
        case .died(let cause, let restartIn):
            notifier.status("The \(role) died (\(cause)); restarting in \(Self.describe(restartIn))")
        case .cannotStart(let error, let retryIn):
            notifier.status("Cannot start the \(role): \(error); retrying in \(Self.describe(retryIn))")
        }
    }

    /// "100ms", "5s".
    static func describe(_ duration: Duration) -> String {
        let milliseconds = duration.components.seconds * 1000 + duration.components.attoseconds / 1_000_000_000_000_000
        return milliseconds % 1000 == 0 ? "\(milliseconds / 1000)s" : "\(milliseconds)ms"
    }

    /// The run directory, created if missing (0755), checked (root's, nobody else can write in
    /// it or above it) and locked ({run}/holdfast.lock: a second daemon is refused with our pid);
    /// then every Unix socket path we bind is checked and cleared of a previous instance's
    /// socket — never of one another user made or a process listens on.
    private func claimRunDirectory() throws(StartRefused) -> RunDirectoryLock {
        do throws(RunDirectory.Refusal) {
            let lock = try RunDirectory.claim(configuration.runDirectory, lockName: "holdfast.lock")
            var sockets = [configuration.control.socket]
            if !configuration.handoff.socket.isEmpty { sockets.append(configuration.handoff.socket) }
            if case .unix(let path) = configuration.metrics.address { sockets.append(path) }
            for socket in sockets { try RunDirectory.prepareSocket(socket, runDirectory: configuration.runDirectory) }
            return lock
        } catch {
            throw StartRefused("run directory: \(error)")
        }
    }

    private func makeRunDirectory() throws {
        if mkdir(runc.workDirectory, 0o700) != 0, errno != EEXIST { throw SystemError.last("mkdir(\(runc.workDirectory))") }
    }

    /// A process by id (nil: none).
    func entry(_ id: String) -> ProcessTable.Entry? { table.withLockedValue { $0[id] } }

    /// The process table as a snapshot (what a live upgrade hands over; tests round-trip it).
    func snapshot() -> ProcessTable.Snapshot { table.withLockedValue { $0.snapshot() } }

    /// The public handoff socket, bound here as root with its configured mode, then passed down.
    private func bindHandoff() throws -> Listener? {
        guard !configuration.handoff.socket.isEmpty else { return nil }
        return try Listener(
            binding: .unix(path: configuration.handoff.socket), kind: .seqpacket, unixMode: mode_t(configuration.handoff.mode))
    }

    // MARK: Roles

    private var brokerSettings: BrokerSettings {
        BrokerSettings(
            user: configuration.broker.user, seccomp: SeccompAction(rawValue: configuration.broker.seccomp) ?? .kill,
            redialAttempts: configuration.streams.redialAttempts, redialIntervalMilliseconds: configuration.streams.redialInterval,
            connectTimeoutMilliseconds: configuration.streams.connectTimeout,
            drainTimeoutMilliseconds: configuration.streams.drainTimeout, ringCapacity: configuration.streams.ringCapacity,
            handoffAllowedUIDs: configuration.handoff.allowedUIDs, handoffAllowedGIDs: configuration.handoff.allowedGIDs)
    }

    private func launchBroker(handoff: Listener?) throws -> RoleSupervisor.Incarnation {
        // Before every start: a process that took the broker's uid meanwhile would share it.
        try checkBrokerUIDIsItsOwn()
        let (ours, theirs) = try FDChannel.pair()
        defer { close(theirs) }
        let settings = String(decoding: ControlJSON.encode(brokerSettings), as: UTF8.self)
        var arguments = ["holdfast", "broker", "--control-fd", String(theirs), "--settings", settings]
        var keep = [theirs]
        if let handoff {
            arguments += ["--handoff-fd", String(handoff.descriptor), "--handoff-path", configuration.handoff.socket]
            keep.append(handoff.descriptor)
        }
        // The broker starts as its unprivileged user: it never holds root at all (it needs none:
        // everything it uses arrives as fds). It still checks, and drops itself if it must.
        var user: UserAccount?
        if let name = configuration.broker.user, Privileges.isRoot { user = UserAccount.resolve(name) }
        let pid = try spawnRole(arguments, keep: keep, user: user)
        return .init(pid: pid, channel: FDChannel(try AsyncFD(adopting: ours)))
    }

    private func launchBridge() throws -> RoleSupervisor.Incarnation {
        let (ours, theirs) = try FDChannel.pair()
        defer { close(theirs) }
        var arguments = [
            "holdfast", "bridge", "--control-fd", String(theirs), "--address", configuration.bridge.address.description,
            "--reconnect-initial-ms", String(configuration.bridge.reconnectInitial),
            "--reconnect-max-ms", String(configuration.bridge.reconnectMax),
            "--authentication", configuration.bridge.authentication.rawValue,
        ]
        // The path, not the key: the worker (root) reads the file itself before every dial.
        if configuration.bridge.authentication == .hmacSHA256 { arguments += ["--key-file", configuration.bridge.keyFile] }
        let pid = try spawnRole(arguments, keep: [theirs])
        return .init(pid: pid, channel: FDChannel(try AsyncFD(adopting: ours)))
    }

    private func spawnRole(_ arguments: [String], keep: [Int32], user: UserAccount? = nil) throws -> pid_t {
        // Not NOTIFY_SOCKET and the watchdog's variables: only the supervisor speaks for the service.
        let environment = SpawnOptions.inheritedEnvironment().filter { entry in
            !ServiceNotify.environmentVariables.contains(String(entry.prefix { $0 != "=" }))
        }
        var options = SpawnOptions(executable: executable, arguments: arguments, environment: environment)
        if let user { options.user = (user.uid, user.gid, [user.gid]) }
        options.stdout = 1
        options.stderr = 2
        options.keepDescriptors = keep
        // A role never outlives the supervisor.
        options.parentDeathSignal = SIGKILL
        // Its own session: a Ctrl-C or hangup of the terminal the daemon runs in (SIGINT/SIGHUP
        // to the foreground group) reaches only the supervisor, which stops the roles in order.
        options.newSession = true
        return try Spawner.spawn(options)
    }

    private func serveBroker(_ incarnation: RoleSupervisor.Incarnation) async {
        let client = ControlClient(channel: incarnation.channel) { [self] frame in
            guard frame.type == BrokerMessageType.drained.rawValue,
                let drained = try? ControlJSON.decode(DrainedNotification.self, from: frame.body, frameType: frame.type)
            else { return }
            processDrained(drained)
        }
        brokerClient.set(client)
        // A new broker knows no streams; if the bridge is up, nothing to redial either.
        await client.run()
        brokerClient.clear { $0 === client }
        // The broker is gone with every stream it held: exits waiting for a drain will not get
        // one. Report them now rather than never.
        for entry in table.withLockedValue({ Array($0.entries) }) where entry.phase == .exited {
            if var report = entry.report {
                report.outputCutShort = true
                complete(entry.id, report)
            }
        }
    }

    /// The bridge worker's channel: it sends bridge-up/down notifications and forwards the
    /// host's requests (already parsed and checked); we answer them and push exits to it.
    private func serveBridge(_ incarnation: RoleSupervisor.Incarnation) async {
        let channel = incarnation.channel
        session.withLockedValue { $0.bridgeChannel = channel }
        // The worker bounds what the host has in flight; this bounds what the worker can (a
        // worker gone wrong must not grow the supervisor either).
        _ = await RPCServer.serve(
            channel, as: WorkerRequest.self, inFlight: 2 * BridgeProtocol.requestsInFlight,
            notification: { [self] frame in
                tidier.noteWork()
                await bridgeNotification(frame)
            }
        ) { [self] request, _ async throws(HoldfastError) -> RPCReply in
            tidier.noteWork()
            return try await handle(request)
        }
        session.withLockedValue { if $0.bridgeChannel === channel { $0.bridgeChannel = nil } }
        // The worker died: the bridge is as good as lost.
        if session.withLockedValue({ s in defer { s.bridge = .down }; return s.bridge == .up }) {
            changes.notify()
            metrics.bridge(up: false)
            _ = try? await broker()?.call(BrokerRequest.disconnectAll, reply: CountResponse.self)
        }
    }

    private func bridgeNotification(_ frame: ControlFrame) async {
        switch SupervisorMessageType(rawValue: frame.type) {
        case .bridgeUp:
            session.withLockedValue { $0.bridge = .up }
            changes.notify()
            metrics.bridge(up: true)
            resendExitsLeftOutOfTheHello()
            logger.info("bridge up")
            if session.withLockedValue({ $0.ready }) { notifier.status("Ready: \(bridgeSummary)") }
            _ = try? await broker()?.call(BrokerRequest.bridgeUp, reply: CountResponse.self)
        case .bridgeDown:
            session.withLockedValue { $0.bridge = .down }
            changes.notify()
            metrics.bridge(up: false)
            logger.warning("bridge lost")
            if session.withLockedValue({ $0.ready }) { notifier.status("Bridge to \(configuration.bridge.address) lost: streams parked, redialling") }
            _ = try? await broker()?.call(BrokerRequest.disconnectAll, reply: CountResponse.self)
        default:
            break
        }
    }

    /// A host request, forwarded by the bridge worker.
    /// A request of the bridge worker: the hello for a new bridge connection, or one the host
    /// sent (decoded and checked by the worker, decoded again at this boundary).
    private func handle(_ request: WorkerRequest) async throws(HoldfastError) -> RPCReply {
        switch request {
        case .hello:
            // The hello must fit one frame: the oldest exits first (every exit not in it is pushed
            // again once the bridge is up), then as many live processes as fit.
            let live = processStatuses().filter { $0.state != .done }
            let (withExits, _) = FrameBudget.fit(table.withLockedValue { $0.unacknowledgedExits }, budget: FrameBudget.bytes / 2) {
                BridgeHello(bootID: "", processes: [], exits: $0)
            }
            let (hello, _) = FrameBudget.fit(live) { BridgeHello(bootID: "", processes: $0, exits: withExits.exits, instanceID: instanceID) }
            return RPCReply(hello)
        case .host(let request):
            return try await handle(request)
        }
    }

    /// What the host asked, over the bridge.
    private func handle(_ request: BridgeRequest) async throws(HoldfastError) -> RPCReply {
        switch request {
        case .create(let spec):
            return RPCReply(try await launch(spec, viaBridge: true))
        case .signal(let request):
            try await signal(request.id, request.signal)
            return .empty
        case .resize(let request):
            try await brokerRequest(.resize(ResizeRequest(process: request.id, rows: request.rows, columns: request.columns)))
            return .empty
        case .closeStdin(let request):
            try await brokerRequest(.closeStdin(process: request.id))
            return .empty
        case .list:
            let streams = await brokerStreams()
            let list = processStatuses()
            let (processesFit, processesOmitted) = FrameBudget.fit(list, budget: FrameBudget.bytes / 2) { $0 }
            let (reply, omitted) = FrameBudget.fit(streams) {
                BridgeListResponse(processes: processesFit, streams: $0)
            }
            var fitted = reply
            if omitted > 0 || processesOmitted > 0 {
                fitted.omittedStreams = omitted
                fitted.omittedProcesses = processesOmitted
            }
            return RPCReply(fitted)
        case .stats:
            guard let broker = broker() else { throw HoldfastError(.brokerUnavailable, "the broker is not running (restarting?)") }
            return RPCReply(try await broker.call(BrokerRequest.stats, reply: BrokerStats.self))
        case .acknowledgeExit(let request):
            acknowledgeExit(request.id)
            return .empty
        }
    }

    private func brokerRequest(_ request: BrokerRequest) async throws(HoldfastError) {
        guard let broker = broker() else { throw HoldfastError(.brokerUnavailable, "the broker is not running (restarting?)") }
        _ = try await broker.request(request.frameType, body: request.body)
    }

    /// The host has an exit: forget it, and the process with it.
    private func acknowledgeExit(_ id: String) {
        table.withLockedValue { $0.acknowledgeExit(id) }
        changes.notify()
    }

    /// Every path that ends a process comes here once: waiters are woken, and an exit the host
    /// asked for is kept until the host acknowledges it (sent now if the bridge is up, and in
    /// every hello until then). It is queued for the host before anyone waiting hears of it: a
    /// stop that waits for the processes and then for the acknowledgements finds it there.
    private func complete(_ id: String, _ report: ExitReport) {
        guard let (waiters, viaBridge) = table.withLockedValue({ t -> ([CheckedContinuation<ExitReport, Never>], Bool)? in
            guard let waiters = t.finish(id, report) else { return nil }
            return (waiters, t[id]?.viaBridge ?? false)
        }) else { return }
        if viaBridge, let channel = session.withLockedValue({ $0.bridgeChannel }) {
            let frame = ControlFrame(type: BridgeMessageType.exit.rawValue, id: 0, body: ControlJSON.encode(report))
            Task { try? await channel.send(frame.encoded) }
        }
        for waiter in waiters { waiter.resume(returning: report) }
        changes.notify()
    }

    /// Exits the hello had no room for (thousands ended during one blackout) go out now, one
    /// frame each; the host acknowledges repeats, so sending one twice is harmless.
    private func resendExitsLeftOutOfTheHello() {
        let exits = table.withLockedValue { $0.unacknowledgedExits }
        let (inHello, omitted) = FrameBudget.fit(exits, budget: FrameBudget.bytes / 2) { BridgeHello(bootID: "", processes: [], exits: $0) }
        guard omitted > 0, let channel = session.withLockedValue({ $0.bridgeChannel }) else { return }
        let rest = exits.dropFirst(inHello.exits.count)
        Task {
            for report in rest {
                let frame = ControlFrame(type: BridgeMessageType.exit.rawValue, id: 0, body: ControlJSON.encode(report))
                try? await channel.send(frame.encoded)
            }
        }
    }

    func broker() -> ControlClient? { brokerClient.current }

    /// Every process by id, with creates still in progress as `starting` (pid 0).
    private func processStatuses() -> [ProcessStatus] { table.withLockedValue { $0.statuses } }

    // MARK: Processes

    /// Starts a process and hands its stdio to the broker; on any failure the process is gone
    /// and every fd closed. A repeat of a create (same id and idempotency key) starts nothing:
    /// it answers with the first one's pid, waiting for the first if it is still starting.
    public func launch(_ spec: ProcessSpec, viaBridge: Bool = false) async throws(HoldfastError) -> LaunchResponse {
        var answered = false
        defer { if !answered { metrics.processStartFailed() } }
        guard !session.withLockedValue({ $0.shuttingDown }) else {
            throw HoldfastError(.shuttingDown, "the daemon is shutting down")
        }
        try Launcher.validate(spec)
        try refuseTheBrokersUID(spec)
        let decision = table.withLockedValue { table in
            table.creates.decide(id: spec.id, key: spec.idempotencyKey, live: table[spec.id].map { ($0.idempotencyKey, $0.pid) })
        }
        let reservation: CreateLedger.PendingStart
        switch decision {
        case .exists:
            throw HoldfastError(.processExists, "a process with id '\(spec.id)' exists")
        case .repeated(let pid):
            logger.info("create repeated: already started", metadata: ["process": "\(spec.id)", "pid": "\(pid)"])
            answered = true
            return LaunchResponse(pid: pid, repeated: true)
        case .join(let first):
            logger.info("create repeated while the first is starting: waiting for it", metadata: ["process": "\(spec.id)"])
            switch await first.wait() {
            case .success(let pid):
                answered = true
                return LaunchResponse(pid: pid, repeated: true)
            case .failure(let error): throw error
            }
        case .start(let pending):
            reservation = pending
        }
        do {
            let pid = try await startProcess(spec, viaBridge: viaBridge)
            reservation.resolve(.success(pid))
            answered = true
            return LaunchResponse(pid: pid)
        } catch {
            table.withLockedValue { $0.creates.release(id: spec.id) }
            reservation.resolve(.failure(error))
            throw error
        }
    }

    /// Starts the process of a create that holds its id's reservation; the record replaces the
    /// reservation in one step.
    private func startProcess(_ spec: ProcessSpec, viaBridge: Bool) async throws(HoldfastError) -> pid_t {
        // A broker starting (the daemon just came up) or restarting is waited for, not an error.
        guard let broker = await brokerClient.wait(timeout: Self.brokerWait) else {
            throw HoldfastError(.brokerUnavailable, "the broker has not been running for \(Self.describe(Self.brokerWait))")
        }
        let started: Launcher.Started
        var container: ProcessTable.Entry.Container?
        switch spec.runtime ?? .direct {
        case .direct:
            started = try Launcher.start(spec)
        case .runc:
            if let target = spec.container {
                guard let target = entry(target), let targetContainer = target.container else {
                    throw HoldfastError(.noSuchContainer, "no runc container '\(target)'")
                }
                guard target.phase == .running else {
                    throw HoldfastError(.notRunning, "container '\(target.id)' has exited")
                }
                started = try await runc.exec(spec, in: targetContainer.id, bundle: targetContainer.bundle)
            } else {
                started = try await runc.create(spec)
                container = .init(id: spec.id, bundle: spec.bundle!)
            }
        }
        let entry = ProcessTable.Entry(
            id: spec.id, pid: started.pid, viaBridge: viaBridge, container: container, idempotencyKey: spec.idempotencyKey,
            leadsProcessGroup: (spec.runtime ?? .direct) == .direct, streams: started.adopt.streams)
        metrics.processStarted(spec.runtime ?? .direct)
        if !started.adopt.streams.isEmpty {
            do {
                _ = try await broker.request(
                    BrokerRequest.adopt(started.adopt).frameType, body: BrokerRequest.adopt(started.adopt).body, descriptors: started.descriptors)
            } catch {
                for fd in started.descriptors { close(fd) }
                kill(started.pid, SIGKILL)
                _ = await reaper.wait(started.pid)
                if let container { await runc.delete(container.id) }
                throw error
            }
        }
        for fd in started.descriptors { close(fd) }  // the broker has them now
        table.withLockedValue { $0.started(entry) }
        logger.info("process started", metadata: [
            "process": "\(spec.id)", "pid": "\(started.pid)", "runtime": "\((spec.runtime ?? .direct).rawValue)", "argv": "\(spec.argv)",
        ])
        Task { await watch(entry) }
        return started.pid
    }

    /// Waits for the process to exit, lets its output drain, then reports the exit.
    private func watch(_ entry: ProcessTable.Entry) async {
        let status = await reaper.wait(entry.pid)
        if let container = entry.container { await runc.delete(container.id) }
        var signal: Int32?
        if case .signaled(let number) = status { signal = number }
        let report = ExitReport(id: entry.id, exitCode: status.code, signal: signal, undelivered: 0)
        table.withLockedValue { $0.exited(entry.id, report) }
        logger.info("process exited", metadata: ["process": "\(entry.id)", "status": "\(status)"])
        metrics.processExited()
        guard !entry.streams.isEmpty, let broker = broker() else {
            complete(entry.id, report)
            return
        }
        var exited = ProcessExitedRequest(process: entry.id)
        if let deadline = session.withLockedValue({ $0.drainDeadline }) {
            // Stopping: the drain may take only what is left before the exits must go out.
            let left = max(Duration.zero, deadline - ContinuousClock.now)
            exited.drainTimeoutMilliseconds = Int(left.components.seconds * 1000 + left.components.attoseconds / 1_000_000_000_000_000)
        }
        do {
            _ = try await broker.call(BrokerRequest.processExited(exited), reply: [String: String].self)
        } catch {
            complete(entry.id, report)
        }
        // The `drained` notification finishes it (processDrained).
    }

    private func processDrained(_ drained: DrainedNotification) {
        guard var report = entry(drained.process)?.report else { return }
        report.undelivered = drained.streams.reduce(0) { $0 + $1.undelivered }
        complete(drained.process, report)
    }

    /// The exit report once the process is done: exited, and its output drained (or given up
    /// on), so `undelivered` is final. The process is forgotten once its exit is taken.
    public func wait(_ id: String) async throws(HoldfastError) -> ExitReport {
        guard let pid = entry(id)?.pid else { throw HoldfastError(.noSuchProcess, "no process '\(id)'") }
        let report = await exitReport(id)
        table.withLockedValue { $0.forget(id, pid: pid) }
        return report
    }

    /// Waits for `id`'s final exit report (the process must be in the table).
    private func exitReport(_ id: String) async -> ExitReport {
        await withCheckedContinuation { continuation in
            if let done = table.withLockedValue({ $0.wait(for: id, continuation) }) { continuation.resume(returning: done) }
        }
    }

    public func signal(_ id: String, _ signal: Int32) async throws(HoldfastError) {
        guard let record = entry(id) else {
            throw HoldfastError(.noSuchProcess, "no process '\(id)'")
        }
        guard record.phase == .running else { throw HoldfastError(.notRunning, "process '\(id)' has exited") }
        if let container = record.container {
            try await runc.kill(container.id, signal: signal)
            return
        }
        guard kill(record.pid, signal) == 0 else {
            throw HoldfastError(.signalFailed, "kill(\(record.pid), \(signal)): \(String(cString: strerror(errno))) (errno \(errno))")
        }
    }

    // MARK: Status

    /// Every stream the broker holds, page by page (one reply holds what fits a frame).
    func brokerStreams() async -> [StreamStatus] {
        guard let broker = broker() else { return [] }
        var streams: [StreamStatus] = []
        while true {
            guard let page = try? await broker.call(BrokerRequest.list(ListRequest(offset: streams.count)), reply: ListResponse.self),
                !page.streams.isEmpty
            else { break }
            streams += page.streams
            if streams.count >= (page.total ?? streams.count) { break }
        }
        return streams
    }

    public func status() async -> StatusReport {
        let streams = await brokerStreams()
        return StatusReport(
            version: HoldfastVersion.string, pid: getpid(),
            uptimeSeconds: Double((ContinuousClock.now - startedAt).components.seconds), bridge: session.withLockedValue { $0.bridge },
            roles: roleStatuses, processes: processStatuses(),
            streams: streams)
    }

    /// The pid of a role (tests kill it to prove it comes back).
    public func rolePID(_ name: String) -> pid_t? {
        session.withLockedValue { name == "broker" ? $0.broker?.pid : $0.bridgeWorker?.pid }
    }

    private var roleStatuses: [RoleStatus] {
        session.withLockedValue { [$0.broker?.status, $0.bridgeWorker?.status].compactMap { $0 } }
    }

    // MARK: Shutdown

    /// The first step of a stop (the `ShutdownSequence` service, run while the roles, the bridge
    /// and the control socket still serve): signals every container process (then SIGKILL after
    /// the grace period), lets the relays drain, reports every exit — all within the shutdown
    /// timeout, whose last part belongs to the host's acknowledgements. The roles stop after it.
    private func stopProcesses() async {
        session.withLockedValue { $0.shuttingDown = true }
        let timeout = Duration.milliseconds(configuration.shutdown.timeout)
        let deadline = ContinuousClock.now + timeout
        // The last part of the timeout belongs to the exits: every drain ends before it, so each
        // exit this stop causes is reported while the bridge is still up.
        let acknowledgementWindow = min(.seconds(2), timeout / 4)
        let drainsEnd = deadline - acknowledgementWindow
        session.withLockedValue { $0.drainDeadline = drainsEnd }
        // The bridge stays up while the processes stop (new creates are refused as
        // `shutting-down`): their exits, after their output, still reach the host.
        for entry in table.withLockedValue({ Array($0.entries) }) where entry.phase == .running {
            kill(entry.pid, configuration.shutdown.signal)
        }
        let graceEnd = min(drainsEnd, ContinuousClock.now + .milliseconds(configuration.shutdown.grace))
        var clean = await waitUntilEveryProcessIsDone(until: graceEnd)
        if !clean {
            for entry in table.withLockedValue({ Array($0.entries) }) where entry.phase != .done {
                if entry.phase == .running {
                    logger.warning("process did not stop in time: SIGKILL", metadata: ["process": "\(entry.id)"])
                    kill(entry.pid, SIGKILL)
                }
                // A direct process leads its own process group: what it left behind (an orphan
                // holding its output open, which would hold the drain) ends with it.
                if entry.leadsProcessGroup { kill(-entry.pid, SIGKILL) }
            }
            clean = await waitUntilEveryProcessIsDone(until: drainsEnd)
        }
        // A process that exited but whose output could not drain in time (a host that reads
        // nothing, a stream parked with the bridge down) is reported now, marked as cut short:
        // never an exit the host waits for forever.
        for entry in table.withLockedValue({ Array($0.entries) }) where entry.phase == .exited {
            guard var report = entry.report else { continue }
            report.outputCutShort = true
            logger.warning("process output not drained before the stop: exit reported now", metadata: ["process": "\(entry.id)"])
            complete(entry.id, report)
        }
        // Give a connected host a moment to acknowledge those exits (bounded: a host that does
        // not answer must not hold the stop); what it did not acknowledge is lost with us.
        await waitUntil(deadline) { [self] in
            session.withLockedValue { $0.bridge != .up } || table.withLockedValue { $0.unacknowledgedExits.isEmpty }
        }
        stopWasClean.withLockedValue { $0 = clean }
    }

    /// Waits until every process reported its exit (output drained), or `deadline`.
    private func waitUntilEveryProcessIsDone(until deadline: ContinuousClock.Instant) async -> Bool {
        await waitUntil(deadline) { [self] in table.withLockedValue { t in t.entries.allSatisfy { $0.phase == .done } } }
    }

    /// Waits until `condition` holds or `deadline` passes; re-checked at every change (a
    /// process done, an exit acknowledged, the bridge up or down), never polled.
    @discardableResult
    private func waitUntil(_ deadline: ContinuousClock.Instant, _ condition: () -> Bool) async -> Bool {
        while true {
            let generation = changes.generation
            if condition() { return true }
            let left = deadline - ContinuousClock.now
            guard left > .zero else { return false }
            await changes.wait(since: generation, timeout: left)
        }
    }
}
