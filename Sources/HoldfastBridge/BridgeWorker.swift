import HoldfastCore
import HoldfastLogging
import HoldfastPosix
import HoldfastProtocol
import Logging
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// The bridge worker: dials the host's bridge, proves it holds the bridge key and checks that
/// the host does (docs/PROTOCOL.md, "Bridge authentication"), says hello, and tells the
/// supervisor when the bridge is up and when it is lost; redials forever with capped
/// exponential back-off. It parses everything the host sends, so a bug here is a crash of a
/// restartable worker, never of the stdio.
public enum BridgeWorker {
    /// How the worker authenticates the bridge.
    public enum Authentication: Sendable, Equatable {
        /// HMAC-SHA256 with the key in this file, read again before every dial (a replaced file
        /// takes effect on the next connection: key rotation without a restart).
        case keyFile(String)
        /// No handshake (`bridge.authentication: none`).
        case none
    }

    public struct Options: Sendable {
        public var address: SocketAddress
        public var authentication: Authentication
        public var reconnectInitial: Duration
        public var reconnectMax: Duration
        public var connectTimeout: Duration
        /// The host's answer must arrive within this, or the worker redials. (Its verdict, after
        /// our hello, is waited for like any reply.)
        public var handshakeTimeout: Duration

        public init(
            address: SocketAddress, authentication: Authentication, reconnectInitial: Duration, reconnectMax: Duration,
            connectTimeout: Duration = .seconds(2), handshakeTimeout: Duration = .seconds(5)
        ) {
            self.address = address
            self.authentication = authentication
            self.reconnectInitial = reconnectInitial
            self.reconnectMax = reconnectMax
            self.connectTimeout = connectTimeout
            self.handshakeTimeout = handshakeTimeout
        }
    }

    /// Where an exit the supervisor pushes goes.
    enum Link {
        /// No host: the exit is in the next hello (the supervisor keeps it until acknowledged).
        case down
        /// The hello has been taken from the supervisor and is on its way (the handshake may
        /// still be finishing): an exit now may be missing from it, so it waits here and goes
        /// out right after the hello (a repeat of one in the hello is acknowledged, not
        /// delivered twice). Bounded by the handshake timeout.
        case settingUp([ControlFrame])
        case up(StreamFrames<AsyncFD>)
    }

