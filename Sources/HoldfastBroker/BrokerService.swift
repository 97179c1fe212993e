import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import Logging
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// Serves the broker's control protocol (docs/PROTOCOL.md, "Broker control") on the
/// supervisor's socketpair and on the public handoff socket.
public final class BrokerService: Sendable {
    public let broker: Broker
    private let logger: Logger
    /// Where notifications go: the supervisor's channel, while it is connected.
    private let supervisorChannel: NIOLockedValueBox<FDChannel?>
    /// Handoff connections served and being refused (`serveHandoff`; the broker's stats read it).
    private var handoffGate: NIOLockedValueBox<HandoffConnectionGate> { broker.handoffGate }
    /// The log lines turned-away handoff connections get (a flood gets a summary, not a line each).
    private let turnAwayLog = NIOLockedValueBox(TurnAwayLog())
    /// Set by the supervisor's `open-handoff`, once every process is handed to this broker.
    private let handoffOpened = Rendezvous<Bool>()

    /// Who may use a request: the supervisor may do everything; a handoff peer only manages
    /// (lists, releases, resizes, ends) the processes handed over by its own uid.
    enum Caller: Sendable {
        case supervisor
        case handoff(PeerCredentials)

        var owner: ProcessOwner {
            switch self {
            case .supervisor: return .supervisor
            case .handoff(let credentials): return .handoff(uid: credentials.uid)
            }
        }

        /// Whose processes this caller may manage, for the broker's check (made with its look-up
        /// of the process, in one step): nil for the supervisor, which manages them all.
        var manages: ProcessOwner? {
            switch self {
            case .supervisor: return nil
            case .handoff: return owner
            }
        }
    }

    public init(settings: BrokerSettings, logger: Logger, checkpoints: CheckpointMemory? = nil, rings: RingMemory? = nil) {
        self.logger = logger
        let channel = NIOLockedValueBox<FDChannel?>(nil)
        self.supervisorChannel = channel
        self.broker = Broker(settings: settings, logger: logger, checkpoints: checkpoints, rings: rings) { notification in
            // The kernel gives the supervisor its own copies of the fds: ours close either way.
            defer { for fd in notification.descriptors { _ = close(fd) } }
            guard let channel = channel.withLockedValue({ $0 }) else { return }
            do {
                try await channel.send(notification.frame.encoded, descriptors: notification.descriptors)
            } catch {
                // A notification the supervisor never hears (a `drained`, a `handoff-deposited`)
                // leaves it believing what is no longer so, for good. This broker ends instead:
                // its channel closed, it exits, and the next one is handed everything again.
                logger.critical("cannot tell the supervisor: ending the channel (a broker restart costs nothing)", metadata: [
                    "error": "\(error)", "notification": "\(notification.frame.type)",
                ])
                channel.close()
            }
        }
    }

    /// fds kept free for redials and the control channel (`ProcessFigures.ensureDescriptorRoom`).
    static let descriptorReserve = 64

    /// How long a quiesce waits for every stream to be outside a take.
    static let quiesceLimit = Duration.seconds(2)
    /// The longest the handoff socket waits for `open-handoff` (a takeover of thousands of
    /// processes on a loaded guest takes seconds).
    static let handoffOpenLimit = Duration.seconds(60)

    // MARK: The supervisor's channel

    /// Serves the supervisor's socketpair until it closes (the supervisor died or shut down).
    public func serveSupervisor(_ channel: FDChannel) async {
        supervisorChannel.withLockedValue { $0 = channel }
        await serve(channel, caller: .supervisor)
        supervisorChannel.withLockedValue { $0 = nil }
    }

    // MARK: The handoff socket

