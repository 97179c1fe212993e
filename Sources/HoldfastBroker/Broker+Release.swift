import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import Logging

#if canImport(Glibc)
import Glibc
#endif

/// `release`: a process's streams stop and their fds go back to whoever handed them over.
///
/// For a handoff peer's process the fds must never be in nobody's hands, nor relayed by a broker
/// while the peer reads them too, whenever this broker dies. So the supervisor, which keeps
/// copies of them (`handoff-deposited`), is told `handoff-releasing` before the answer is
/// written, and `handoff-ended` (it closes its copies) only after. A broker that dies between
/// the two leaves the supervisor unable to tell whether the peer got the fds: its next broker
/// is handed them as `releasing` and keeps them, unrelayed, for the peer's next `release`, for
/// `releaseKeptFor`. An answer that could not be written (the peer left) is kept the same way.
extension Broker {
    /// How long the fds of a release whose answer may not have reached the peer wait for its
    /// next `release` (`handoff.release_kept_for`). The pipes have an extra holder meanwhile (a
    /// peer that got them and closed a stdin sees its process get end-of-file this much later),
    /// so it is bounded.
    var releaseKeptFor: Duration { settings.handoffReleaseKeptFor }

    /// What `release` answers: the streams and their fds, and what follows the answer's write
    /// (it owns the fds: see `RPCReply.afterSent`).
    public struct Release: Sendable {
        public var response: ReleaseResponse
        public var descriptors: [Int32]
        public var afterSent: RPCReply.AfterSent
    }

    /// Stops relaying a process's streams and hands their fds back (in the order of the
    /// returned descriptions). Bytes a relay had read but not delivered are lost with it.
    /// `caller`: nil for the supervisor, which may release any process; a handoff peer only its own.
    public func release(_ process: String, by caller: ProcessOwner? = nil) async throws(HoldfastError) -> Release {
        if Failpoint.compiledIn, Failpoint.fails(Failpoint.brokerReleaseReceived, process: process, passes: Failpoint.everyPass) {
            logger.info("failpoint: a release held before its look-up", metadata: ["process": "\(process)"])
            await Failpoint.hold(Failpoint.gateBound)
        }
        let kept = keptReleases.withLockedValue { releases -> Result<KeptReleases.Kept, HoldfastError>? in
            guard let owner = releases.owner(of: process) else { return nil }
            if let refusal = Self.refusal(process, ownedBy: owner, to: caller) { return .failure(refusal) }
            return releases.take(process).map { .success($0) }
        }
        if let kept {
            let kept = try kept.get()
            logger.info("a release kept for its peer handed over", metadata: ["process": "\(process)", "fds": "\(kept.descriptors.count)"])
            return answer(process, owner: kept.owner, streams: kept.streams, descriptors: kept.descriptors)
        }
        let adopted = try managed(process, by: caller, removing: true)
        let (descriptions, fds) = await adopted.release(registry: registry)
        // Counted here, every stream: listed no longer as held open past an exit (a drain may
        // have listed one just before this release took the process out).
        forgetHeldOpen(of: adopted)
        for stream in adopted.status() { record(finished: stream) }
        logger.info("released streams", metadata: ["process": "\(process)", "fds": "\(fds.count)"])
        if handoffs.withLockedValue({ $0.has(process) }) {
            // Written before the answer: from here a crash leaves the copies kept, not relayed.
            await notifications.send(.handoffReleasing(ProcessRequest(process: process)))
            Failpoint.pass(Failpoint.brokerReleaseMarked, process: process)
        }
        return answer(process, owner: adopted.owner, streams: descriptions, descriptors: fds)
    }

    private func answer(_ process: String, owner: ProcessOwner, streams: [StreamDescription], descriptors: [Int32]) -> Release {
        Release(response: ReleaseResponse(streams: streams), descriptors: descriptors) { [self] delivered in
            if !delivered, case .handoff = owner {
                logger.warning("a release's answer did not reach its peer: its fds are kept for the peer's next release", metadata: [
                    "process": "\(process)", "keptFor": "\(releaseKeptFor.spoken)",
                ])
                keep(process, owner: owner, streams: streams, descriptors: descriptors)
                return
            }
            // The peer has its own copies (or, the supervisor's process, nobody asks again).
            for fd in descriptors { Reactor.shared.closeOnLoop(fd) }
            Failpoint.pass(Failpoint.brokerReleaseAnswered, process: process)
            await handoffGone(process)
        }
    }

    /// A handoff peer's process a broker crash caught inside its `release` (`AdoptRequest.releasing`,
    /// from the supervisor): nothing is relayed, the fds of its streams are kept for the peer's
    /// next `release`, and its checkpoint slots stay taken until that or `releaseKeptFor`.
    public func keepInterruptedRelease(_ request: AdoptRequest, descriptors: [Int32]) throws(HoldfastError) {
        guard let uid = request.handoffOwner else {
            for fd in descriptors { Reactor.shared.closeOnLoop(fd) }
            throw HoldfastError(.badRequest, "only a handoff peer's process is kept for its release")
        }
        var streams: [StreamDescription] = []
        var kept: [Int32] = []
        var used = Set<Int>()
        for var stream in request.streams where descriptors.indices.contains(stream.fd) && !used.contains(stream.fd) {
            used.insert(stream.fd)
            kept.append(descriptors[stream.fd])
            stream.fd = kept.count - 1
            // As a live release answers: adoptable again as it is.
            streams.append(stream.asReleased)
        }
        for (index, fd) in descriptors.enumerated() where !used.contains(index) { Reactor.shared.closeOnLoop(fd) }
        handoffs.withLockedValue { $0.claim(request.streams.flatMap { [$0.checkpoint, $0.inputCheckpoint].compactMap { $0 } }, for: request.process) }
        logger.warning("a release a broker crash interrupted: its fds are kept for the peer's next release", metadata: [
            "process": "\(request.process)", "owner": "\(uid)", "keptFor": "\(releaseKeptFor.spoken)",
        ])
        keep(request.process, owner: .handoff(uid: uid), streams: streams, descriptors: kept)
    }