    /// Runs until the supervisor's channel closes.
    public static func run(supervisor: FDChannel, options: Options, logger: Logger) async {
        // Only the supervisor signals a role (SIGTERM to stop it); a stray SIGHUP, SIGUSR1 or
        // realtime signal an operator sends every holdfast process would otherwise end it.
        StraySignals.ignoreInThisRole()
        // And SIGTERM from the supervisor alone: a container's `pkill holdfast` would end it.
        do throws(SystemError) {
            let stops = try StopFromParentOnly()
            stops.sayRefusals { refused, unsaid in
                logger.warning(
                    "\(signalName(refused.number)) from another process than the supervisor ignored: only the supervisor stops the bridge worker",
                    metadata: ["sentBy": "\(refused.sender)", "alsoIgnoredSinceLastSaid": "\(unsaid)"])
            }
        } catch {
            logger.warning("cannot take SIGTERM from the supervisor alone: any process may end the bridge worker", metadata: ["error": "\(error)"])
        }
        let link = NIOLockedValueBox(Link.down)
        let (finishAsked, finishAsking) = AsyncStream.makeStream(of: Void.self)
        let client = ControlClient(channel: supervisor) { frame in
            switch frame.type {
            case BridgeMessageType.exit.rawValue:
                link.withLockedValue { link in
                    switch link {
                    case .down: break
                    case .settingUp(let waiting): link = .settingUp(waiting + [frame])
                    case .up(let frames): frames.post(frame)
                    }
                }
            case SupervisorMessageType.bridgeFinish.rawValue:
                // Not waited for here: the replies it waits for come through this very channel.
                finishAsking.yield()
            default:
                break
            }
        }
        // The host's requests from their arrival to their reply's write.
        let unanswered = UnansweredRequests()
        Task {
            for await _ in finishAsked {
                await finish(unanswered: unanswered, link: link, supervisor: client)
            }
        }
        Task {
            await client.run()
            logger.info("supervisor gone; bridge worker exiting")
            DaemonLogHandler.flush()
            exit(0)
        }
        // A flood of requests leaves free pages in malloc's arenas; they go back afterwards.
        let tidier = MemoryTidier()
        Task { await tidier.run() }
        if options.authentication == .none {
            logger.warning(
                "bridge authentication is off (bridge.authentication: none): any process in the guest can pose as this daemon to the host, and the host is not checked")
        }
        var backoff = SessionBackoff(initial: options.reconnectInitial, max: options.reconnectMax)
        // Why the bridge is down, said once per cause between two connections (at debug, a
        // guest whose host agent was down or whose address was wrong said nothing at all).
        var dialFailures = DialFailureReport()
        // The key's last problem, said once until it changes (a key provisioned after boot is
        // waited for: every `reconnect_max` a line of the same words said nothing new).
        var keyProblem: String?
        while true {
            // No key, no dial: an unauthenticated connection would be refused anyway.
            var key: BridgeKey?
            if case .keyFile(let path) = options.authentication {
                do {
                    key = try BridgeKeyFile.load(path)
                    if keyProblem != nil { logger.notice("the bridge key is usable now: dialling", metadata: ["bridge.key_file": "\(path)"]) }
                    keyProblem = nil
                } catch {
                    if keyProblem != "\(error)" {
                        logger.error("cannot use the bridge key; not dialling until it is usable (looked for again before each dial)", metadata: ["bridge.key_file": "\(error)"])
                    }
                    keyProblem = "\(error)"
                    try? await Task.sleep(for: backoff.failed())
                    continue
                }
            }
            let connection: AsyncFD
            do {
                // From a reserved port (the worker is root): the host admits it apart from what
                // any other guest process dials, which a flood cannot push out.
                connection = try await Dialer.connect(to: options.address, timeout: options.connectTimeout, fromReservedPort: true)
            } catch {
                let tell = dialFailures.failed("\(error)")
                logger.log(
                    level: tell ? .warning : .debug, "cannot reach the host's bridge; redialling",
                    metadata: ["address": "\(options.address)", "error": "\(error)", "failedDials": "\(dialFailures.failuresSinceConnected)"])
                try? await Task.sleep(for: backoff.failed())
                continue
            }
            if let failed = dialFailures.connected() {
                logger.info("reached the host's bridge after failed dials", metadata: ["address": "\(options.address)", "failedDials": "\(failed)"])
            }
            // The host proves itself first; our proof and hello go out together, then its verdict.
            // Our challenge's nonce carries the key's voucher (`makeGuestNonce`): the host tells
            // this connection from a flood by it at once, over any transport.
            if let key {
                let proven = await handshake(connection, options: options, timeout: options.handshakeTimeout, logger: logger) {
                    () async throws(BridgeHandshake.Failure) in
                    try await BridgeHandshake.proveToHost(on: connection, key: key)
                }
                guard proven else {
                    try? await Task.sleep(for: backoff.failed())
                    continue
                }
            }
            link.withLockedValue { $0 = .settingUp([]) }
            var hello: BridgeHello
            do {
                // The supervisor's, with the boot id added (every other field as it says: one
                // copied field by field lost each new one, `keyedSignals` first).
                hello = try await client.call(WorkerRequest.hello, reply: BridgeHello.self)
                hello.bootID = bootID()
            } catch {
                logger.warning("cannot get the hello from the supervisor", metadata: ["error": "\(error)"])
                link.withLockedValue { $0 = .down }
                connection.close()
                try? await Task.sleep(for: backoff.next)
                continue
            }
            let helloFrame = ControlFrame(type: BridgeMessageType.hello.rawValue, id: 0, body: ControlJSON.encode(hello))
            if key != nil {
                // No time limit once the hello is out: giving up now would leave the host a
                // connection it may still take as the guest's, displacing the next one. The
                // verdict comes, or the connection ends, as any reply would.
                let accepted = await handshake(connection, options: options, timeout: nil, logger: logger) {
                    () async throws(BridgeHandshake.Failure) in
                    try? await FrameIO.write(helloFrame.encoded, to: connection)  // a failed write shows as a lost verdict
                    try await BridgeHandshake.receiveVerdict(on: connection)
                }
                guard accepted else {
                    link.withLockedValue { $0 = .down }
                    try? await Task.sleep(for: backoff.failed())
                    continue
                }
            }
            let frames = StreamFrames(connection, maxBody: BridgeProtocol.maxBody)
            link.withLockedValue { link in
                if key == nil { frames.post(helloFrame) }  // with a key it went out with our proof
                if case .settingUp(let waiting) = link { for frame in waiting { frames.post(frame) } }
                link = .up(frames)
            }
            let connectedAt = ContinuousClock.now
            backoff.connected()
            logger.info("bridge connected", metadata: ["address": "\(options.address)", "pending-exits": "\(hello.exits.count)"])
            await notify(client, .bridgeUp)
            if Failpoint.once(Failpoint.workerBreaksFraming, process: "bridge"), let channel = (client.transport as? SeqpacketFrames)?.channel {
                try? await channel.send([0x00, 0x01, 0x02])
            }
            let reason = await serve(frames, supervisor: client, logger: logger, tidier: tidier, unanswered: unanswered)
            link.withLockedValue { $0 = .down }
            await frames.writer.flush()  // an error reply explaining the close goes out first
            connection.close()
            let lasted = ContinuousClock.now - connectedAt
            logger.warning("bridge lost", metadata: ["address": "\(options.address)", "reason": "\(reason)", "lasted": "\(lasted)"])
            await notify(client, .bridgeDown)
            try? await Task.sleep(for: backoff.ended(after: lasted))
        }
    }