    /// Accepts runtimes on the handoff listener (already bound by the supervisor, as root, with
    /// mode 0660). Each peer is checked with SO_PEERCRED before anything else, and what it may
    /// hold is bounded by `handoffGate`: any process that can connect costs an fd per connection,
    /// and the broker's fds are what its streams redial with.
    public func serveHandoff(_ listener: Listener) async {
        // Not before the supervisor says every process is back (`open-handoff`): connections
        // wait in the listener's backlog meanwhile. Bounded, in case that word never comes.
        if await handoffOpened.wait(timeout: Self.handoffOpenLimit) == nil {
            logger.warning("the supervisor did not say every process was handed back: the handoff socket is served all the same", metadata: [
                "waited": "\(Self.handoffOpenLimit.spoken)",
            ])
        }
        var failures = LogPacer<Int>(interval: .seconds(10))
        while !Task.isCancelled {
            // Connections turned away close on closer threads (`ForeignCloser`): a flood must not
            // outrun those closes and take the fds the streams redial with.
            await ForeignCloser.letClosesCatchUp()
            guard let connection = await listener.nextConnection(failed: { error in
                guard let unsaid = failures.note(0) else { return }
                logger.warning("handoff accept failed; the connection waits and is accepted again", metadata: [
                    "error": "\(error)", "unsaid": "\(unsaid)",
                ])
            }) else { return }
            let channel = FDChannel(connection)
            let credentials: PeerCredentials
            do {
                credentials = try PeerCredentials.of(channel.socket)
            } catch {
                logger.warning("handoff peer without credentials", metadata: ["error": "\(error)"])
                channel.closeForeign()
                continue
            }
            // Decided here, on the accepting task, so a flood never becomes a task per connection.
            let settings = broker.settings
            let allowed = settings.handoffAllowedUIDs.contains(credentials.uid) || settings.handoffAllowedGIDs.contains(credentials.gid)
            let verdict = handoffGate.withLockedValue { gate in
                gate.admit(allowed: allowed) {
                    (try? ProcessFigures.ensureDescriptorRoom(
                        needed: 1, reserve: Self.descriptorReserve, holder: "the broker", keptFor: "for the streams it serves to redial")) != nil
                }
            }
            switch verdict {
            case .serve:
                Task {
                    defer { handoffGate.withLockedValue { $0.release(verdict) } }
                    defer { channel.closeForeign() }
                    await serve(channel, caller: .handoff(credentials))
                }
            case .refuse(let refusal):
                Task {
                    defer { handoffGate.withLockedValue { $0.release(verdict) } }
                    defer { channel.closeForeign() }
                    await refuse(channel, credentials, why: refusal)
                }
            case .drop:
                channel.closeForeign()
                logTurnedAway(dropped: true) {
                    logger.warning(
                        "handoff connection closed at once: every place to serve or refuse one is taken",
                        metadata: ["pid": "\(credentials.pid)", "uid": "\(credentials.uid)", "gid": "\(credentials.gid)"])
                }
            }
        }
    }

    /// Answers the peer's first request (closing any fds it attached) rather than hang up on
    /// connect, so the client reads why instead of hitting a broken pipe; waits at most 2 s.
    private func refuse(_ channel: FDChannel, _ credentials: PeerCredentials, why refusal: HandoffConnectionGate.Refusal) async {
        let metadata: Logger.Metadata = ["pid": "\(credentials.pid)", "uid": "\(credentials.uid)", "gid": "\(credentials.gid)"]
        let error: HoldfastError
        switch refusal {
        case .notAllowed:
            logTurnedAway(dropped: false) { logger.warning("handoff peer refused", metadata: metadata) }
            error = HoldfastError(.permissionDenied, "uid \(credentials.uid) / gid \(credentials.gid) may not use the handoff socket")
        case .full:
            let most = broker.settings.handoffMaxConnections
            logTurnedAway(dropped: false) { logger.warning("handoff connection refused: the broker serves \(most) at once", metadata: metadata) }
            error = HoldfastError(
                .tooManyConnections,
                "the broker serves \(most) handoff connections at once (handoff.max_connections); close idle ones or retry")
        case .noDescriptorRoom:
            logTurnedAway(dropped: false) {
                logger.warning("handoff connection refused: the broker's fds are kept for its streams", metadata: metadata)
            }
            error = HoldfastError(
                .tooManyOpenFiles,
                "the broker keeps its remaining fds for the streams it serves to redial; raise the daemon's hard limit "
                    + "(LimitNOFILE= in its unit) or end some processes")
        }
        let first = Task { try? await channel.receive(maxPayload: ControlFrame.headerSize + ControlFrame.defaultMaxBody) }
        let deadline = TimeoutWheel.shared.schedule(after: .seconds(2)) { first.cancel() }
        let message = await first.value
        TimeoutWheel.shared.cancel(deadline)
        message?.closeDescriptors()
        let id = message.flatMap { try? ControlFrame.decode(datagram: $0.payload).id } ?? 0
        try? await channel.send(ControlFrame(type: BrokerMessageType.error.rawValue, id: id, body: ControlJSON.encode(error)).encoded)
    }

