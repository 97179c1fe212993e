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

/// The broker and the bridge worker: how they are started, and what the supervisor serves them.
extension Supervisor {
    // MARK: Roles

    var brokerSettings: BrokerSettings {
        BrokerSettings(
            user: configuration.broker.user, seccomp: SeccompAction(rawValue: configuration.broker.seccomp) ?? .kill,
            redialAttempts: configuration.streams.redialAttempts, redialIntervalMilliseconds: configuration.streams.redialInterval,
            connectTimeoutMilliseconds: configuration.streams.connectTimeout,
            drainTimeoutMilliseconds: configuration.streams.drainTimeout, ringCapacity: configuration.streams.ringCapacity,
            handoffAllowedUIDs: configuration.handoff.allowedUIDs, handoffAllowedGIDs: configuration.handoff.allowedGIDs,
            handoffMaxConnections: configuration.handoff.maxConnections,
            handoffReleaseKeptForMilliseconds: configuration.handoff.releaseKeptFor)
    }

    func launchBroker(handoff: Listener?) throws -> RoleSupervisor.Incarnation {
        // Before every start: a process that took the broker's uid meanwhile would share it.
        try checkBrokerUIDIsItsOwn()
        let settings = String(decoding: ControlJSON.encode(brokerSettings), as: UTF8.self)
        // The broker starts as its unprivileged user: it never holds root at all (it needs none:
        // everything it uses arrives as fds). It still checks, and drops itself if it must.
        var user: UserAccount?
        if let name = configuration.broker.user, Privileges.isRoot { user = UserAccount.resolve(name) }
        return try startRole(user: user) { theirs in
            var arguments = ["holdfast", "broker", "--control-fd", String(theirs), "--settings", settings]
            var keep = [theirs]
            if let checkpoints {
                arguments += ["--checkpoints-fd", String(checkpoints.descriptor)]
                keep.append(checkpoints.descriptor)
            }
            if let rings {
                arguments += ["--rings-fd", String(rings.descriptor)]
                keep.append(rings.descriptor)
            }
            if let handoff {
                arguments += ["--handoff-fd", String(handoff.descriptor), "--handoff-path", configuration.handoff.socket]
                keep.append(handoff.descriptor)
            }
            return (arguments, keep)
        }
    }

    func launchBridge() throws -> RoleSupervisor.Incarnation {
        try startRole { theirs in
            var arguments = [
                "holdfast", "bridge", "--control-fd", String(theirs), "--address", configuration.bridge.address.description,
                "--reconnect-initial-ms", String(configuration.bridge.reconnectInitial),
                "--reconnect-max-ms", String(configuration.bridge.reconnectMax),
                "--authentication", configuration.bridge.authentication.rawValue,
            ]
            // The path, not the key: the worker (root) reads the file itself before every dial.
            if configuration.bridge.authentication == .hmacSHA256 { arguments += ["--key-file", configuration.bridge.keyFile] }
            return (arguments, [theirs])
        }
    }

    /// Starts a role on a new channel (`command` gets the role's end and names the arguments and
    /// the fds it keeps), leaving nothing behind when a step fails, because the role supervisor
    /// tries again and again: a failed spawn (a fork refused under a pids limit) used to leak our
    /// end of the channel, one fd per try; a channel that could not be watched after the spawn
    /// (epoll at its watch limit) left the role running unsupervised — a broker holding its uid,
    /// so that every next start was refused (`checkBrokerUIDIsItsOwn`) and no broker ran again.
    private func startRole(
        user: UserAccount? = nil, _ command: (_ theirs: Int32) -> (arguments: [String], keep: [Int32])
    ) throws -> RoleSupervisor.Incarnation {
        let (ours, theirs) = try FDChannel.pair()
        defer { close(theirs) }
        let (arguments, keep) = command(theirs)
        let role = arguments[1]
        let child: ChildReaper.Child
        do {
            if Failpoint.fails(Failpoint.roleStartFails, process: role) { throw SystemError("fork (failpoint)", errno: .resourceTemporarilyUnavailable) }
            child = try spawnRole(arguments, keep: keep, user: user)
        } catch {
            close(ours)
            throw error
        }
        do {
            if Failpoint.fails(Failpoint.roleChannelFails, process: role) { throw SystemError("epoll_ctl (failpoint)", errno: .noSpace) }
            return .init(pid: child.pid, child: child, channel: FDChannel(try AsyncFD(adopting: ours)))
        } catch {
            close(ours)
            // Not left to run without a channel: killed, and its exit dropped when reaped. Until
            // it is reaped it still runs as its uid: the next start's check of the broker's uid
            // knows it for ours (on a loaded machine it outlived the 100 ms backoff, and that
            // start was refused naming our own dying broker as a process sharing its uid).
            _ = reaper.signal(child, SIGKILL)
            reaper.abandon(child)
            rolesKilledAtStart.withLockedValue { $0.append(child) }
            throw error
        }
    }

