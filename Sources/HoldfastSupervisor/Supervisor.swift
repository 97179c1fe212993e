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
    /// Configured values a live upgrade could not apply (`keep` in `init`).
    let settingsAwaitingRestart: [StatusReport.PendingSetting]?
    let logger: Logger
    let executable: String
    let reaper = ChildReaper()
    /// A cgroup per direct process: nil until `run` took them (after the run directory is
    /// claimed: a daemon refused at start leaves nothing in the cgroup tree), and where the
    /// system has none to give.
    var cgroups: ProcessCgroups? { processCgroups.withLockedValue { $0 } }
    let processCgroups = NIOLockedValueBox<ProcessCgroups?>(nil)
    /// Which processes the OOM killer killed, from the kernel's log: nil until `run` opened it,
    /// and where it cannot be read (`takeKernelLog`).
    var kernelLog: KernelOOMLog? { openedKernelLog.withLockedValue { $0 } }
    let openedKernelLog = NIOLockedValueBox<KernelOOMLog?>(nil)
    /// The processes this image forked, by id, until their exit is recorded: signals go through
    /// their registration (`ChildReaper.signal`), never to a pid the kernel may have reused.
    let forked = NIOLockedValueBox<[String: ChildReaper.Child]>([:])
    /// The last of what the supervisor told the broker about the bridge (`tellBroker`): each
    /// one is sent once the one before it was answered, so the broker hears them in order.
    let brokerNoticeTail = NIOLockedValueBox<Task<Void, Never>?>(nil)
    /// The requests the broker left unanswered past their bound and has still not answered, by
    /// key (`boundedRequest`: `ask`'s questions by kind, the host's requests by kind and
    /// process): one per key stays queued, never one per try.
    let overdueRequests = NIOLockedValueBox<Set<String>>([])
    /// Creates answered before the broker took their process's stdio: the adopt, by process
    /// (`lateAdoptFinished` takes each out).
    let lateAdopts = NIOLockedValueBox<[String: Task<Result<Void, HoldfastError>, Never>]>([:])
    /// Scrapes' questions to the broker in flight, for scrapes to share (`sharedScrapeQuestion`).
    let questionsInFlight = NIOLockedValueBox<[String: Task<BrokerRequestOutcome, Never>]>([:])
    /// Each terminal process's slave end, held open from its start until its exit by process
    /// id (`PseudoTerminal.openPeer`): the process may close its terminal and open it again,
    /// and its output relay must not read the end meanwhile. Closed at the exit, so that the
    /// master then reads its rest and the end. Not carried across a live upgrade (close-on-exec).
    let terminalPeers = NIOLockedValueBox<[String: Int32]>([:])
    /// Creates that failed to start, said in the log once per 10 s per error code (a host
    /// retrying a create that cannot start must not flood it).
    let startFailureLog = NIOLockedValueBox(LogPacer<HoldfastError.Code>(interval: .seconds(10)))
    /// When the daemon started (before every live upgrade since: its uptime spans them).
    let startedAt: ContinuousClock.Instant
    /// The broker's control channel while it runs; a create waits for it while it (re)starts.
    let brokerClient = Rendezvous<ControlClient>()
    /// The creates' adopts being awaited: a stop's drains' end ends them.
    let adoptsUnderWay = AdoptsUnderWay()
    /// How long a create waits for a broker that is starting or restarting.
    static let brokerWait = Duration.seconds(15)
    /// After a broker restart, processes are handed over this many at a time (`readopt`).
    static let readoptionBatch = 8
    /// How long a broker started after a crash is tried again for a process it could not be
    /// handed for want of fds (`readopt`), and how often.
    static let readoptionFdWait: Duration = .seconds(10)
    static let readoptionRetryPause: Duration = .milliseconds(100)
    /// The most fds one create takes while it starts: the process's stdio and windows (kept),
    /// their other ends, runc's console socket and pipes (closed once it runs).
    static let descriptorsPerStart = 24
    /// Kept free for a broker restart (`refuseWhenShortOfDescriptors`): its socketpair and
    /// start-up pipe, the copies of one batch of processes' fds (up to 11 each), a control client.
    static let descriptorReserve = 128
    /// The processes, the create ledger and the exits the host has not acknowledged, one value
    /// under one lock (ProcessTable.swift): checking that an id is free and reserving it, or
    /// forgetting a process and remembering its key, are single steps.
    let table: NIOLockedValueBox<ProcessTable>
    /// The daemon's own moving parts: not process state, not in the table's snapshot.
    struct Session {
        var bridge: BridgeState = .down
        var broker: RoleSupervisor?
        var bridgeWorker: RoleSupervisor?
        /// The bridge worker's channel while it runs (exits are pushed through it).
        var bridgeChannel: FDChannel?
        var shuttingDown = false
        /// Creates between their last `shuttingDown` check and their process in the table (a
        /// runc create, the broker's adopt): a stop signals what they start once they are done.
        var spawnsUnderWay = 0
        /// While stopping: when every drain must be over, so that the exits still reach the host
        /// before the shutdown timeout (a process that exits now drains only until then).
        var drainDeadline: ContinuousClock.Instant?
        /// READY=1 has been sent: role restarts from now on are news.
        var ready = false
        /// Live upgrades since the daemon started (carried across them).
        var upgrades = 0
        /// Upgrades whose new binary could not take over after its exec, so that the binary
        /// before it took over again (`Resumption.fallBack`), and the last one's reason.
        var upgradesFellBack = 0
        var lastUpgradeFailure: String?
        /// A live upgrade is under way (one at a time).
        var upgrading = false
        /// A SIGHUP came while one was under way: another reload follows it (`reloadOnHangup`).
        var reloadFollows = false
        /// How many times a bridge worker said it wrote every reply it owed the host
        /// (`bridgeFinished`, asked by a stop before it stops the worker).
        var bridgeFinishes = 0
        /// The ids of the exits the last hello carried: those left out are sent once the bridge
        /// is up (`resendExitsLeftOutOfTheHello`).
        var exitsInLastHello: Set<String> = []
        /// The incarnation of the first broker this image started: the first of an image a live
        /// upgrade started takes the processes over from the upgrade, not from a crash (the log
        /// says which).
        var firstBrokerOfImage: Int?
    }
    let session = NIOLockedValueBox(Session())
    /// Rings when a process finishes, an exit is acknowledged or the bridge changes state: the
    /// stop waits on it instead of polling.
    let changes = ChangeSignal()
    /// The bridge worker's pid once it started (readiness waits for it).
    let bridgeStarted = Rendezvous<pid_t>()
    /// systemd's notification socket (a no-op when not started by systemd with Type=notify).
    let notifier: ServiceNotifier

    let runc: RuncRuntime
    /// The seccomp program every direct process starts under (`SignalGuard`); nil when
    /// `processes.signal_guard` is off, the daemon is not root, or it could not be built.
    let signalGuard: SignalGuard.Programs?
    let metrics = SupervisorMetrics()
    /// Gives malloc's free pages back after bursts of requests.
    let tidier = MemoryTidier()
    /// Where resumable streams keep their progress (every broker maps it): nil if the memfd
    /// could not be made, and then a broker crash loses what the broker held.
    let checkpoints: CheckpointMemory?
    /// Where output streams keep their replay rings (every broker maps it): nil if the memfd
    /// could not be made, and then a broker crash loses what its rings held (reported).
    let rings: RingMemory?
    /// A live upgrade's new image could not map the checkpoint or ring area it was handed: it
    /// must not take over (every resumed stream would restart at 0, refused by the host) but
    /// fall back, the area's fd still open for the previous image.
    let inheritedAreaFailure: String?
    /// The host ends of every live process's stdio, and which broker has them (StdioStore.swift).
    let stdio: NIOLockedValueBox<StdioStore>
    /// The configuration file's path (a live upgrade passes it on), the path this binary runs
    /// from (what an upgrade execs again), and what the previous binary handed over, if any.
    let configPath: String?
    let selfPath: String?
    let resumption: Resumption?
    /// Creates and signals wait here while a live upgrade switches binaries.
    let upgradeGate = UpgradeGate()
    /// Roles killed at a start that failed after their spawn, until reaped (the broker's uid
    /// check does not count them as sharers).
    let rolesKilledAtStart = NIOLockedValueBox<[ChildReaper.Child]>([])
    /// How many records of the signal pipe the signal loop has handled (a live upgrade waits
    /// until it has handled every signal delivered before it held the stops:
    /// `waitForTheSignalLoop`).
    let signalsHandled = NIOLockedValueBox<UInt64>(0)
    /// Every step of the start that can fail has passed, and something now runs: a failure
    /// after a live upgrade's exec no longer falls back to the previous binary from here on.
    let tookOver = NIOLockedValueBox(false)
    /// The listening fds a live upgrade passes on.
    let controlListener = NIOLockedValueBox<Int32?>(nil)
    let handoffListener = NIOLockedValueBox<Int32?>(nil)
    let metricsListener = NIOLockedValueBox<Int32?>(nil)
    /// The run directory's lock file's fd, passed across a live upgrade's exec.
    let runLockDescriptor = NIOLockedValueBox<Int32?>(nil)
    /// Control clients that connected while a live upgrade was under way, not read from yet.
    let parkedControl = NIOLockedValueBox<[Int32]>([])
    /// The sha256 of the running executable, computed once (`status`).
    let executableDigest = NIOLockedValueBox<String??>(nil)
    /// New at every start, in every hello: tells the host a daemon restart from a lost connection.
    var instanceID: String { table.withLockedValue { $0.instanceID } }

    /// `executable` is what the roles run: `/proc/self/exe` keeps them on this very binary even
    /// after a package upgrade has replaced the file (a restarted role must speak our protocol).
    /// `configPath` is what a live upgrade passes to the next binary (no upgrade without it);
    /// `resuming` is what the previous binary handed this one (Supervisor+Upgrade.swift).
    public init(
        configuration: DaemonConfiguration, logger: Logger, executable: String, notifier: ServiceNotifier? = nil, configPath: String? = nil,
        resuming: Resumption? = nil
    ) {
        var configuration = configuration
        var kept: [String] = []
        let configured = configuration
        if let state = resuming?.state {
            // What the passed fds are fixed for their life: a changed value takes effect at the
            // next start, not across a live upgrade (the rest of the configuration does).
            func keep<Value: Equatable>(_ key: String, _ path: WritableKeyPath<DaemonConfiguration, Value>, _ running: Value) {
                guard configuration[keyPath: path] != running else { return }
                logger.warning("\(key) changed: it takes effect at the next start, not across a live upgrade", metadata: [
                    "running": "\(running)", "configured": "\(configuration[keyPath: path])",
                ])
                configuration[keyPath: path] = running
                kept.append(key)
            }
            keep("streams.ring_capacity", \.streams.ringCapacity, state.ringCapacity)
            keep("run_directory", \.runDirectory, state.runDirectory)
            keep("control.socket", \.control.socket, state.controlSocket)
            keep("handoff.socket", \.handoff.socket, state.handoffSocket)
            // runc keeps each running container's state under its root, and every later call
            // for it (exec, kill, delete) must name that root: a changed one (or a changed
            // run_directory, through the default "{run}/runc") left every container running
            // unmanageable — "container does not exist" — and its state undeleted.
            if let running = state.configuration?.runc.root { keep("runc.root", \.runc.root, running) }
            // Its listener is passed across the exec like the sockets above: a removed or changed
            // address left it adopted by nobody, never closed — scrapes hung in its backlog.
            if state.descriptors.metrics != nil, let running = state.configuration?.metrics.address {
                keep("metrics.address", \.metrics.address, running)
            }
        }
        self.configuration = configuration
        // Said by `holdfast upgrade` and `holdfast status` too: before, only the log said that
        // a reload left a changed ring capacity (or socket, or runc root) as it was.
        if !kept.isEmpty {
            let (wanted, running) = (configured.effectiveValues, configuration.effectiveValues)
            // In the file's syntax, as `holdfast config check` shows them ("" for none).
            func shown(_ value: String?) -> String { value.map { $0.isEmpty ? "\"\"" : $0 } ?? "?" }
            settingsAwaitingRestart = kept.map {
                StatusReport.PendingSetting(key: $0, running: shown(running[$0]?.value), configured: shown(wanted[$0]?.value))
            }
        } else {
            settingsAwaitingRestart = nil
        }
        self.logger = logger
        self.executable = executable
        self.configPath = configPath
        self.resumption = resuming
        self.selfPath = ProcessImage.executablePath()
        self.notifier = notifier ?? ServiceNotifier(environment: [:], logger: logger)
        startedAt = ContinuousClock.now - .milliseconds(Int64((resuming?.state.uptimeSeconds ?? 0) * 1000))
        table = NIOLockedValueBox(resuming?.table ?? ProcessTable(instanceID: RandomIdentifier.make()))
        var checkpointError: (any Error)?
        do {
            if let fd = resuming?.state.descriptors.checkpoints {
                if resuming?.fellBack == nil, Failpoint.once(Failpoint.inheritedAreaFails, process: "supervisor") {
                    throw SystemError("mmap(memfd) (failpoint)", errno: .init(rawValue: ENOMEM))
                }
                checkpoints = try CheckpointMemory.inherit(fd)
            } else {
                checkpoints = try CheckpointMemory.create()
            }
        } catch {
            checkpoints = nil
            checkpointError = error
        }
        if let snapshot = resuming?.state.stdio {
            stdio = NIOLockedValueBox(StdioStore(restoring: snapshot))
        } else {
            stdio = NIOLockedValueBox(StdioStore(slots: checkpoints?.slotCount ?? 0))
        }
        var inheritedAreaFailure: String?
        if let checkpointError {
            // Only a new image falls back for it: an image fallen back to has nowhere to go, and
            // runs on without the area rather than end every container.
            if resuming?.state.descriptors.checkpoints != nil, resuming?.fellBack == nil {
                inheritedAreaFailure = "cannot map the checkpoint area: \(checkpointError)"
            }
            logger.error("no checkpoint area: streams will not survive a broker crash", metadata: ["error": "\(checkpointError)"])
        }
        do {
            if let fd = resuming?.state.descriptors.rings {
                rings = try RingMemory.inherit(fd, capacity: configuration.streams.ringCapacity, blockSize: ReplayRing.defaultBlockSize)
            } else {
                rings = checkpoints == nil ? nil : try RingMemory.create(capacity: configuration.streams.ringCapacity, blockSize: ReplayRing.defaultBlockSize)
            }
        } catch {
            rings = nil
            if resuming?.state.descriptors.rings != nil, resuming?.fellBack == nil {
                inheritedAreaFailure = inheritedAreaFailure ?? "cannot map the ring area: \(error)"
            }
            logger.error("no ring area: a broker crash will lose what its rings held (reported)", metadata: ["error": "\(error)"])
        }
        self.inheritedAreaFailure = inheritedAreaFailure
        signalGuard = Self.makeSignalGuard(enabled: (configuration.processes ?? .init()).signalGuard, logger: logger)
        runc = RuncRuntime(
            path: configuration.runc.path, root: configuration.runc.root, workDirectory: configuration.runDirectory + "/runc-work",
            records: RuncContainerRecords(directory: configuration.runDirectory + "/runc-containers"), reaper: reaper, logger: logger,
            signalGuard: signalGuard)
        if let state = resuming?.state {
            reaper.seed(Dictionary(state.reaped.map { ($0.pid, $0.status) }, uniquingKeysWith: { first, _ in first }))
            session.withLockedValue {
                $0.upgrades = state.upgrades
                $0.upgradesFellBack = state.upgradesFellBack ?? 0
                $0.lastUpgradeFailure = state.lastUpgradeFailure
                if let reason = resuming?.fellBack {
                    // The state counted the upgrade that did not happen.
                    $0.upgrades = max(0, state.upgrades - 1)
                    $0.upgradesFellBack += 1
                    $0.lastUpgradeFailure = reason
                }
            }
        }
    }

    /// The signal guard's program, or nil (said in the log either way but the default).
    static func makeSignalGuard(enabled: Bool, logger: Logger) -> SignalGuard.Programs? {
        guard enabled else {
            logger.warning("processes.signal_guard is off: a root direct process, or anything it starts, can stop or reload the daemon with a signal")
            return nil
        }
        // Installing a filter without no_new_privs takes CAP_SYS_ADMIN, which a daemon run as
        // another user does not have (and its processes, of its own uid, could signal it anyway).
        guard geteuid() == 0 else { return nil }
        do {
            return try SignalGuard.Programs(protecting: getpid(), group: getpgrp())
        } catch {
            logger.error("no signal guard for direct processes: a root one could stop the daemon with a signal", metadata: ["error": "\(error)"])
            return nil
        }
    }

    // MARK: Running

    /// Runs until SIGTERM or SIGINT, then shuts down; returns the exit code.
    /// Refuses to start (`StartRefused`, exit code 2) on an unsafe run directory, another
    /// daemon holding it, a broker uid other processes use, or a socket path that is not ours.
    public func run() async throws -> Int32 {
        // After a live upgrade the sockets are ours already, listening (passed across the exec).
        if let inheritedAreaFailure { throw StartRefused("the live upgrade's new image cannot take over: \(inheritedAreaFailure)") }
        let lock = try claimRunDirectory(socketsPassed: resumption != nil, lockPassed: resumption?.state.descriptors.runLock)
        defer {
            // Falling back: the previous image takes the lock over through this fd.
            if resumption != nil, !tookOver.withLockedValue({ $0 }) { lock.leaveOpen() }
            withExtendedLifetime(lock) {}
        }
        runLockDescriptor.withLockedValue { $0 = lock.descriptor }
        if resumption == nil { try checkBrokerUIDIsItsOwn() }
        try Subreaper.become()
        let signals = try SignalPipe(signals: Self.handledSignals)
        SignalDisposition.ignore(SIGPIPE)
        try makeRunDirectory()
        let handoff: Listener?
        let control: Listener
        let metrics: DaemonService?
        // Listeners passed across a live upgrade's exec, adopted: given back open if this image
        // fails before it took over, for the previous one it falls back to. (Released, each closed
        // its fd: the fallback then adopted closed fds — or numbers its own files had taken since.)
        var adopted: [Listener] = []
        do {
            if let descriptors = resumption?.state.descriptors {
                handoff = try descriptors.handoff.map { try Listener(adopting: $0, address: .unix(path: configuration.handoff.socket)) }
                if let handoff {
                    adopted.append(handoff)
                    // `handoff.mode` takes effect across a reload (the socket is passed, not bound
                    // again: before, a widened mode was left as it was, and a runtime in the newly
                    // allowed group kept getting EACCES with nothing said).
                    if chmod(configuration.handoff.socket, mode_t(configuration.handoff.mode)) != 0 {
                        logger.warning("cannot set handoff.mode on the handoff socket", metadata: [
                            "socket": "\(configuration.handoff.socket)", "errno": "\(errno)",
                        ])
                    }
                }
                control = try Listener(adopting: descriptors.control, address: .unix(path: configuration.control.socket))
                adopted.append(control)
            } else {
                handoff = try bindHandoff()
                control = try Listener(binding: .unix(path: configuration.control.socket), kind: .seqpacket, unixMode: 0o600)
            }
            controlListener.withLockedValue { $0 = control.descriptor }
            handoffListener.withLockedValue { $0 = handoff?.descriptor }

            // Made here, as the last step that can fail: after a live upgrade's exec, a failure up
            // to this point hands everything back to the previous binary (`Resumption.fallBack`),
            // so nothing that runs, watches or reaps may have started before it.
            if let resumption, resumption.fellBack == nil, Failpoint.once(Failpoint.metricsAdoptionFails, process: "supervisor") {
                throw SystemError("adopting the metrics listener (failpoint)", errno: .init(rawValue: ENOMEM))
            }
            metrics = try metricsService()
        } catch {
            for listener in adopted { _ = listener.detach() }
            throw error
        }
        tookOver.withLockedValue { $0 = true }
        resumption?.tookOver()
        // The previous image blocked them for the exec (the mask survives it): pending ones
        // arrive now, to our handlers. Not before this point: a stop asked for while this image
        // could still fall back stays pending across that exec for the previous image, instead
        // of going into this image's signal pipe and with it. Unblocked on the spawn thread (the
        // main thread in `holdfast`), which lives as long as the process (the mask is per thread,
        // and the threads started meanwhile have it blocked).
        ProcessImage.unblock(Self.signalsBlockedAcrossExec)
        SpawnThread.perform { ProcessImage.unblock(Self.signalsBlockedAcrossExec) }

        notifier.status("Starting the broker and the bridge worker")
        let carried = { (name: String) in self.resumption?.state.roles.first { $0.name == name } }
        let broker = RoleSupervisor(
            name: "broker", logger: logger, reaper: reaper, launch: { [self] in try launchBroker(handoff: handoff) },
            serve: { [self] incarnation in await serveBroker(incarnation) },
            onEvent: { [self] event in roleEvent("broker", event) },
            maxBackoff: configuration.broker.restartBackoffMax.milliseconds, restarts: carried("broker")?.restarts ?? 0,
            lastExit: carried("broker")?.lastExit)
        let bridge = RoleSupervisor(
            name: "bridge", logger: logger, reaper: reaper, launch: { [self] in try launchBridge() },
            serve: { [self] incarnation in await serveBridge(incarnation) },
            onEvent: { [self] event in roleEvent("bridge worker", event) }, restarts: carried("bridge")?.restarts ?? 0,
            lastExit: carried("bridge")?.lastExit)
        takeKernelLog()
        // The processes the previous binary started are ours: their exits are waited for again.
        if resumption != nil { watchResumedProcesses() }
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
        if let metrics { services.append(metrics) }
        services += [
            DaemonService("systemd watchdog") { [notifier] in await notifier.runWatchdog() },
            DaemonService("memory tidier") { [tidier] in await tidier.run() },
            ShutdownSequence(description: "container processes") { [self] in await stopProcesses() },
        ]
        // A process holding its pipe's lock can stop a syscall of ours in the kernel (README,
        // "Security"); the reactor's watchdog takes over, and says so here.
        let stallLog = NIOLockedValueBox(LogPacer<Bool>(interval: .seconds(10)))
        // Its queue made now, not at a first use that might meet a full fd table.
        _ = ForeignCloser.shared
        Reactor.shared.onStall { [logger] stall in
            guard let unsaid = stallLog.withLockedValue({ $0.note(stall.tookOver) }) else { return }
            var metadata = Logger.Metadata(uniqueKeysWithValues: stall.fields.map { ($0, .string($1)) })
            if unsaid > 0 { metadata["unsaid"] = "\(unsaid)" }
            logger.log(level: stall.tookOver ? .warning : .error, "\(stall.message)", metadata: metadata)
        }
        // Last before anything serves: every check that can refuse the start has passed.
        await takeProcessCgroups()
        if resumption != nil { reportExitsRecordedBeforeTheUpgrade() } else { await endContainersAnEarlierDaemonLeft() }
        let group = ServiceGroup(configuration: ServiceGroupConfiguration(services: services, logger: logger))
        let running = Task { try await group.run() }
        let readiness = Task { [self] in
            await announceReadiness()
            if resumption?.state.reloadFollows == true { reloadAskedDuringTheUpgrade() }
        }
        if let state = resumption?.state, let reason = resumption?.fellBack {
            logger.error("live upgrade failed after its exec: the new binary could not take over, and this one took over again: every process and stream kept", metadata: [
                "pid": "\(getpid())", "version": "\(HoldfastVersion.string)", "reason": "\(reason)",
                "processes": "\(state.table.processes.count)",
            ])
        } else if let state = resumption?.state {
            logger.info("holdfast daemon resumed after a live upgrade", metadata: [
                "pid": "\(getpid())", "from": "\(state.writtenBy)", "to": "\(HoldfastVersion.string)", "upgrades": "\(state.upgrades)",
                "processes": "\(state.table.processes.count)", "descriptors": "\(state.keptDescriptors.count)",
            ])
            if let lost = state.unwrittenLogLines {
                logger.warning("up to \(lost) log lines of the image before this live upgrade were not written: stderr was not being read")
            }
        } else {
            logger.info("holdfast daemon started", metadata: [
                "pid": "\(getpid())", "bridge": "\(configuration.bridge.address)", "control": "\(configuration.control.socket)",
                "systemd": "\(notifier.isActive ? "notify" : "no")",
            ])
        }

        // Signals: children are reaped until the very end; the first SIGTERM, SIGINT or SIGQUIT
        // starts the stop; SIGHUP reloads (below); the stray ones (SIGUSR1, SIGALRM, a realtime
        // signal...) are said, at most every 10 s each, and ignored.
        let signalLoop = Task { [self] in
            reaper.reapAll()
            var stopping = false
            var tracees = TraceeNotes()
            var strays = LogPacer<Int32>(interval: .seconds(10))
            var refusals = LogPacer<Int32>(interval: .seconds(10))
            var bursts = SignalBurstLimit()
            while let received = await signals.next() {
                // Counted once handled (a stop's `beginStop` included), whichever way the
                // iteration ends.
                defer { signalsHandled.withLockedValue { $0 += 1 } }
                let signal = received.number
                switch signal {
                case SIGCHLD:
                    reaper.reapAll()
                    noteTraceesLetGo(&tracees)
                case SIGTERM, SIGINT, SIGQUIT:
                    guard !stopping, !refusedAsSentByAChild(received, pacer: &refusals) else { continue }
                    stopping = true
                    readiness.cancel()
                    beginStop(signal)
                    await group.triggerGracefulShutdown()
                case SIGHUP:
                    guard !stopping, !refusedAsSentByAChild(received, pacer: &refusals) else { continue }
                    reloadOnHangup()
                default:
                    self.metrics.straySignalIgnored()
                    switch bursts.arrived(signal) {
                    case .heard: break
                    case .mute:
                        muteFlood(of: received, limits: bursts, signals: signals)
                        continue
                    case .muted: continue
                    }
                    guard let unsaid = strays.note(signal) else { continue }
                    var metadata: Logger.Metadata = ["sentBy": "\(received.sender)"]
                    if let process = childNamed(by: received) { metadata["process"] = "\(process)" }
                    if unsaid > 0 { metadata["alsoIgnoredSinceLastSaid"] = "\(unsaid)" }
                    logger.notice(
                        "\(signalName(signal)) ignored: it asks nothing of holdfast (reload: SIGHUP, systemctl reload or holdfast upgrade; stop: SIGTERM)",
                        metadata: metadata)
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
        // After a start that failed once the services ran (a bad key file): no empty cgroup
        // directory left behind. Only empty ones go; a stop removed them already.
        if let cgroups {
            cgroups.removeIdle()
            cgroups.removeDirectory()
        }
        await notifier.finish()
        logger.info("holdfast daemon stopped", metadata: ["clean": "\(clean && stopWasClean.withLockedValue { $0 })"])
        return 0
    }

    /// Says whether direct processes get cgroups; on a fresh start (the run directory just
    /// claimed, so this daemon alone uses the tag) ends what a crashed predecessor's processes
    /// left in them.
    func takeProcessCgroups() async {
        let cgroups: ProcessCgroups
        switch ProcessCgroups.open(tag: ProcessCgroups.tag(runDirectory: configuration.runDirectory)) {
        case .success(let opened):
            cgroups = opened
        case .failure(let why):
            logger.notice("direct processes run without cgroups: a stop ends each one's process group only", metadata: ["reason": "\(why)"])
            return
        }
        if resumption != nil {
            // The processes the earlier image handed over keep theirs. Not those done (their
            // exits not yet taken): the earlier image released theirs, to go once empty —
            // tracked again, one an orphan still filled stayed until the daemon's stop.
            cgroups.track(table.withLockedValue { $0.entries.filter { $0.phase != .done }.compactMap(\.cgroup) })
        } else {
            let left = cgroups.cgroupNames()
            if !left.isEmpty {
                let stuck = await cgroups.endEverything(within: .seconds(2))
                logger.warning("ended what an earlier daemon's processes left running", metadata: [
                    "cgroups": "\(left.count)", "stuck": "\(stuck.count)",
                ])
            }
        }
        processCgroups.withLockedValue { $0 = cgroups }
        logger.info("direct processes run in cgroups of their own", metadata: ["directory": "\(cgroups.directory)"])
    }

    /// Opens the kernel's log for the OOM killer's records (`KernelOOMLog`); after a live
    /// upgrade, the earlier image's, read on from where it stopped, with the processes it watched
    /// and the kills it saw. Without it (no `/dev/kmsg`, no CAP_SYSLOG where
    /// `kernel.dmesg_restrict` is set, a pid namespace of the daemon's own) exits say nothing of
    /// the OOM killer but a container's count.
    func takeKernelLog() {
        if let handover = resumption?.state.kernelLog {
            openedKernelLog.withLockedValue { $0 = KernelOOMLog.adopt(handover) }
            return
        }
        do {
            let log = try KernelOOMLog.open()
            openedKernelLog.withLockedValue { $0 = log }
        } catch {
            logger.notice("exits will not say whether the OOM killer killed a process: the kernel's log cannot be read", metadata: [
                "reason": "\(error)",
            ])
        }
    }

    /// runc's containers are in no cgroup of ours (runc makes their own): at a fresh start,
    /// every container an earlier daemon made and did not delete (`RuncContainerRecords`) is
    /// one it left (a crash: its containers ran on, reparented, nobody holding their stdio,
    /// their ids taken), and is deleted with its processes. A live upgrade passes its
    /// containers on and sweeps nothing.
    func endContainersAnEarlierDaemonLeft() async {
        // The signal loop, which reaps on SIGCHLD, starts after this: runc's exits are reaped
        // here meanwhile (nothing else of ours has been started yet).
        let reaping = Task { [reaper] in
            while !Task.isCancelled {
                reaper.reapAll()
                try? await Task.sleep(for: .milliseconds(5))
            }
        }
        defer { reaping.cancel() }
        let ended = await runc.deleteRecordedContainers()
        guard !ended.isEmpty else { return }
        logger.warning("ended the runc containers an earlier daemon left", metadata: ["containers": "\(ended.sorted())"])
    }

    /// Whether every process ended and drained within the shutdown timeout.
    let stopWasClean = NIOLockedValueBox(true)

    /// The stop begins: creates are refused from now on, systemd hears why.
    /// Every signal the supervisor takes: each one whose default action would end it, so that
    /// none an operator sends by habit (`kill -HUP` to reload, `kill -USR1` for a dump, Ctrl-\ in
    /// a terminal) or by mistake (`kill -ALRM`, a realtime signal meant for another program)
    /// ends every container with it: `StraySignals`. Held across a live upgrade's exec too. Not
    /// the signals a crash raises (a bug must still end the process: its fallback or systemd
    /// takes over), nor SIGTSTP, SIGTTIN and SIGTTOU, which stop it (the streams go on).
    static let handledSignals = [SIGCHLD, SIGTERM, SIGINT, SIGQUIT, SIGHUP] + StraySignals.all

    /// A stop or a reload asked by a child of the supervisor is refused: a process the daemon
    /// runs without a pid namespace (a direct process) has the supervisor for parent, so a root
    /// one's `kill $PPID` — a script ending "its shell" — would stop the daemon and every
    /// container, or reload it. Its children are container processes, orphans it took in, runc
    /// and the roles: none of them may. An operator, systemd or a terminal is never a child of
    /// it. Logged (paced per signal); true if refused.
    func refusedAsSentByAChild(_ received: ReceivedSignal, pacer: inout LogPacer<Int32>) -> Bool {
        guard let pid = received.senderPID, pid != getpid(), reaper.isOrWasChild(pid, within: .seconds(5)) else { return false }
        metrics.signalRefused()
        guard let unsaid = pacer.note(received.number) else { return true }
        var metadata: Logger.Metadata = [
            "sentBy": "\(received.sender)", "process": "\(childNamed(by: received) ?? "(not in its table: an orphan it took in, or one it is just starting)")",
        ]
        if unsaid > 0 { metadata["alsoRefusedSinceLastSaid"] = "\(unsaid)" }
        logger.warning(
            "\(signalName(received.number)) from a child of the supervisor refused: a container process cannot stop or reload holdfast (kill $PPID in a process run without a pid namespace); stop it from outside (systemctl stop holdfast, or SIGTERM from the host's agent or a shell)",
            metadata: metadata)
        return true
    }

    /// A stray signal that comes in a flood (`SignalBurstLimit`) is left to the kernel to
    /// discard for a while: each one heard costs the supervisor a wake-up of its main thread —
    /// the one that forks every container — and a trip through this loop.
    func muteFlood(of received: ReceivedSignal, limits: SignalBurstLimit, signals: SignalPipe) {
        let signal = received.number
        signals.mute(signal)
        var metadata: Logger.Metadata = ["sentBy": "\(received.sender)"]
        if let process = childNamed(by: received) { metadata["process"] = "\(process)" }
        logger.warning(
            "\(signalName(signal)) came more than \(limits.limit) times within \(limits.window.spoken): the kernel discards it for the next \(limits.muted.spoken) (it asks nothing of holdfast)",
            metadata: metadata)
        Task {
            try? await Task.sleep(for: limits.muted)
            signals.hear(signal)
        }
    }

    /// The process (its id) or role that sent `received`, if it is one of ours.
    func childNamed(by received: ReceivedSignal) -> String? {
        guard let pid = received.senderPID else { return nil }
        if let id = table.withLockedValue({ $0.id(ofPID: pid) }) { return id }
        let roles = session.withLockedValue { [$0.broker, $0.bridgeWorker] }
        return roles.compactMap { $0 }.first { $0.pid == pid }.map { "the \($0.name) role" }
    }

    /// SIGHUP: what it asks of a daemon by habit, a reload — the live upgrade `holdfast upgrade`
    /// does (it execs the binary at the daemon's path, which reads the configuration again;
    /// sshd does the same on SIGHUP). Before, its default action ended the supervisor, and every
    /// container with it. Its outcome is logged (there is no client to answer).
    ///
    /// One that comes while an upgrade is under way is not dropped: that upgrade checked its
    /// binary before it (a package may have put a newer one at the path since), so one more
    /// reload follows it — here if it fails, in the next image if it succeeds
    /// (`UpgradeState.reloadFollows`). Any number of them make one.
    func reloadOnHangup() {
        let follows = session.withLockedValue { session in
            guard session.upgrading else { return false }
            session.reloadFollows = true
            return true
        }
        if follows {
            logger.notice("SIGHUP during a live upgrade: another reload follows it (the binary or the configuration may have changed since it began)")
            return
        }
        logger.notice("SIGHUP: reloading (a live upgrade onto the binary at the daemon's path, which reads the configuration again)")
        reload(because: "SIGHUP")
    }

    /// The reload a SIGHUP asked for during the previous image's upgrade, once this image
    /// serves. An upgrade that began here meanwhile (a SIGHUP held across the exec) began after
    /// the ask, and answers it.
    func reloadAskedDuringTheUpgrade() {
        guard session.withLockedValue({ !$0.upgrading && !$0.shuttingDown }) else { return }
        logger.notice("reloading again: a SIGHUP came during the live upgrade that started this image")
        reload(because: "SIGHUP during the last upgrade")
    }

    private func reload(because cause: String) {
        Task { [self] in
            do throws(HoldfastError) {
                try await upgrade()
            } catch {
                logger.warning("\(cause): no reload", metadata: ["reason": "\(error.message)"])
            }
        }
    }

    /// What a stop takes after shutdown.timeout: the roles stopping (each bounded), the state
    /// written, the exit.
    static let rolesStopAllowance = Duration.seconds(15)

    func beginStop(_ signal: Int32) {
        session.withLockedValue { $0.shuttingDown = true }
        logger.info("shutting down", metadata: ["signal": "\(signalName(signal))"])
        let running = table.withLockedValue { $0.ids(in: .running).count }
        // The stop takes up to shutdown.timeout, then the roles' own ends (bounded at 10 s
        // each): systemd is told, so a timeout longer than the unit's TimeoutStopSec= (45 s) is
        // not cut short by its SIGKILL of the whole cgroup — containers, and the exits and
        // output still on their way, with it.
        let bound = Duration.milliseconds(configuration.shutdown.timeout) + Self.rolesStopAllowance
        notifier.post([
            .stopping,
            .extendTimeout(microseconds: UInt64(bound.components.seconds) * 1_000_000),
            .status("Shutting down (\(signalName(signal))): stopping \(running) container process\(running == 1 ? "" : "es")"),
        ])
    }

    /// The metrics endpoint, when `metrics.address` names one.
    ///
    /// It is the one listener of ours that any guest process can take first: a TCP or vsock port
    /// above 1023 is anyone's to bind. A daemon that failed to start over it (as it did) would
    /// let an unprivileged process deny every container its service by holding a port, so the
    /// endpoint listens in the background, trying again until the port is free.
    func metricsService() throws -> DaemonService? {
        guard let address = configuration.metrics.address else {
            // An older image's state says not where its listener was: kept, it is not served.
            if let passed = resumption?.state.descriptors.metrics { close(passed) }
            return nil
        }
        // After a live upgrade it is listening already (passed across the exec).
        let adopted = try resumption?.state.descriptors.metrics.map { try Listener(adopting: $0, address: address) }
        let current = NIOLockedValueBox<(listener: Listener?, stopped: Bool)>((adopted, false))
        // Passed on by the next upgrade from now on, even before the service runs.
        if let adopted { metricsListener.withLockedValue { $0 = adopted.descriptor } }
        return DaemonService(
            "metrics endpoint",
            stop: {
                let listener = current.withLockedValue { c -> Listener? in
                    c.stopped = true
                    return c.listener
                }
                listener?.close()
            }
        ) { [self] in
            let bound: Listener? = if let adopted { adopted } else { await bindMetricsListener(address, into: current) }
            guard let listener = bound else { return }
            metricsListener.withLockedValue { $0 = listener.descriptor }
            logger.info("metrics endpoint", metadata: ["address": "\(listener.boundAddress)"])
            await MetricsEndpoint(listener: listener, logger: logger) { [self] in await metricsText() }.serve()
        }
    }

    /// Binds the metrics endpoint's listener, trying again (after 1 s, doubling to 30 s) while
    /// it cannot; nil once the daemon stops first. Said once, then every 5 minutes.
    private func bindMetricsListener(_ address: SocketAddress, into current: NIOLockedValueBox<(listener: Listener?, stopped: Bool)>) async -> Listener? {
        var pause: Duration = .seconds(1)
        var failed = 0
        var pacer = LogPacer<Int>(interval: .seconds(300))
        while !Task.isCancelled {
            do {
                let listener = try Listener(binding: address, unixMode: 0o644)
                let stopped = current.withLockedValue { c -> Bool in
                    if !c.stopped { c.listener = listener }
                    return c.stopped
                }
                guard !stopped else {
                    listener.close()
                    return nil
                }
                if failed > 0 { logger.notice("metrics endpoint: listening at last", metadata: ["address": "\(address)", "failedTries": "\(failed)"]) }
                return listener
            } catch {
                failed += 1
                if let unsaid = pacer.note(0) {
                    logger.error(
                        "metrics endpoint: cannot listen; containers are served meanwhile, and it tries again (after 1 s, doubling to 30 s)",
                        metadata: ["address": "\(address)", "error": "\(error)", "unsaid": "\(unsaid)"])
                }
            }
            try? await Task.sleep(for: pause)
            pause = min(pause * 2, .seconds(30))
        }
        return nil
    }

    /// The supervisor's metrics, then the broker's (absent while it restarts, or when it does not
    /// answer within `brokerAnswerBound`: stopped by an operator, a scrape still gets ours, and
    /// `holdfast_role_answering{role="broker"}` 0 says why the broker's part is missing).
    func metricsText() async -> String {
        var brokerPart: String?
        if let broker = broker(), let answer = await ask(broker, .metrics, reply: MetricsResponse.self), let reply = answer {
            brokerPart = reply.text
        }
        let roles = roleStatuses
        let bridgeAnswering = roles.first { $0.name == "bridge" }?.pid.map { pid in
            switch ProcessRunState.of(pid) {
            case .running: true
            case .stopped, .traced, .dying, .gone: false
            }
        }
        let (upgrades, fellBack) = session.withLockedValue { ($0.upgrades, $0.upgradesFellBack) }
        return metrics.render(
            roles: roles, answering: ["broker": brokerPart != nil, "bridge": bridgeAnswering ?? false], upgrades: upgrades, fellBack: fellBack)
            + (brokerPart ?? "")
    }

    // MARK: Service manager

    /// READY=1 once both roles are up: the broker has answered a request on its control channel
    /// (so it dropped privileges, loaded its seccomp filter and serves), and the bridge worker
    /// process runs (it was exec'd: the spawn reports exec failures). The host's bridge being
    /// reachable is not part of readiness: the worker redials it forever, and a guest service
    /// must not fail its start because the host is late.
    func announceReadiness() async {
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

    var bridgeSummary: String {
        let state = session.withLockedValue { $0.bridge }
        return "bridge to \(configuration.bridge.address) \(state == .up ? "up" : "down (redialling)")"
    }

    /// A role started, died or could not start: the status line says so (restarts only once the
    /// service is ready; the first starts are what readiness reports).
    func roleEvent(_ role: String, _ event: RoleSupervisor.Event) {
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
    func claimRunDirectory(socketsPassed: Bool = false, lockPassed: Int32? = nil) throws(StartRefused) -> RunDirectoryLock {
        do throws(RunDirectory.Refusal) {
            var passed: RunDirectoryLock?
            if let lockPassed {
                do throws(RunDirectory.Refusal) {
                    passed = try RunDirectory.claim(configuration.runDirectory, lockName: "holdfast.lock", passed: lockPassed)
                } catch {
                    // Not the lock any more (an image fallen back from closed it, its number
                    // taken since): that fd is not ours to keep; the lock is claimed anew.
                    close(lockPassed)
                    logger.warning("the run directory's lock was not passed over whole: claiming it anew", metadata: ["error": "\(error)"])
                }
            }
            let lock: RunDirectoryLock
            if let passed { lock = passed } else { lock = try RunDirectory.claim(configuration.runDirectory, lockName: "holdfast.lock") }
            var sockets: [String] = []
            if !socketsPassed {
                sockets.append(configuration.control.socket)
                if !configuration.handoff.socket.isEmpty { sockets.append(configuration.handoff.socket) }
            }
            if !socketsPassed, case .unix(let path) = configuration.metrics.address { sockets.append(path) }
            for socket in sockets { try RunDirectory.prepareSocket(socket, runDirectory: configuration.runDirectory) }
            return lock
        } catch {
            throw StartRefused("run directory: \(error)", transient: error.transient)
        }
    }

    func makeRunDirectory() throws {
        if mkdir(runc.workDirectory, 0o700) != 0, errno != EEXIST { throw SystemError.last("mkdir(\(runc.workDirectory))") }
        try runc.records.make()
    }

    /// A process by id (nil: none).
    func entry(_ id: String) -> ProcessTable.Entry? { table.withLockedValue { $0[id] } }

    /// The process table as a snapshot (what a live upgrade hands over; tests round-trip it).
    func snapshot() -> ProcessTable.Snapshot { table.withLockedValue { $0.snapshot() } }

    /// The public handoff socket, bound here as root with its configured mode, then passed down.
    func bindHandoff() throws -> Listener? {
        guard !configuration.handoff.socket.isEmpty else { return nil }
        return try Listener(
            binding: .unix(path: configuration.handoff.socket), kind: .seqpacket, unixMode: mode_t(configuration.handoff.mode))
    }
}