    /// Logs a turned-away connection with `line`, or only counts it once this window's lines
    /// are spent: a flood costs the journal at most 8 lines and a summary per 10 s.
    private func logTurnedAway(dropped: Bool, line: () -> Void) {
        switch turnAwayLog.withLockedValue({ $0.note(dropped: dropped) }) {
        case .logLine(let windowStarted):
            line()
            guard windowStarted else { return }
            _ = TimeoutWheel.shared.schedule(after: Self.turnAwayLogWindow) { [self] in
                let (refusals, drops) = turnAwayLog.withLockedValue { $0.closeWindow() }
                guard refusals + drops > 0 else { return }
                let (served, refusing) = handoffGate.withLockedValue { ($0.served, $0.refusing) }
                logger.warning("handoff connections turned away without a line of their own", metadata: [
                    "refused": "\(refusals)", "closedAtOnce": "\(drops)", "served": "\(served)", "refusing": "\(refusing)",
                ])
            }
        case .counted:
            break
        }
    }

    static let turnAwayLogWindow = Duration.seconds(10)

    // MARK: Requests

    /// Serves requests until the peer closes or breaks the protocol, one at a time. Every reply,
    /// error or not, carries the request's id; a message that cannot be parsed ends this
    /// connection only.
    func serve(_ channel: FDChannel, caller: Caller) async {
        let frames = SeqpacketFrames(channel)
        let end = await RPCServer.serve(
            frames, as: BrokerRequest.self, inFlight: 1,
            notification: { _ in
                try? await frames.send(
                    ControlFrame(type: RPCFrameType.error, id: 0, body: HoldfastError(.badRequest, "a request needs a non-zero id").errorFrameBody),
                    descriptors: [])
            },
            closeDescriptors: SeqpacketFrames.closeDescriptors
        ) { [self] request, descriptors async throws(HoldfastError) -> RPCReply in
            try await handle(request, descriptors: descriptors, caller: caller)
        }
        if case .broken(let why) = end { logger.warning("control message refused", metadata: ["error": "\(why)"]) }
    }