    func spawnRole(_ arguments: [String], keep: [Int32], user: UserAccount? = nil) throws -> ChildReaper.Child {
        // Not NOTIFY_SOCKET and the watchdog's variables: only the supervisor speaks for the service.
        let environment = Failpoint.environment(SpawnOptions.inheritedEnvironment().filter { entry in
            !ServiceNotify.environmentVariables.contains(String(entry.prefix { $0 != "=" }))
        }, forRole: arguments[1])
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
        // Spared by the OOM killer before a container (a role survives its own death, the
        // containers do not), never below what the service manager gave the daemon.
        options.oomScoreAdjustment = min(OOMScore.childAdjustment ?? OOMScore.current ?? 0, OOMScore.role)
        return try reaper.spawn(options)
    }

    func serveBroker(_ incarnation: RoleSupervisor.Incarnation) async {
        // Set once the client exists: a deposit names the incarnation of the broker it came from.
        let this = NIOLockedValueBox<ControlClient?>(nil)
        let client = ControlClient(channel: incarnation.channel) { [self] frame, descriptors in
            let type = BrokerMessageType(rawValue: frame.type)
            // Only a deposit carries fds to keep; any others are closed.
            if type == .handoffDeposited, let deposit = try? ControlJSON.decode(HandoffDeposit.self, from: frame.body, frameType: frame.type),
                let from = this.withLockedValue({ $0 })
            {
                keepHandoff(deposit, descriptors: descriptors, from: from)
                return
            }
            SeqpacketFrames.closeDescriptors(descriptors)
            switch type {
            case .drained:
                guard let drained = try? ControlJSON.decode(DrainedNotification.self, from: frame.body, frameType: frame.type) else { return }
                processDrained(drained)
            case .inputEnded:
                guard let ended = try? ControlJSON.decode(InputEndedNotification.self, from: frame.body, frameType: frame.type) else { return }
                stdinEnded(ended.process, endedByHost: ended.endedByHost ?? false)
            case .inputSettled:
                guard let settled = try? ControlJSON.decode(InputSettledNotification.self, from: frame.body, frameType: frame.type) else { return }
                stdinSettled(settled.process, slot: settled.checkpoint)
            case .outputSettled:
                guard let settled = try? ControlJSON.decode(OutputSettledNotification.self, from: frame.body, frameType: frame.type),
                    let from = this.withLockedValue({ $0 })
                else { return }
                outputSettled(settled.process, slot: settled.checkpoint, from: from)
            case .handoffEnded:
                guard let ended = try? ControlJSON.decode(ProcessRequest.self, from: frame.body, frameType: frame.type) else { return }
                handoffEnded(ended.process)
            case .handoffReleasing:
                guard let releasing = try? ControlJSON.decode(ProcessRequest.self, from: frame.body, frameType: frame.type) else { return }
                stdio.withLockedValue { $0.releasing(releasing.process) }
            case .handoffExited:
                guard let exited = try? ControlJSON.decode(ProcessRequest.self, from: frame.body, frameType: frame.type) else { return }
                stdio.withLockedValue { $0.handoffExited(exited.process) }
            default:
                break
            }
        }
        this.withLockedValue { $0 = client }
        let number = stdio.withLockedValue { $0.brokerStarted(client) }
        session.withLockedValue { if $0.firstBrokerOfImage == nil { $0.firstBrokerOfImage = number } }
        // Out of service before its requests fail `channel-closed` (read by their callers as
        // "ask again"): asked again at once, the dead broker's client must not be given out.
        // Ended before it was put in service (it died during the readoption): taken out again
        // at once — `ended` is set before the clear, and read after the set.
        let ended = NIOLockedValueBox(false)
        let running = Task { [brokerClient] in
            await client.run {
                ended.withLockedValue { $0 = true }
                brokerClient.clear { $0 === client }
            }
        }
        // A broker started after a crash gets every live process's streams back before anything
        // else (creates wait for it meanwhile); the first one gets none.
        await readopt(incarnation: number, client: client)
        await resumeHeldOpenOutputs(incarnation: number, client: client)
        brokerClient.set(client)
        if ended.withLockedValue({ $0 }) { brokerClient.clear { $0 === client } }
        // Only now may runtimes ask it about their processes: every one is back.
        _ = try? await client.call(BrokerRequest.openHandoff, reply: [String: String].self)
        await running.value
        brokerClient.clear { $0 === client }
        // The supervisor still holds every process's host ends and their checkpoints: the next
        // broker takes the streams over, and exits waiting for a drain are reported by it.
        stdio.withLockedValue { $0.brokerGone(client) }
    }