    /// A handoff peer adopts `process` again while a release of it is kept for it: if it hands
    /// over every pipe kept (the same files), it has them — the answer reached it, or it kept
    /// copies of its own — and the kept copies would only hold the process's pipes open for
    /// nobody: they close, the supervisor lets go of its copies of the old adoption, and the
    /// adopt goes on. Otherwise the release stays kept and the adopt is refused
    /// (`process-exists`, "ask it first"): closing a pipe the peer does not have would leave the
    /// process without its holder.
    func letGoOfAKeptReleaseHandedBack(_ process: String, uid: UInt32, request: AdoptRequest, descriptors: [Int32]) async {
        // Nothing to look at for the adopts of every other id (no fstat per fd).
        guard keptReleases.withLockedValue({ $0.owner(of: process) }) == .handoff(uid: uid) else { return }
        let handedOver = Set(request.streams.compactMap { stream in
            descriptors.indices.contains(stream.fd) ? (try? DescriptorFacts.of(descriptors[stream.fd]))?.file : nil
        })
        guard let kept = keptReleases.withLockedValue({ $0.takeHandedBack(process, by: .handoff(uid: uid), files: handedOver) }) else { return }
        for fd in kept.descriptors { Reactor.shared.closeOnLoop(fd) }
        logger.info("a release kept for its peer let go: the peer hands the same pipes over again", metadata: [
            "process": "\(process)", "fds": "\(kept.descriptors.count)",
        ])
        await handoffGone(process)
    }

    /// Keeps a release's fds for `releaseKeptFor`; then they close and the supervisor lets go.
    private func keep(_ process: String, owner: ProcessOwner, streams: [StreamDescription], descriptors: [Int32]) {
        // Each pipe's identity, to recognise them if the peer hands them over again.
        let files = descriptors.map { (try? DescriptorFacts.of($0))?.file }
        let (generation, replaced) = keptReleases.withLockedValue {
            $0.keep(process, KeptReleases.Kept(owner: owner, streams: streams, descriptors: descriptors, files: files))
        }
        for fd in replaced?.descriptors ?? [] { Reactor.shared.closeOnLoop(fd) }
        // Through the wheel, which counts only time the broker ran: a broker held in a debugger
        // past it would otherwise close them as it went on, before the release its peer asked
        // for meanwhile (waiting in the socket) was read.
        TimeoutWheel.shared.schedule(after: releaseKeptFor) { [self] in
            Task { [self] in
                guard let expired = keptReleases.withLockedValue({ $0.take(process, ifGeneration: generation) }) else { return }
                for fd in expired.descriptors { Reactor.shared.closeOnLoop(fd) }
                logger.warning("no release came for a process's kept fds: closed", metadata: [
                    "process": "\(process)", "keptFor": "\(releaseKeptFor.spoken)",
                ])
                await handoffGone(process)
            }
        }
    }
}

/// Releases kept for their peers (`Broker.keepInterruptedRelease`), each with the generation it
/// was kept at, so that the expiry of one does not take a later one of the same id.
struct KeptReleases: Sendable {
    struct Kept: Sendable {
        var owner: ProcessOwner
        var streams: [StreamDescription]
        var descriptors: [Int32]
        /// The file each descriptor is (nil: not known), to recognise them handed over again.
        var files: [FileIdentity?] = []
        fileprivate var generation = 0
    }

    private var kept: [String: Kept] = [:]
    private var generations = 0

    func owner(of process: String) -> ProcessOwner? { kept[process]?.owner }

    /// The kept releases' streams as `list` shows them (state `kept`, nothing moving), by process.
    func status(ownedBy owner: ProcessOwner?) -> [(id: String, streams: [StreamStatus])] {
        kept.filter { owner == nil || $0.value.owner == owner }.map { process, release in
            (id: process, streams: release.streams.flatMap { stream -> [StreamStatus] in
                func entry(_ address: String, direction: String? = nil) -> StreamStatus {
                    StreamStatus(
                        process: process, kind: stream.kind, direction: direction, mode: stream.mode, address: address, state: .kept,
                        bytesToHost: 0, bytesFromHost: 0, reconnects: 0, undelivered: 0)
                }
                return [entry(stream.address)] + (stream.inputAddress.map { [entry($0, direction: "input")] } ?? [])
            })
        }
    }

    var count: Int { kept.count }

    /// Keeps `release` for `process`: its generation, and the one it replaced (its fds to close).
    mutating func keep(_ process: String, _ release: Kept) -> (generation: Int, replaced: Kept?) {
        generations += 1
        var release = release
        release.generation = generations
        let replaced = kept.updateValue(release, forKey: process)
        return (generations, replaced)
    }

    /// The release kept for `process`, no longer kept, if `owner` kept it and `files` (what it
    /// hands over now) holds every file kept; nil otherwise, and it stays kept.
    mutating func takeHandedBack(_ process: String, by owner: ProcessOwner, files: Set<FileIdentity>) -> Kept? {
        guard let release = kept[process], release.owner == owner, !release.files.isEmpty,
            release.files.allSatisfy({ $0.map(files.contains) ?? false })
        else { return nil }
        kept[process] = nil
        return release
    }

    /// The release kept for `process` (of `generation`, if given), no longer kept.
    mutating func take(_ process: String, ifGeneration generation: Int? = nil) -> Kept? {
        guard let release = kept[process], generation == nil || release.generation == generation else { return nil }
        kept[process] = nil
        return release
    }
}