    /// One step of the handshake, bounded by `timeout` when there is one (a host that does not
    /// answer is given up on: the connection is closed under the step, which then fails as
    /// lost). On a failure it logs why, closes the connection and returns false.
    static func handshake(
        _ connection: AsyncFD, options: Options, timeout: Duration?, logger: Logger,
        _ step: @escaping @Sendable () async throws(BridgeHandshake.Failure) -> Void
    ) async -> Bool {
        let timedOut = NIOLockedValueBox(false)
        let timer = timeout.map { timeout in
            TimeoutWheel.shared.schedule(after: timeout) {
                timedOut.withLockedValue { $0 = true }
                connection.close()
            }
        }
        defer { if let timer { TimeoutWheel.shared.cancel(timer) } }
        do {
            try await step()
            return true
        } catch {
            connection.close()
            let address: Logger.Metadata = ["address": "\(options.address)"]
            switch error {
            case .connectionLost:
                let timedOut = timedOut.withLockedValue { $0 }
                logger.info(
                    timedOut ? "the host did not complete the handshake in \(options.handshakeTimeout)" : "bridge connection lost during the handshake",
                    metadata: address)
            case .refused:
                logger.error("the host refused our bridge key: does bridge.key_file hold the host's key?", metadata: address)
            case .malformed, .wrongProof:
                // An impostor, or a host with another key: it was sent nothing but our challenge.
                logger.warning(
                    "the host failed authentication; nothing sent to it", metadata: address.merging(["reason": "\(error)"]) { $1 })
            }
            return false
        }
    }

    private static func notify(_ client: ControlClient, _ type: SupervisorMessageType) async {
        try? await client.notify(type.rawValue)
    }

    /// The supervisor is about to stop this worker (a daemon stop): every reply owed to the host
    /// is written first — the supervisor's answers to requests it forwarded (a create failed as
    /// the stop ended its runc command), and the exits queued behind them — and then it is told.
    /// Before, a SIGTERM ended the worker with them unwritten: the host waited for its create's
    /// answer until its own timeout (`no-guest` after 30 s), or resent it to the next daemon.
    /// Bounded by the supervisor, which stops the worker anyway after a moment.
    static func finish(unanswered: UnansweredRequests, link: NIOLockedValueBox<Link>, supervisor: ControlClient) async {
        await unanswered.waitUntilNone()
        let frames = link.withLockedValue { link -> StreamFrames<AsyncFD>? in
            guard case .up(let frames) = link else { return nil }
            return frames
        }
        await frames?.writer.flush()
        await notify(supervisor, .bridgeFinished)
    }

    /// Serves the host's requests until the connection ends or breaks the framing; returns why.
    /// Each request is decoded here, in the restartable worker (a bad one is answered here and
    /// the supervisor never sees it), then forwarded; at most `BridgeProtocol.requestsInFlight`
    /// at a time, each holding its permit until its reply is written (`RPCServer`).
    static func serve(
        _ frames: StreamFrames<AsyncFD>, supervisor: ControlClient, logger: Logger, tidier: MemoryTidier? = nil, unanswered: UnansweredRequests? = nil
    ) async -> RPCServerEnd {
        await RPCServer.serve(
            frames, as: BridgeRequest.self, inFlight: BridgeProtocol.requestsInFlight, unanswered: unanswered,
            notification: { frame in
                // The host sends the guest no notifications: a request without an id.
                frames.post(ControlFrame(type: RPCFrameType.error, id: 0, body: HoldfastError(.badRequest, "a request needs a non-zero id").errorFrameBody))
            },
            stray: { frame in logger.warning("the host sent a reply to a request never made", metadata: ["id": "\(frame.id)"]) },
            closeDescriptors: { _ in }
        ) { request, _ async throws(HoldfastError) -> RPCReply in
            tidier?.noteWork()
            let reply = try await supervisor.request(WorkerRequest.host(request).frameType, body: request.body)
            if Failpoint.compiledIn, let kind = BridgeMessageType(rawValue: request.frameType),
                Failpoint.fails(Failpoint.bridgeReplyLate, process: "\(kind)", passes: Failpoint.everyPass)
            {
                await Failpoint.hold(Failpoint.lateReply)
            }
            return RPCReply(body: reply.frame.body)
        }
    }

    /// The kernel's boot id: changes on every boot of the VM, not on migration.
    public static func bootID() -> String {
        let fd = open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return "unknown" }
        defer { close(fd) }
        var buffer = [UInt8](repeating: 0, count: 64)
        let count = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard count > 0 else { return "unknown" }
        return String(decoding: buffer[..<count], as: UTF8.self).filter { $0 != "\n" }
    }
}