    /// The bridge worker's channel: it sends bridge-up/down notifications and forwards the
    /// host's requests (already parsed and checked); we answer them and push exits to it.
    func serveBridge(_ incarnation: RoleSupervisor.Incarnation) async {
        let channel = incarnation.channel
        session.withLockedValue { $0.bridgeChannel = channel }
        // The worker bounds what the host has in flight; this bounds what the worker can (a
        // worker gone wrong must not grow the supervisor either).
        let end = await RPCServer.serve(
            channel, as: WorkerRequest.self, inFlight: 2 * BridgeProtocol.requestsInFlight,
            notification: { [self] frame in
                tidier.noteWork()
                await bridgeNotification(frame)
            }
        ) { [self] request, _ async throws(HoldfastError) -> RPCReply in
            tidier.noteWork()
            return try await handle(request)
        }
        if case .broken(let why) = end {
            // A worker gone wrong (its messages are not frames any more): nothing more is read
            // from it, so it must not run on holding the host's connection, whose requests would
            // wait for ever. Its channel ends; it exits on that and is started again.
            logger.error("the bridge worker broke its channel's framing: ending it (the worker restarts)", metadata: ["reason": "\(why)"])
            channel.close()
        }
        session.withLockedValue { if $0.bridgeChannel === channel { $0.bridgeChannel = nil } }
        // The worker died: the bridge is as good as lost. (Stopped for a live upgrade, the
        // streams stay connected: the broker is about to hand them over as they are.)
        if session.withLockedValue({ s in defer { s.bridge = .down }; return s.bridge == .up && !s.upgrading }) {
            changes.notify()
            metrics.bridge(up: false)
            await tellBroker(.disconnectAll)
        }
    }

    /// Tells the broker the bridge went up or down, waiting at most `brokerAnswerBound` for its
    /// answer. These are told from the bridge worker's channel, read in order, and at the
    /// worker's end: a broker an operator stopped (SIGSTOP, a debugger) held the host's next
    /// requests behind it, and a daemon stop for as long as it stayed stopped. What is not
    /// answered in time is still told, in order: each notice goes out once the one before it
    /// was answered (or its broker died), to the broker running then.
    func tellBroker(_ request: BrokerRequest) async {
        let notice = brokerNoticeTail.withLockedValue { tail -> Task<Void, Never> in
            let previous = tail
            let next = Task { [self] in
                await previous?.value
                guard let broker = broker() else { return }
                _ = try? await broker.call(request, reply: CountResponse.self)
            }
            tail = next
            return next
        }
        _ = await notice.value(within: Self.brokerAnswerBound)
    }

    func bridgeNotification(_ frame: ControlFrame) async {
        switch SupervisorMessageType(rawValue: frame.type) {
        case .bridgeUp:
            session.withLockedValue { $0.bridge = .up }
            changes.notify()
            metrics.bridge(up: true)
            resendExitsLeftOutOfTheHello()
            logger.info("bridge up")
            if session.withLockedValue({ $0.ready }) { notifier.status("Ready: \(bridgeSummary)") }
            await tellBroker(.bridgeUp)
        case .bridgeDown:
            session.withLockedValue { $0.bridge = .down }
            changes.notify()
            metrics.bridge(up: false)
            logger.warning("bridge lost")
            if session.withLockedValue({ $0.ready }) { notifier.status("Bridge to \(configuration.bridge.address) lost: streams parked, redialling") }
            await tellBroker(.disconnectAll)
        case .bridgeFinished:
            session.withLockedValue { $0.bridgeFinishes += 1 }
            changes.notify()
        default:
            break
        }
    }
}