    /// One request, decoded; what the broker checks beyond its shape (an adopt's streams, bridge
    /// events from the supervisor only) is checked here. Fds of a request it refuses are closed.
    private func handle(_ request: BrokerRequest, descriptors: [Int32], caller: Caller) async throws(HoldfastError) -> RPCReply {
        var adoption: ValidatedAdoption?
        do throws(HoldfastError) {
            switch request {
            case .adopt(let adopt):
                // Checked here, once, whoever sent it: the handoff socket's peers are local
                // runtimes the broker does not trust, and a supervisor bug must not hand the
                // broker a stream it cannot hold either.
                adoption = try AdoptCheck.validate(adopt, descriptorCount: descriptors.count)
                // The checkpoint slots are the supervisor's: a handoff peer naming one could
                // overwrite another stream's progress.
                if case .handoff = caller, adoption!.needsTheSupervisor {
                    throw HoldfastError(.permissionDenied, "only the supervisor names checkpoint slots or resumes streams")
                }
                // A new id from a runtime (the supervisor's were checked at their create; one it
                // hands back after a crash or an upgrade is taken as it is: refusing an id an older
                // release let in would lose that process's streams).
                if case .handoff = caller, let refusal = ProcessIdentifier.controlCharacterRefusal(adopt.process) {
                    throw HoldfastError(.badRequest, "process id \(refusal)")
                }
                // Its addresses too: `holdfast status` prints a parked stream's address to root's
                // terminal.
                if case .handoff = caller {
                    for stream in adopt.streams {
                        for address in [stream.address, stream.inputAddress].compactMap({ $0 }) {
                            if let refusal = TerminalText.controlCharacterRefusal(address, "addresses") {
                                throw HoldfastError(.badAddress, "\(stream.kind.rawValue) address \(refusal)")
                            }
                        }
                    }
                }
                if adopt.streams.contains(where: { $0.resume == true }),
                    Failpoint.fails(Failpoint.readoptionRefusedForFds, process: adopt.process, passes: Failpoint.firstTries)
                {
                    throw HoldfastError(.tooManyOpenFiles, "the fds sent with this request did not all arrive (failpoint)")
                }
                // A new process (nothing resumed) needs a socket per stream, and the streams
                // already held need room to redial; one taken over after a restart is let in
                // whatever the count: refusing it would only lose its streams (nor does a release
                // a crash interrupted need any: it dials nothing).
                if !adopt.streams.contains(where: { $0.resume == true }), adopt.releasing != true {
                    try ProcessFigures.ensureDescriptorRoom(
                        needed: adopt.streams.count, reserve: Self.descriptorReserve, holder: "the broker", keptFor: "for the streams it serves to redial")
                }
            case .disconnectAll, .bridgeUp:
                guard case .supervisor = caller else { throw HoldfastError(.permissionDenied, "only the supervisor sends bridge events") }
            case .quiesce:
                guard case .supervisor = caller else { throw HoldfastError(.permissionDenied, "only the supervisor stops the broker") }
            case .openHandoff:
                guard case .supervisor = caller else { throw HoldfastError(.permissionDenied, "only the supervisor opens the handoff socket") }
            case .handoffKept:
                guard case .supervisor = caller else { throw HoldfastError(.permissionDenied, "only the supervisor answers deposits") }
            case .processExited(let exited):
                // Milliseconds a peer chose: outside a day none means anything (Int.min let the
                // process go at once, its pipe still open). The host's own wait takes this range.
                if let milliseconds = exited.drainTimeoutMilliseconds, !(0...ProcessExitedRequest.longestDrainTimeout).contains(milliseconds) {
                    throw HoldfastError(
                        .badRequest, "drainTimeoutMilliseconds: \(milliseconds) is not 0 to \(ProcessExitedRequest.longestDrainTimeout) (a day)")
                }
            case .release, .list, .stats, .metrics, .closeStdin, .resize: break
            }
        } catch {
            SeqpacketFrames.closeDescriptors(descriptors)
            throw error
        }
        // Only adopt carries fds (decode refused any other request with fds).
        switch request {
        case .adopt:
            switch caller {
            case .handoff(let credentials):
                return RPCReply(try await broker.adoptFromHandoff(adoption!, descriptors: descriptors, uid: credentials.uid))
            case .supervisor:
                if adoption!.request.releasing == true {
                    try broker.keepInterruptedRelease(adoption!.request, descriptors: descriptors)
                    return .empty
                }
                // A handoff peer's process handed back after a crash stays that peer's.
                let owner = adoption!.request.handoffOwner.map { ProcessOwner.handoff(uid: $0) } ?? .supervisor
                Failpoint.pass(Failpoint.brokerCreateReceived, process: adoption!.process)
                if Failpoint.compiledIn, Failpoint.once(Failpoint.brokerCreateRefusedLate, process: adoption!.process) {
                    await Failpoint.hold(Failpoint.lateAnswer)
                    for fd in descriptors { close(fd) }
                    throw HoldfastError(.stdioFailed, "refused (failpoint \(Failpoint.brokerCreateRefusedLate))")
                }
                try broker.adopt(adoption!, descriptors: descriptors, owner: owner)
                Failpoint.pass(Failpoint.brokerCreateTaken, process: adoption!.process)
            }
            return .empty
        case .release(let process):
            let release = try await broker.release(process, by: caller.manages)
            return RPCReply(release.response, descriptors: release.descriptors, afterSent: release.afterSent)
        case .list(let page):
            let owner: ProcessOwner? = if case .supervisor = caller { nil } else { caller.owner }
            let request = page
            let all = broker.list(ownedBy: owner)
            let start = min(max(0, request.offset ?? 0), all.count)
            let page = Array(all[start..<min(all.count, start + max(1, min(request.limit ?? 1000, 1000)))])
            let (reply, _) = FrameBudget.fit(page) { ListResponse(streams: $0, total: all.count) }
            return RPCReply(reply)
        case .stats:
            return RPCReply(broker.stats())
        case .metrics:
            return RPCReply(MetricsResponse(text: broker.metricsText()))
        case .disconnectAll:
            return RPCReply(CountResponse(count: broker.disconnectAll()))
        case .bridgeUp:
            return RPCReply(CountResponse(count: broker.bridgeUp()))
        case .quiesce:
            broker.quiesce(within: Self.quiesceLimit)
            return .empty
        case .openHandoff:
            handoffOpened.set(true)
            return .empty
        case .handoffKept(let answer):
            broker.depositAnswered(answer)
            return .empty
        case .processExited(let exited):
            try await broker.processExited(exited, by: caller.manages)
            return .empty
        case .closeStdin(let process):
            try await broker.closeStdin(process, by: caller.manages)
            return .empty
        case .resize(let resize):
            try await broker.resize(resize, by: caller.manages)
            return .empty
        }
    }
}
