import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import NIOConcurrencyHelpers
import Logging

#if canImport(Glibc)
import Glibc
#endif

/// The broker process (`holdfast broker`, started by the supervisor, never by hand).
public enum BrokerRole {
    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    /// Takes over the fds the supervisor passed, drops to the unprivileged user, locks itself
    /// down with seccomp, and serves until the supervisor's channel closes.
    public static func run(
        controlFD: Int32, handoffFD: Int32?, handoffPath: String?, checkpointsFD: Int32? = nil, ringsFD: Int32? = nil, settings: BrokerSettings,
        logger: Logger
    ) async throws {
        // First of all, before it holds any stream: no ptrace, pidfd_getfd, /proc/PID/mem or
        // core dump of the broker, whatever the uid of whoever tries.
        try Privileges.makeNonDumpable()
        Memory.returnLargeBuffersToTheSystem()
        SignalDisposition.ignore(SIGPIPE)
        // Only the supervisor signals it (SIGTERM, SIGKILL, SIGCONT); a stray SIGHUP, SIGUSR1 or
        // realtime signal (`killall -USR1 holdfast`) would otherwise end it, and every stream
        // would have to be taken over by its successor.
        StraySignals.ignoreInThisRole()
        // And SIGTERM from the supervisor alone: a container's `pkill holdfast` would end it.
        let stops = try StopFromParentOnly()
        stops.sayRefusals { refused, unsaid in
            logger.warning(
                "\(signalName(refused.number)) from another process than the supervisor ignored: only the supervisor stops the broker",
                metadata: ["sentBy": "\(refused.sender)", "alsoIgnoredSinceLastSaid": "\(unsaid)"])
        }
        let control = FDChannel(try AsyncFD(adopting: controlFD))
        let handoff = try handoffFD.map { try Listener(adopting: $0, address: .unix(path: handoffPath ?? "handoff")) }
        // The supervisor's checkpoint area, mapped before the filter is loaded (mmap of a shared
        // fd is allowed after it too: only PROT_EXEC is refused). Without it the broker still
        // relays, but a crash of it loses what its streams held.
        var checkpoints: CheckpointMemory?
        if let checkpointsFD {
            do {
                checkpoints = try CheckpointMemory.inherit(checkpointsFD)
            } catch {
                logger.error("cannot map the checkpoint area: streams will not survive a broker crash", metadata: ["error": "\(error)"])
            }
        }
        // The output streams' replay rings, likewise: laid out from the same ring capacity as
        // the supervisor's.
        var rings: RingMemory?
        if let ringsFD {
            do {
                rings = try RingMemory.inherit(ringsFD, capacity: settings.ringCapacity, blockSize: ReplayRing.defaultBlockSize)
            } catch {
                logger.error("cannot map the ring area: a broker crash will lose what its rings held (reported)", metadata: ["error": "\(error)"])
            }
        }

        if let name = settings.user {
            guard let account = UserAccount.resolve(name) else { throw Failure(description: "broker.user: no such user '\(name)'") }
            if Privileges.isRoot {
                try Privileges.drop(to: account)
                // A change of credentials resets dumpability to fs.suid_dumpable.
                try Privileges.makeNonDumpable()
            } else if getuid() != account.uid {
                throw Failure(description: "broker.user is '\(name)' but the broker runs as uid \(getuid()) and cannot switch")
            }
        }
        // The broker holds two fds or more per stream: the service manager's soft limit (1,024
        // under systemd) would cap it at a few hundred streams. Processes keep the low limit.
        let files = ResourceLimits.raiseOpenFileLimit()
        // Everything that needs a file or a privilege is done: from here on, only fds.
        try SeccompProfile.applyBrokerProfile(action: settings.seccomp)
        logger.info("broker ready", metadata: [
            "pid": "\(getpid())", "uid": "\(getuid())", "seccomp": "\(settings.seccomp.rawValue)",
            "seccompMode": "\(SeccompProfile.mode() ?? -1)", "openFiles": "\(files.soft)", "dumpable": "\(Privileges.isDumpable)",
            "checkpointSlots": "\(checkpoints?.slotCount ?? 0)",
        ])

        let service = BrokerService(settings: settings, logger: logger, checkpoints: checkpoints, rings: rings)
        // Paced: a process holding its pipe's lock again and again is taken over each time
        // (counted in the metrics), and must not flood the journal. Paced per process: paced
        // as one, a process that stalled every few seconds had every window's line, and another
        // one's stall (the one keeping a thread in the kernel) was only counted, never named —
        // and the operator is told to look for the process the last warning names.
        let stallLog = NIOLockedValueBox(LogPacer<StallLogKey>(interval: .seconds(10)))
        // Its queue made now, not at a first use that might meet a full fd table.
        _ = ForeignCloser.shared
        Reactor.shared.onStall { [broker = service.broker] stall in
            let owner = stall.fds.lazy.compactMap({ broker.stream(onFD: $0) }).first
            let key = StallLogKey(tookOver: stall.tookOver, process: owner?.process)
            guard let unsaid = stallLog.withLockedValue({ $0.note(key) }) else { return }
            var metadata = Logger.Metadata(uniqueKeysWithValues: stall.fields.map { ($0, .string($1)) })
            if let owner {
                metadata["process"] = "\(owner.process)"
                metadata["stream"] = "\(owner.stream.rawValue)"
            }
            if unsaid > 0 { metadata["unsaid"] = "\(unsaid)" }
            logger.log(level: stall.tookOver ? .warning : .error, "\(stall.message)", metadata: metadata)
        }
        let handoffTask = handoff.map { listener in Task { await service.serveHandoff(listener) } }
        let tidying = Task {
            while !Task.isCancelled {
                try? await Task.sleep(for: .seconds(2))
                if let tidied = service.broker.tidyMemory() {
                    logger.debug("memory tidied", metadata: [
                        "streamsFinished": "\(tidied.streams)", "residentKiB": "\(tidied.residentBefore) -> \(tidied.residentAfter)",
                        "took": "\(tidied.took)",
                    ])
                }
            }
        }
        await service.serveSupervisor(control)
        tidying.cancel()
        // The supervisor is gone (shutdown or crash): nothing will report to it any more.
        logger.info("supervisor channel closed; broker stopping")
        handoffTask?.cancel()
        handoff?.close()
        await service.broker.shutdown()
    }
}

/// What the broker's stall lines are paced by: each process's stalls apart from another's.
struct StallLogKey: Hashable, Sendable {
    var tookOver: Bool
    var process: String?
}
