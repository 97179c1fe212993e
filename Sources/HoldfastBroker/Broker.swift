import HoldfastCore
import HoldfastLogging
import HoldfastPosix
import HoldfastProtocol
import Logging
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// The broker's heart: every stdio fd it was handed, a stream per fd (raw ConnSlot or
/// resumable), the relays between them, and the registry that bridge events act on.
///
/// It never reads a file or starts a process; it only moves bytes between fds it holds and
/// sockets it dials — which is what its seccomp profile allows.
public final class Broker: Sendable {
    public let settings: BrokerSettings
    public let metrics = BrokerMetrics()
    let logger: Logger
    let registry = SlotRegistry()
    let processes = NIOLockedValueBox<[String: AdoptedProcess]>([:])
    /// Handoff peers' processes deposited with the supervisor, and the checkpoint slots this
    /// broker gave their streams (`CheckpointMemory.handoffSlots`).
    let handoffs = NIOLockedValueBox(HandoffSlots(range: CheckpointMemory.handoffSlots))
    /// The supervisor's answers to deposits (`handoff-kept`), by process.
    let depositAnswers = AwaitedAnswers<String, HandoffKept>()
    /// Ids of handoff adopts between their first check and their adoption (waiting for the
    /// supervisor's word): taken, for any other adopt, as if the process were in already.
    private let pendingHandoffs = NIOLockedValueBox<Set<String>>([])
    /// Released handoff processes whose answer may not have reached the peer, kept for its next
    /// `release` (Broker+Release.swift).
    let keptReleases = NIOLockedValueBox(KeptReleases())
    private let totals = NIOLockedValueBox(Totals())
    /// Processes out of the table whose outputs an orphan holds open past the exit, relayed on
    /// (`relayUntilEnded`): a live upgrade's quiesce waits for their takes too.
    /// Each such stream is listed (`heldOpenPastExit`) and counted live in `stats` until it
    /// ends, then in the totals.
    private let relayedPastExit = NIOLockedValueBox<[ObjectIdentifier: RelayedPastExit]>([:])
    struct RelayedPastExit {
        var owner: AdoptedProcess
        var streams: [ManagedStream]
    }
    /// The handoff socket's connections (`BrokerService.serveHandoff`), counted in `stats`.
    let handoffGate: NIOLockedValueBox<HandoffConnectionGate>
    /// Streams finished since malloc's free pages were last given back (`tidyMemory`).
    private let streamsFinishedSinceTidy = NIOLockedValueBox(0)
    /// Whether the host's bridge is up, as the supervisor last said (up until told otherwise: a
    /// broker restarted while the bridge is up hears no bridge-up). While it is, a stream whose
    /// redial cycle gave up starts another after a back-off (`DialWatch`).
    private let bridgeIsUp = NIOLockedValueBox(true)
    var isBridgeUp: Bool { bridgeIsUp.withLockedValue { $0 } }
    /// Where notifications go (the supervisor's control channel), in the order they happened
    /// (`OrderedDelivery`: a stdin's end before the `drained` of the process it let exit).
    let notifications: OrderedDelivery<BrokerNotification>
    /// The supervisor's shared checkpoint area (`--checkpoints-fd`): where resumable streams
    /// keep their progress, so a broker started after this one crashed resumes them.
    let checkpoints: CheckpointMemory?
    /// The supervisor's shared ring area (`--rings-fd`): output streams' replay rings, so what
    /// they held outlives this broker too.
    let rings: RingMemory?

    struct Totals: Sendable {
        var bytesToHost: UInt64 = 0
        var bytesFromHost: UInt64 = 0
        var reconnects: UInt64 = 0
        var undelivered: UInt64 = 0
        var lost: UInt64 = 0
        /// What resumed streams had counted before this broker (their offsets and losses come
        /// back from the checkpoints), taken off the counts `stats` gives: counted again, every
        /// broker restart and live upgrade reported each live stream's whole life once more —
        /// `holdfast_stream_lost_bytes_total` came back at every stream's past losses, as if the
        /// upgrade had lost them.
        var carriedToHost: UInt64 = 0
        var carriedFromHost: UInt64 = 0
        var carriedLost: UInt64 = 0

        mutating func carry(_ streams: [StreamStatus]) {
            for stream in streams {
                carriedToHost &+= stream.bytesToHost
                carriedFromHost &+= stream.bytesFromHost
                carriedLost &+= stream.lostBytes ?? 0
            }
        }
    }

    public init(
        settings: BrokerSettings, logger: Logger, checkpoints: CheckpointMemory? = nil, rings: RingMemory? = nil,
        notify: @escaping @Sendable (BrokerNotification) async -> Void
    ) {
        self.settings = settings
        self.handoffGate = NIOLockedValueBox(HandoffConnectionGate(maxServed: max(1, settings.handoffMaxConnections)))
        self.logger = logger
        self.checkpoints = checkpoints
        self.rings = rings
        self.notifications = OrderedDelivery(notify)
    }

    // MARK: Adopt

    /// Takes the fds of a process's streams and starts relaying them. On any error every fd of
    /// the request is closed and nothing is left behind. The request was checked once, at the
    /// broker's boundary (`AdoptCheck.validate` made `adoption`).
    public func adopt(_ adoption: ValidatedAdoption, descriptors: [Int32], owner: ProcessOwner = .supervisor) throws(HoldfastError) {
        try adopt(adoption, descriptors: descriptors, owner: owner, claimedID: false)
    }

    /// `claimedID`: the id is this request's own pending handoff adopt (`adoptFromHandoff`).
    private func adopt(_ adoption: ValidatedAdoption, descriptors: [Int32], owner: ProcessOwner, claimedID: Bool) throws(HoldfastError) {
        let request = adoption.request
        // A slot outside the area (or no area) would be memory the broker does not have.
        for stream in adoption.streams {
            for slot in [stream.primary.checkpoint, stream.ttyInput?.checkpoint].compactMap({ $0 }) where checkpoints?.checkpoint(slot) == nil {
                for fd in descriptors { ForeignCloser.shared.close(fd) }
                throw HoldfastError(.badRequest, "checkpoint slot \(slot) is not in the broker's checkpoint area (\(checkpoints?.slotCount ?? 0) slots)")
            }
        }
        var adopted: [AsyncFD?] = []
        do throws(SystemError) {
            if adoption.resumes, Failpoint.fails(Failpoint.readoptionWatchRefused, process: request.process, passes: Failpoint.firstTries) {
                throw SystemError("epoll_ctl(EPOLL_CTL_ADD) (failpoint)", errno: .noSpace)
            }
            for fd in descriptors { adopted.append(try AsyncFD(adopting: fd, foreignDescription: true)) }
            if Failpoint.fails(Failpoint.streamShortage, process: request.process, passes: Failpoint.everyPass) {
                for handle in adopted { handle?.injectShortages(Failpoint.injectedShortages) }
            }
        } catch {
            for (index, fd) in descriptors.enumerated() where index >= adopted.count { ForeignCloser.shared.close(fd) }
            for handle in adopted { handle?.close() }
            throw Self.adoptionFailure(error)
        }
        let identities = adoption.identities
        let process = AdoptedProcess(id: request.process, owner: owner, identities: identities)
        var streams: [ManagedStream] = []
        for stream in adoption.streams {
            let handle = adopted[stream.description.fd]!
            let ends = { (window: WindowPipe?) in window.map { WindowEnds(read: adopted[$0.read]!, write: adopted[$0.write]!) } }
            streams.append(ManagedStream(
                stream, process: request.process, handle: handle, window: ends(stream.description.window),
                inputWindow: ends(stream.description.inputWindow), broker: self))
        }
        // fds no stream refers to were handed over by mistake: do not keep them.
        let used = Set(request.streams.flatMap { stream in
            [stream.fd] + [stream.window, stream.inputWindow].compactMap { $0 }.flatMap { [$0.read, $0.write] }
        })
        for (index, handle) in adopted.enumerated() where !used.contains(index) { handle?.close() }

        // What resumed streams counted before this broker, read before they start moving.
        let carried = request.streams.contains { $0.resume == true } ? streams.flatMap { $0.status(process: request.process) } : []
        if request.orphanedOutput == true {
            // Its process is done and reported; an orphan of it writes on. Not in the table: the
            // id may be the host's next process of that name by now.
            totals.withLockedValue { $0.carry(carried) }
            process.start(streams, registry: registry)
            // Its process exited: the drain's bound applies as it did in the broker before (a
            // host that stopped taking it lets it go after the drain timeout without progress).
            for stream in streams { stream.output?.processExited(drainTimeout: settings.drainTimeout) }
            logger.info("resumed an orphan's output the previous broker relayed past its process's exit", metadata: [
                "process": "\(request.process)", "streams": "\(request.streams.map(\.kind.rawValue))",
            ])
            Task { [self] in
                // Each stream is counted in the totals as it ends (`relayUntilEnded`).
                await relayUntilEnded(streams, of: process, supervisorsSlots: true)
            }
            return
        }
        // In the table and started in one step, under the table's lock: a `release` or a
        // `process-exited` that finds the process finds its streams running (between the two, a
        // release answered no fds and freed its slots, then relays started for a process no
        // longer in the table, into slots another peer's streams could be given).
        let refusal = processes.withLockedValue { table -> HoldfastError? in
            if let refusal = admissionRefusal(request.process, identities: identities, among: table, claimedID: claimedID) { return refusal }
            table[request.process] = process
            if request.handoffOwner != nil {
                // A handoff peer's process the supervisor hands back after a crash: its slots are ours.
                handoffs.withLockedValue { $0.claim(request.streams.flatMap { [$0.checkpoint, $0.inputCheckpoint].compactMap { $0 } }, for: request.process) }
            }
            totals.withLockedValue { $0.carry(carried) }
            process.start(streams, registry: registry)
            return nil
        }
        if let refusal {
            for stream in streams { stream.discard() }
            throw refusal
        }
        if request.endingInput == true {
            // Its process is done and reported: only the stdin's echo is owed, which its relay
            // sees home by itself (and reports `input-settled`). Not in the table, so that the
            // id is free for the host's next process of that name.
            let removed = processes.withLockedValue { table -> Bool in
                guard table[request.process] === process else { return false }
                table.removeValue(forKey: request.process)
                return true
            }
            if removed { for stream in process.status() { record(finished: stream) } }
            logger.info("resumed an ended stdin the previous broker held, for its END echo", metadata: ["process": "\(request.process)"])
            return
        }
        // The checkpoint slots, so a fault in one slot's memory can be traced to the streams
        // that had it (a slot is reused: the log says whose it was when).
        let slots = request.streams.map { stream in
            let kept = [stream.checkpoint, stream.inputCheckpoint].compactMap { $0 }
            return kept.isEmpty ? "\(stream.kind.rawValue):-" : "\(stream.kind.rawValue):\(kept.map(String.init).joined(separator: "+"))"
        }
        logger.info(adoption.resumes ? "resumed streams the previous broker held" : "adopted streams", metadata: [
            "process": "\(request.process)", "streams": "\(request.streams.map { "\($0.kind.rawValue)/\($0.mode.rawValue)" })",
            "slots": "\(slots.joined(separator: " "))",
        ])
    }

    /// An fd of an adopt that could not be taken (`AsyncFD(adopting:)`): a resource the kernel
    /// ran short of — an epoll watch (the uid's `fs.epoll.max_user_watches`, which processes of
    /// the broker's uid in other pid namespaces share), memory, an fd — is a shortage the
    /// supervisor waits out and asks again (`resource-shortage`, `too-many-open-files`); taken
    /// for a bad fd, a restarted broker's refusal left a running process unrelayed until the
    /// next broker, its output pipe full and its writer blocked.
    static func adoptionFailure(_ error: SystemError) -> HoldfastError {
        switch error.errno {
        case .tooManyOpenFiles, .tooManyOpenFilesInSystem: HoldfastError(.tooManyOpenFiles, "\(error)")
        case .noSpace, .noMemory: HoldfastError(.resourceShortage, "\(error)")
        default: HoldfastError(.badDescriptor, "\(error)")
        }
    }

    /// What a stream taken over from a crashed broker resumes from, its checkpoint (read before
    /// the new stream overwrites it); nil when the checkpoint holds nothing (the crashed broker
    /// never started the stream: it starts new, at 0). A take the crash interrupted is logged
    /// with its exact offsets: output bytes that may be missing (the host is told of them as a
    /// gap), input bytes that may reach the process twice.
    ///
    /// A take through a window is settled first by the level the window has now
    /// (`windowLevel`): then it is not uncertain at all.
    func recover(
        _ checkpoint: StreamCheckpoint, windowLevel: Int?, process: String, stream: String, direction: StreamDirection
    ) -> StreamCheckpoint.Recovered? {
        guard let found = checkpoint.recovered else {
            logger.info("resumed stream had no checkpoint: starting it new", metadata: ["process": "\(process)", "stream": "\(stream)"])
            return nil
        }
        let recovered = windowLevel.map { found.settled(direction: direction, windowLevelNow: $0) } ?? found
        let resumeAt = direction == .send ? recovered.outputResumesAt : recovered.inputResumesAt
        var metadata: Logger.Metadata = [
            "process": "\(process)", "stream": "\(stream)", "offset": "\(resumeAt)", "acknowledged": "\(recovered.acknowledged)",
            "restarts": "\(recovered.restarts + 1)",
        ]
        if let windowLevel { metadata["window"] = "\(windowLevel)" }
        guard recovered.uncertain > 0 else {
            if found.uncertain > 0 {
                metadata["interrupted"] = "\(found.taken)..<\(found.taken + UInt64(found.uncertain))"
                metadata["moved"] = "\(recovered.taken - found.taken)"
                logger.info("stream resumed from its checkpoint: the interrupted take was settled by its window's level", metadata: metadata)
            } else {
                logger.info("stream resumed from its checkpoint", metadata: metadata)
            }
            return recovered
        }
        metadata["uncertain"] = "\(recovered.uncertain)"
        metadata["from"] = "\(recovered.taken)"
        metadata["to"] = "\(recovered.taken + UInt64(recovered.uncertain))"
        switch direction {
        case .send:
            logger.warning("stream resumed after a crash mid-read: bytes from..<to may be missing (the host is told)", metadata: metadata)
        case .receive:
            logger.warning("stream resumed after a crash mid-write: bytes from..<to may reach the process twice", metadata: metadata)
        }
        return recovered
    }

    /// A resumed output got back what the crashed broker's ring held.
    func restoredRing(_ restored: RestoredRing, hole: Range<UInt64>?, process: String, stream: String) {
        var metadata: Logger.Metadata = [
            "process": "\(process)", "stream": "\(stream)", "from": "\(restored.start)", "to": "\(restored.end)",
            "bytes": "\(restored.end - restored.start)",
        ]
        if let hole { metadata["unknown"] = "\(hole.lowerBound)..<\(hole.upperBound)" }
        logger.info("replay ring restored from shared memory", metadata: metadata)
    }

    /// Why a process with this id and these resumable identities cannot be let in beside those
    /// of `table`, if it cannot.
    /// The caller holds `processes`' lock (`table`); `claimedID`: the pending handoff adopt of
    /// the id is the caller's own.
    private func admissionRefusal(
        _ process: String, identities: Set<ResumableIdentity>, among table: [String: AdoptedProcess], claimedID: Bool
    ) -> HoldfastError? {
        guard table[process] == nil else {
            return HoldfastError(
                .processExists,
                "process '\(process)' already has streams in the broker (after its exit they drain to the host first, up to the drain timeout without progress: the id is free once `list` no longer shows it)")
        }
        if !claimedID, pendingHandoffs.withLockedValue({ $0.contains(process) }) {
            return HoldfastError(.processExists, "process '\(process)' is being adopted (its runtime's request waits for the supervisor)")
        }
        if keptReleases.withLockedValue({ $0.owner(of: process) }) != nil {
            return HoldfastError(.processExists, "process '\(process)' is being released: its fds are kept for its peer's next release (ask it first)")
        }
        // A token a live stream uses is taken: a second stream with it would take the first
        // one's place at the host and splice its bytes onto the first one's.
        if !identities.isEmpty {
            for other in table.values {
                if let taken = other.identities.first(where: identities.contains) {
                    return HoldfastError(.tokenInUse, "token '\(taken.token)' is in use by another stream")
                }
            }
            // So is one of an output an orphan holds open past its process's exit (out of the
            // table, relayed on): a new stream with its token spliced onto it at the host.
            for relayed in relayedPastExit.withLockedValue({ Array($0.values) }) {
                let held = ResumableIdentity.all(in: relayed.streams.map(\.description))
                if let taken = held.first(where: identities.contains) {
                    return HoldfastError(
                        .tokenInUse, "token '\(taken.token)' is in use by an output of process '\(relayed.owner.id)' an orphan holds open past its exit")
                }
            }
        }
        return nil
    }

    // MARK: Handoff peers' processes

    /// How long a handoff adopt waits for the supervisor's word on its deposit (`handoff-kept`):
    /// it answers at once unless stopped (a debugger, SIGSTOP) or starved of CPU. Past this the
    /// runtime is answered `survivesBrokerCrash: false` and the process is relayed with its
    /// slots all the same: the deposit waits in the supervisor's channel, and once the word
    /// comes (`depositAnswered`) the process survives a broker crash from then on.
    static let depositAnswerWait: Duration = .seconds(5)

    /// A process a handoff peer hands over: its resumable streams get checkpoint slots of this
    /// broker's range, copies of its fds go to the supervisor with its description, and only
    /// once the supervisor says it keeps them (`handoff-kept`) is the process adopted — so a
    /// crash right after finds them there, and a broker started after a crash of this one is
    /// handed it again by the supervisor, with the peer still its owner. Without a checkpoint
    /// area, free slots, fd copies or the supervisor's keeping them it is adopted as before:
    /// relayed, but not kept across a crash; without its word within `depositAnswerWait`, kept
    /// from whenever the word comes. Returns whether it is kept, and if not why (the peer is told).
    public func adoptFromHandoff(_ adoption: ValidatedAdoption, descriptors peerDescriptors: [Int32], uid: UInt32) async throws(HoldfastError) -> AdoptResponse {
        let process = adoption.process
        Failpoint.pass(Failpoint.brokerAdoptReceived, process: process)
        let (sharing, checkedFiles) = descriptorRefusalRegistering(adoption.request, peerDescriptors, uid: uid)
        if let sharing {
            SeqpacketFrames.closeDescriptors(peerDescriptors)
            throw sharing
        }
        // In the table by the end of this adopt, or refused: no longer pending either way.
        defer { filesAdopted(checkedFiles) }
        await letGoOfAKeptReleaseHandedBack(process, uid: uid, request: adoption.request, descriptors: peerDescriptors)
        // Refused at once for what refuses it for certain, before anything is deposited (a
        // deposit the supervisor refuses, the id its own, would be warned of for nothing); the
        // id claimed until the adoption, so that no other adopt of it gets in while this one
        // waits for the supervisor's word (one of the two would be refused after it, and the
        // supervisor left holding the other's copies under the id).
        let refusal = processes.withLockedValue { table -> HoldfastError? in
            if let refusal = admissionRefusal(process, identities: adoption.identities, among: table, claimedID: false) { return refusal }
            pendingHandoffs.withLockedValue { _ = $0.insert(process) }
            return nil
        }
        if let refusal {
            SeqpacketFrames.closeDescriptors(peerDescriptors)
            throw refusal
        }
        defer { pendingHandoffs.withLockedValue { _ = $0.remove(process) } }
        var descriptors = peerDescriptors
        var request = adoption.request
        var adopting = adoption
        var unkept: String?
        let needed = request.streams.reduce(0) { $0 + ($1.mode == .resumable ? ($1.inputAddress != nil ? 2 : 1) : 0) }
        let slotsRefused = checkpoints == nil || Failpoint.fails(Failpoint.handoffSlotsTaken, process: process, passes: Failpoint.everyPass)
        var slots: [Int]? = slotsRefused ? nil : handoffs.withLockedValue { $0.take(for: process, count: needed) }
        // The id's slots from its last adoption are freed once its release's answer has reached
        // the peer (a moment after the peer has it): a runtime that releases and adopts the id
        // again at once found them not free yet, and its process went without crash-survival.
        // Waited for, briefly.
        if slots == nil, !slotsRefused {
            for _ in 0..<100 where handoffs.withLockedValue({ $0.slots(of: process) != nil }) {
                try? await Task.sleep(for: .milliseconds(10))
            }
            slots = handoffs.withLockedValue { $0.take(for: process, count: needed) }
        }
        if let slots {
            var next = slots.makeIterator()
            for index in request.streams.indices where request.streams[index].mode == .resumable {
                request.streams[index].checkpoint = next.next()
                if request.streams[index].inputAddress != nil { request.streams[index].inputCheckpoint = next.next() }
            }
            // Their windows are made here (a runtime hands over its process's fds only).
            do {
                try StreamWindows.add(to: &request, descriptors: &descriptors)
            } catch {
                logger.warning("a handoff process's streams have no windows: a crash inside a read may cost a gap", metadata: [
                    "process": "\(process)", "error": "\(error)",
                ])
            }
            unkept = await deposit(request, descriptors: descriptors, owner: uid, adopting: &adopting)
        } else {
            unkept = checkpoints == nil
                ? "the broker has no checkpoint area"
                : handoffs.withLockedValue({ $0.slots(of: process) != nil })
                    ? "the id's checkpoint slots from its last adoption are not free yet (its release is still being settled)"
                    : "no free checkpoint slots for its \(needed) resumable streams (\(CheckpointMemory.handoffSlots.count) in all for handoff processes)"
        }
        if let unkept {
            // Said here and in the answer: a runtime that counts on crash-survival must know.
            logger.warning("a handoff process is adopted without surviving a broker crash", metadata: ["process": "\(process)", "error": "\(unkept)"])
        }
        do {
            try adopt(adopting, descriptors: descriptors, owner: .handoff(uid: uid), claimedID: true)
        } catch {
            // Its slots back, and whatever the supervisor kept (or keeps, late) let go.
            await handoffGone(process)
            throw error
        }
        Failpoint.pass(Failpoint.brokerAdoptTaken, process: process)
        return AdoptResponse(survivesBrokerCrash: unkept == nil, reason: unkept)
    }

    /// The first stream of a runtime's request whose fd cannot carry it (the wrong end of a
    /// pipe, a pty's slave, a directory...) or whose file another stream already reads (or
    /// writes) the same way, as the `bad-descriptor` it is refused with. Only a runtime's fds
    /// are looked at: the supervisor makes its own pipes and terminals. Another owner's process
    /// is not named to the peer.
    /// The files of handoff adopts checked and not yet in the table (the deposit's wait lies
    /// between): a second adopt of the same pipe meanwhile — another id, another connection —
    /// is refused as if the first were adopted. Checked against the table alone, both were
    /// answered `ok` and the pipe's bytes split between two host streams.
    private let filesBeingAdopted = NIOLockedValueBox<(next: UInt64, entries: [UInt64: (uid: UInt32, files: [HeldStream])])>((0, [:]))

    /// `descriptorRefusal`, and on success the files registered as being adopted until the
    /// returned token is let go (`filesAdopted`).
    private func descriptorRefusalRegistering(_ request: AdoptRequest, _ descriptors: [Int32], uid: UInt32) -> (HoldfastError?, UInt64?) {
        var token: UInt64?
        let refusal = descriptorRefusal(request, descriptors, uid: uid) { checked in
            // Under the table's lock (as the held ones are read): one adopt after another.
            let ours = checked.compactMap { stream in stream.facts.file.map { HeldStream(process: request.process, kind: stream.kind, file: $0) } }
            filesBeingAdopted.withLockedValue { pending in
                pending.next &+= 1
                pending.entries[pending.next] = (uid, ours)
                token = pending.next
            }
        }
        return (refusal, token)
    }

    private func filesAdopted(_ token: UInt64?) {
        guard let token else { return }
        filesBeingAdopted.withLockedValue { _ = $0.entries.removeValue(forKey: token) }
    }

    private func descriptorRefusal(
        _ request: AdoptRequest, _ descriptors: [Int32], uid: UInt32, register: ([(kind: StreamKind, facts: DescriptorFacts)]) -> Void = { _ in }
    ) -> HoldfastError? {
        func refused(_ index: Int, _ reason: String) -> HoldfastError {
            let stream = request.streams[index]
            return HoldfastError(.badDescriptor, "streams[\(index)] (\(stream.kind.rawValue)): fd \(stream.fd) \(reason)")
        }
        var checked: [(kind: StreamKind, facts: DescriptorFacts)] = []
        for (index, stream) in request.streams.enumerated() {
            let facts: DescriptorFacts
            do {
                facts = try DescriptorFacts.of(descriptors[stream.fd])
            } catch {
                return refused(index, "cannot be looked at: \(error)")
            }
            if let refusal = AdoptCheck.descriptorRefusal(kind: stream.kind, facts: facts) { return refused(index, "is \(refusal)") }
            checked.append((stream.kind, facts))
        }
        return processes.withLockedValue { table -> HoldfastError? in
            let held = table.values.flatMap { process in
                process.consumedFiles.map { HeldStream(process: process.owner == .handoff(uid: uid) ? process.id : nil, kind: $0.kind, file: $0.file) }
            }
            // Another adopt's, checked and waiting for its deposit: named only as another's. Not
            // one of the same id by the same peer: a retry of that adopt, which the id's own
            // check answers (`process-exists`, being adopted).
            let pending = filesBeingAdopted.withLockedValue { state in
                state.entries.values.filter { !($0.uid == uid && $0.files.first?.process == request.process) }.flatMap(\.files)
            }.map { HeldStream(process: nil, kind: $0.kind, file: $0.file) }
            if let (index, reason) = AdoptCheck.sharingRefusal(checked, held: held + pending) { return refused(index, "is \(reason)") }
            register(checked)
            return nil
        }
    }

    /// Hands the supervisor copies of a handoff process's fds (`request` names its slots) and
    /// waits for its word. Nil when it keeps them (`adopting` becomes `request`); otherwise why
    /// not: refused, with the slots let go and `adopting` left as the peer asked; or no word in
    /// time, with `adopting` the request (its slots) and the word awaited.
    private func deposit(_ request: AdoptRequest, descriptors: [Int32], owner uid: UInt32, adopting: inout ValidatedAdoption) async -> String? {
        let process = request.process
        var copyFailure: SystemError?
        var copies = descriptors.map { fd in
            let copy = fcntl(fd, F_DUPFD_CLOEXEC, 0)
            if copy < 0 { copyFailure = SystemError.last("fcntl(F_DUPFD_CLOEXEC)") }
            return copy
        }
        var withSlots: ValidatedAdoption?
        do throws(HoldfastError) {
            if let copyFailure { throw HoldfastError(.badDescriptor, "cannot copy the fds for the supervisor: \(copyFailure)") }
            withSlots = try AdoptCheck.validate(request, descriptorCount: descriptors.count)
        } catch {
            for fd in copies where fd >= 0 { _ = close(fd) }
            copies = []
            _ = handoffs.withLockedValue { $0.end(process) }
            return "\(error)"
        }
        let ticket = depositAnswers.expect(process)
        await notifications.send(.handoffDeposited(HandoffDeposit(request: request, owner: uid, deposit: ticket.number), descriptors: copies))
        let answer = await depositAnswers.wait(ticket, timeout: Self.depositAnswerWait)
        guard let answer else {
            // No word in time: a supervisor stopped, or starved on a loaded guest. The deposit
            // waits in its channel and will be read. Letting it go here (as this broker once
            // did, with `handoff-ended` after it) left the process without crash-survival for
            // its whole life, however soon the supervisor came back. Adopted with its slots
            // instead: a crash after the supervisor kept the copies costs it nothing, and the
            // process is said to survive once the word comes (`depositAnswered`).
            adopting = withSlots!
            handoffs.withLockedValue { $0.awaitWord(process, deposit: ticket.number) }
            return "the supervisor did not answer its deposit within \(Self.depositAnswerWait.spoken): "
                + "it survives a broker crash once the supervisor keeps its fds (`list` shows it then)"
        }
        if answer.kept {
            adopting = withSlots!
            return nil
        }
        await handoffGone(process)
        return "the supervisor did not keep copies of its fds: \(answer.reason ?? "no reason given")"
    }

    /// The supervisor's word on a deposit (`handoff-kept`): to the adopt that waits for it, or,
    /// come after the adopt stopped waiting, to the process relayed meanwhile.
    func depositAnswered(_ answer: HandoffKept) {
        let process = answer.process
        // Matched by the deposit it answers, not only the id: a late answer to an earlier
        // deposit (released since, the id adopted again) was taken for the later one's — a
        // runtime told its process survives a broker crash on the word for another deposit.
        if depositAnswers.answer(process, question: answer.deposit, with: answer) { return }
        switch handoffs.withLockedValue({ $0.settleWord(process, kept: answer.kept, deposit: answer.deposit) }) {
        case true?:
            logger.notice("the supervisor kept a handoff process's fds after its adopt was answered: it survives a broker crash from now on", metadata: [
                "process": "\(process)"
            ])
        case false?:
            // Its slots stay its own until it leaves: its streams write their checkpoints there.
            logger.warning("the supervisor did not keep a handoff process's fds: it does not survive a broker crash", metadata: [
                "process": "\(process)", "error": "\(answer.reason ?? "no reason given")",
            ])
        case nil:
            // The process left first (its `handoff-ended` follows the deposit: the supervisor
            // let go of what it kept).
            logger.notice("the supervisor's word on a deposit came after its process left", metadata: [
                "process": "\(process)", "kept": "\(answer.kept)",
            ])
        }
    }

    /// A handoff peer's process left: its slots are cleared and free, the supervisor lets go of
    /// its copies.
    func handoffGone(_ process: String) async {
        // Cleared while still its: once free, another process may be given them.
        guard let slots = handoffs.withLockedValue({ $0.slots(of: process) }) else { return }
        for slot in slots {
            checkpoints?.checkpoint(slot)?.clear()
            rings?.clear(slot)
        }
        guard handoffs.withLockedValue({ $0.end(process) }) != nil else { return }
        await notifications.send(.handoffEnded(ProcessRequest(process: process)))
    }

    /// A process's stdin pipe was closed here: the supervisor closes its copy. Returns once
    /// the notification was written (a broker killed after that still leaves it to be read).
    func inputEnded(_ process: String, endedByHost: Bool) async {
        await notifications.send(.inputEnded(InputEndedNotification(process: process, endedByHost: endedByHost)))
    }

    /// A stdin the host ended is done with its END echo: the supervisor lets its slot go.
    func inputSettled(_ process: String, checkpoint: Int) {
        notifications.post(.inputSettled(InputSettledNotification(process: process, checkpoint: checkpoint)))
    }

    // MARK: Lifecycle events

    /// The process exited: its output streams drain (bounded by the drain timeout), its input
    /// streams close; a `drained` notification follows when every output stream is done.
    /// `caller`: nil for the supervisor; a handoff peer may say it only of its own processes, and
    /// the supervisor (which tells it again after a crash) is told so first — its own word needs
    /// no telling back.
    public func processExited(_ request: ProcessExitedRequest, by caller: ProcessOwner? = nil) async throws(HoldfastError) {
        let adopted = try managed(request.process, by: caller)
        // Said again (a runtime that retries, or one that repeats it on purpose): answered once
        // the first one's mark is written, and nothing more — the first drain reports. Each
        // repeat started a drain of its own (a task, a timer per output, its own `drained`), held
        // as long as the timeout it named: a peer repeating it with a day's timeout grew the
        // broker without bound.
        let byPeer = caller != nil
        let (marking, first) = adopted.markExit { [self] in
            guard byPeer, handoffs.withLockedValue({ $0.has(request.process) }) else { return }
            // Written before the answer: a crash during the drain leaves the supervisor to tell
            // the next broker, which would otherwise relay the process for good.
            await notifications.send(.handoffExited(ProcessRequest(process: request.process)))
            Failpoint.pass(Failpoint.brokerExitMarked, process: request.process)
        }
        await marking.value
        guard first else { return }
        let timeout = request.drainTimeoutMilliseconds.map { Duration.milliseconds($0) } ?? settings.drainTimeout
        Task { [self] in
            let (results, heldOpen) = await adopted.drain(timeout: timeout) { kind in
                logger.warning(
                    "the process exited while its \(kind.rawValue) relay waits in the kernel (another process holds the pipe's lock): its exit is reported without waiting, and the bytes of that write are not confirmed delivered",
                    metadata: ["process": "\(request.process)", "stream": "\(kind.rawValue)"])
            }
            // Those held open stay listed and counted live (before it leaves the table: no
            // moment when they are counted nowhere; `list` skips them while it is still there),
            // each counted in the totals as it ends. Under the table's lock, and only while the
            // process is in it: a release that took it out has counted every stream already.
            if !heldOpen.isEmpty {
                processes.withLockedValue { table in
                    if table[request.process] === adopted { holdPastExit(heldOpen, of: adopted) }
                }
            }
            // Removed first, then counted in the totals: a `stats` in between sees the bytes
            // neither here nor there (a dip the metrics absorb), never twice.
            let removed = processes.withLockedValue { table -> Bool in
                guard table[request.process] === adopted else { return false }
                table.removeValue(forKey: request.process)
                return true
            }
            if removed { for stream in adopted.status(excluding: heldOpen) { record(finished: stream) } }
            // Not ours to count: a release took it out of the table (and counted every stream).
            if !removed, !heldOpen.isEmpty { relayedPastExit.withLockedValue { _ = $0.removeValue(forKey: ObjectIdentifier(adopted)) } }
            let undelivered = results.reduce(0) { $0 + $1.undelivered + ($1.unconfirmed ?? 0) }
            // Given up, not still on its way: an output held open is counted when it ends
            // (`relayUntilEnded`); its count now is bytes in flight, not lost.
            let givenUp = results.filter { $0.ending != DrainedNotification.StreamResult.stillOpen }.reduce(0) { $0 + $1.undelivered }
            totals.withLockedValue { $0.undelivered &+= givenUp }
            // A warning when output was given up (the drain timeout): what `journalctl -p
            // warning` must show; an exit with every byte delivered is routine.
            // (Bytes an output held open still has in flight are not given up: no warning for them.)
            logger.log(level: givenUp > 0 ? .warning : .info, "process streams drained", metadata: [
                "process": "\(request.process)", "undelivered": "\(undelivered)", "givenUp": "\(givenUp)",
            ])
            // A handoff peer's slots are ours to free: not while an output held open still
            // writes into them (nor is the id free meanwhile).
            if removed, heldOpen.isEmpty { await handoffGone(request.process) }
            await notifications.send(.drained(DrainedNotification(process: request.process, streams: results)))
            guard !heldOpen.isEmpty else { return }
            // Whose slots they are, decided now (a handoff peer may adopt the id anew meanwhile):
            // the supervisor's, which it frees at `output-settled`, or a handoff peer's process's,
            // which are ours (`handoffGone` below).
            let supervisorsSlots = !handoffs.withLockedValue({ $0.has(request.process) })
            await relayUntilEnded(heldOpen, of: adopted, supervisorsSlots: supervisorsSlots, counted: removed)
            if removed { await handoffGone(request.process) }
        }
    }

    /// Relays outputs held open past their process's exit (an orphan writes on) until each
    /// ends, and says so for each slot of the supervisor's (`output-settled`: it frees the slots
    /// and closes its copies of the fds).
    /// `counted`: listed and counted in the totals as each ends (false when a release already
    /// counted them).
    func relayUntilEnded(_ streams: [ManagedStream], of owner: AdoptedProcess, supervisorsSlots: Bool, counted: Bool = true) async {
        let process = owner.id
        if counted { holdPastExit(streams, of: owner) }
        await withTaskGroup(of: Void.self) { group in
            for stream in streams {
                group.addTask { [self] in
                    // Relayed until the orphan lets go (end-of-file, then delivered) or the
                    // host stops taking it (the drain timeout without progress). One wait, not
                    // a bounded one in a loop: each bounded wait that times out leaves a waiter
                    // on the relay until it ends — an orphan that writes on for months made
                    // one every ten minutes.
                    let reports = await stream.finished()
                    stream.close()
                    // Out of the list, then into the totals (a dip, never twice: see the drain).
                    if counted {
                        let status = stream.status(process: process)
                        relayedPastExit.withLockedValue { relayed in
                            relayed[ObjectIdentifier(owner)]?.streams.removeAll { $0 === stream }
                            if relayed[ObjectIdentifier(owner)]?.streams.isEmpty == true { relayed.removeValue(forKey: ObjectIdentifier(owner)) }
                        }
                        for ended in status { record(finished: ended) }
                    }
                    // What it gave up (the host stopped taking it), counted and said now: its
                    // exit report went out long before, with its bytes then in flight.
                    let undelivered = reports.reduce(0) { $0 + $1.undelivered }
                    if undelivered > 0 { totals.withLockedValue { $0.undelivered &+= undelivered } }
                    logger.log(level: undelivered > 0 ? .warning : .info, "an output held open past its process's exit ended", metadata: [
                        "process": "\(process)", "stream": "\(stream.description.kind)", "undelivered": "\(undelivered)",
                    ])
                    // Sent after `drained`, on the same channel: the supervisor knows the
                    // slots are held open before it hears they are free.
                    if supervisorsSlots, let slot = stream.description.checkpoint {
                        notifications.post(.outputSettled(OutputSettledNotification(process: process, checkpoint: slot)))
                    }
                }
            }
        }
    }

    /// Lists `streams` (held open past `owner`'s exit) until each ends.
    private func holdPastExit(_ streams: [ManagedStream], of owner: AdoptedProcess) {
        relayedPastExit.withLockedValue { $0[ObjectIdentifier(owner)] = RelayedPastExit(owner: owner, streams: streams) }
    }

    /// `owner`'s outputs are no longer listed as held open (a release counted them).
    func forgetHeldOpen(of owner: AdoptedProcess) {
        relayedPastExit.withLockedValue { _ = $0.removeValue(forKey: ObjectIdentifier(owner)) }
    }

    public func closeStdin(_ process: String, by caller: ProcessOwner? = nil) async throws(HoldfastError) {
        let adopted = try managed(process, by: caller)
        guard adopted.closeInput() else {
            throw HoldfastError(.noStdin, "process '\(process)' has no input stream")
        }
        // A runtime's close: the supervisor closes its copy of the pipe before the runtime is
        // answered (the host's close-stdin has the supervisor close its own first). Told later
        // by the relay, a broker killed in between left the supervisor's copy open, the next
        // broker was handed a live stdin, and the process never read the end-of-file its
        // runtime had been told `ok` for.
        // Only where the supervisor holds a copy (a deposit), and bounded as the deposit's own
        // word is: a supervisor stopped with its channel full must not hold the runtime.
        if caller != nil, handoffs.withLockedValue({ $0.has(process) }) {
            _ = await Task { await inputEnded(process, endedByHost: false) }.value(within: Self.depositAnswerWait)
        }
        Failpoint.pass(Failpoint.brokerStdinClosed, process: process)
    }

    public func resize(_ request: ResizeRequest, by caller: ProcessOwner? = nil) async throws(HoldfastError) {
        let adopted = try managed(request.process, by: caller)
        try await adopted.resize(WindowSize(rows: request.rows, columns: request.columns))
    }

    /// The bridge was lost: every stream drops its connection (the host is going away).
    @discardableResult
    public func disconnectAll() -> Int {
        bridgeIsUp.withLockedValue { $0 = false }
        let count = registry.disconnectAll()
        logger.info("bridge lost: disconnected every stream", metadata: ["streams": "\(count)"])
        return count
    }

    /// The bridge is back: every parked stream dials now.
    @discardableResult
    public func bridgeUp() -> Int {
        bridgeIsUp.withLockedValue { $0 = true }
        let count = registry.redialAll()
        logger.info("bridge up: redialing every parked stream", metadata: ["streams": "\(count)"])
        return count
    }

    // MARK: Inspection

    /// Every stream, by process id: the live ones, and those of releases kept for their peers
    /// (state `kept`: a runtime that lost the answer, or restarted, sees what waits for it).
    public func list(ownedBy owner: ProcessOwner? = nil) -> [StreamStatus] {
        let inTable = processes.withLockedValue { Array($0.values) }
        let all = inTable.filter { owner == nil || $0.owner == owner }
        // A runtime's process the supervisor holds no copies of (yet) is said to be so.
        let unkept = handoffs.withLockedValue { slots in
            Set(all.filter { if case .handoff = $0.owner { !slots.isKept($0.id) } else { false } }.map(\.id))
        }
        let live = all.map { process in
            var streams = process.status()
            if unkept.contains(process.id) {
                for index in streams.indices { streams[index].survivesBrokerCrash = false }
            }
            return (id: process.id, streams: streams)
        }
        let kept = keptReleases.withLockedValue { $0.status(ownedBy: owner) }
        // Outputs an orphan holds open past its process's exit: relayed on, so listed (and
        // counted in `stats`) until they end, said to be so.
        // Not those whose process is still in the table (a drain lists them here just before it
        // takes the process out): listed twice, `stats` counted them twice, and the metrics'
        // counters, which never go down, kept the excess.
        let tableIDs = Set(inTable.map(ObjectIdentifier.init))
        let pastExit = relayedPastExit.withLockedValue { Array($0.values) }.filter { relayed in
            (owner == nil || relayed.owner.owner == owner) && !tableIDs.contains(ObjectIdentifier(relayed.owner))
        }.map { relayed in
            (id: relayed.owner.id, streams: relayed.streams.flatMap { stream in
                stream.status(process: relayed.owner.id).map { status in
                    var status = status
                    status.heldOpenPastExit = true
                    return status
                }
            })
        }
        return (live + kept + pastExit).sorted { $0.id < $1.id }.flatMap(\.streams)
    }

    /// The streams that are relayed (`list` without the kept releases).
    func liveStreams() -> [StreamStatus] { list().filter { $0.state != .kept } }

    /// The process `caller` manages (nil: the supervisor, which manages every process; a handoff
    /// peer only those it handed over), looked up and checked in one step under the table's lock
    /// — and taken out of the table with `removing`. Checked first and looked up again after, a
    /// process of the supervisor's adopted between the two was a peer's to release, drain or
    /// end the stdin of.
    func managed(_ process: String, by caller: ProcessOwner?, removing: Bool = false) throws(HoldfastError) -> AdoptedProcess {
        let found = processes.withLockedValue { table -> Result<AdoptedProcess, HoldfastError> in
            guard let adopted = table[process] else {
                return .failure(HoldfastError(.noSuchProcess, "no streams for process '\(process)'"))
            }
            if let refusal = Self.refusal(process, ownedBy: adopted.owner, to: caller) { return .failure(refusal) }
            if removing { table.removeValue(forKey: process) }
            return .success(adopted)
        }
        return try found.get()
    }

    /// Why `caller` (nil: the supervisor) may not manage `process`, handed over by `owner`.
    static func refusal(_ process: String, ownedBy owner: ProcessOwner, to caller: ProcessOwner?) -> HoldfastError? {
        guard let caller, caller != owner else { return nil }
        return HoldfastError(.permissionDenied, "process '\(process)' was handed over by \(owner), not by you")
    }

    public func stats() -> BrokerStats {
        // The totals first: a drain removes a process, then adds its streams to the totals, so
        // read the other way a stream between the two was counted in both.
        let gone = totals.withLockedValue { $0 }
        let streams = liveStreams()
        let malloc = Memory.mallocUsage()
        let handoff = handoffGate.withLockedValue { ($0.served, $0.turnedAway) }
        var stats = BrokerStats(
            processes: processes.withLockedValue { $0.count },
            streams: streams.count,
            connected: streams.filter { $0.state == .connected }.count,
            parked: streams.filter { $0.state == .parked }.count,
            bytesToHost: Self.since(streams.reduce(gone.bytesToHost) { $0 + $1.bytesToHost }, gone.carriedToHost),
            bytesFromHost: Self.since(streams.reduce(gone.bytesFromHost) { $0 + $1.bytesFromHost }, gone.carriedFromHost),
            reconnects: streams.reduce(gone.reconnects) { $0 + $1.reconnects },
            // With raw mode's loss: what dying connections had accepted (counted nowhere before).
            undelivered: streams.reduce(gone.undelivered) { $0 + $1.undelivered },
            openDescriptors: ProcessFigures.openDescriptors(),
            residentKiB: ProcessFigures.residentKiB(),
            mallocInUseKiB: malloc.inUse / 1024,
            mallocFreeKiB: malloc.free / 1024,
            liveProcessObjects: LiveObjects.processes.load(ordering: .relaxed),
            liveStreamObjects: LiveObjects.streams.load(ordering: .relaxed),
            lostBytes: Self.nonZero(Self.since(streams.reduce(gone.lost) { $0 + ($1.lostBytes ?? 0) }, gone.carriedLost)),
            reactorStalls: Reactor.shared.stalls > 0 ? Reactor.shared.stalls : nil,
            strandedReactorThreads: Reactor.shared.strandedThreads > 0 ? Reactor.shared.strandedThreads : nil)
        stats.handoffConnections = handoff.0
        stats.handoffTurnedAway = handoff.1
        let kept = keptReleases.withLockedValue { $0.count }
        stats.keptReleases = kept > 0 ? kept : nil
        stats.ioShortages = Self.nonZero(AsyncFD.shortagesWaitedOut)
        return stats
    }

    /// The process and stream whose fd is `fd` (the one a stuck syscall was given), if any.
    public func stream(onFD fd: Int32) -> (process: String, stream: StreamKind)? {
        for process in processes.withLockedValue({ Array($0.values) }) {
            if let kind = process.streamKind(onFD: fd) { return (process.id, kind) }
        }
        return nil
    }

    private static func nonZero(_ value: UInt64) -> UInt64? { value > 0 ? value : nil }

    /// Every broker metric in the Prometheus text format.
    public func metricsText() -> String {
        metrics.render(stats: stats(), states: list().map(\.state))
    }

    // MARK: Live upgrade

    /// A live upgrade hands every stream to the next binary's broker: this one exits at a moment
    /// when no stream is inside a take (a read from a pipe into the replay ring, or a write into
    /// a stdin pipe), so the successor resumes each one exactly from its checkpoint — no gap, no
    /// repeat, unlike a crash. Every take runs on the reactor's thread within one job (it marks
    /// the checkpoint pending, makes its syscall and settles it with no suspension in between,
    /// but for a stdin write that waits for room in a full pipe), so the check runs there too
    /// and exits in the same job: no take can begin between the two. A stream still inside a
    /// take at `limit` (a process that stopped reading its stdin) is left as a crash would
    /// leave it: its successor settles it from its window, or reports those bytes, never
    /// silently. Exit status 0: settled; 3: not settled in time.
    public func quiesce(within limit: Duration) {
        Failpoint.pass(Failpoint.brokerQuiescing, process: "broker")
        let deadline = ContinuousClock.now + limit
        let started = ContinuousClock.now
        Task(executorPreference: Reactor.shared) { [self] in
            while true {
                let relayed = processes.withLockedValue { Array($0.values) } + relayedPastExit.withLockedValue { $0.values.map(\.owner) }
                let pending = relayed.flatMap { process in
                    process.checkpoints.filter { ($0.recovered?.uncertain ?? 0) > 0 }.map { _ in process.id }
                }
                if pending.isEmpty || ContinuousClock.now >= deadline {
                    if pending.isEmpty {
                        logger.info("quiesced for a live upgrade: every stream settled", metadata: ["took": "\(ContinuousClock.now - started)"])
                    } else {
                        logger.warning("quiesce: streams still inside a take; their successors report it", metadata: ["processes": "\(Set(pending).sorted())"])
                    }
                    // The upgrade waits for this exit: a log nobody reads may delay it this long.
                    DaemonLogHandler.flush(withinMilliseconds: 500)
                    _exit(pending.isEmpty ? 0 : 3)
                }
                try? await Task.sleep(for: .milliseconds(1))
            }
        }
    }

    /// Stops everything (shutdown): relays are cancelled, streams closed, fds closed.
    public func shutdown() async {
        let all = processes.withLockedValue { table -> [AdoptedProcess] in
            defer { table.removeAll() }
            return Array(table.values)
        }
        for process in all { await process.stop() }
    }

    /// Gives malloc's free pages back to the system if streams finished since the last call
    /// (the broker role calls it every couple of seconds): a burst's buffers and slot state,
    /// freed from many threads, leave whole pages free in every thread's arena, resident until
    /// trimmed (RELIABILITY.md, "Soak"). Nil when nothing finished.
    public func tidyMemory() -> (streams: Int, residentBefore: Int, residentAfter: Int, took: Duration)? {
        let finished = streamsFinishedSinceTidy.withLockedValue { count -> Int in
            defer { count = 0 }
            return count
        }
        guard finished > 0 else { return nil }
        let before = ProcessFigures.residentKiB()
        let started = ContinuousClock.now
        Memory.returnFreePagesToTheSystem()
        return (finished, before, ProcessFigures.residentKiB(), ContinuousClock.now - started)
    }

    /// `total` less what was carried in (never below 0: a stream released to its peer leaves
    /// the sum, not what it carried in).
    static func since(_ total: UInt64, _ carried: UInt64) -> UInt64 { total >= carried ? total - carried : 0 }

    func record(finished stream: StreamStatus) {
        streamsFinishedSinceTidy.withLockedValue { $0 += 1 }
        totals.withLockedValue {
            $0.bytesToHost &+= stream.bytesToHost
            $0.bytesFromHost &+= stream.bytesFromHost
            $0.reconnects &+= stream.reconnects
            $0.undelivered &+= stream.undelivered
            $0.lost &+= stream.lostBytes ?? 0
        }
    }
}

/// What the broker tells the supervisor unasked (notifications, id 0).
public enum BrokerNotification: Sendable, Equatable {
    /// Every stream of an exited process finished: its exit can be reported.
    case drained(DrainedNotification)
    /// A process's stdin pipe was closed by the broker.
    case inputEnded(InputEndedNotification)
    case inputSettled(InputSettledNotification)
    /// An output held open past its process's exit ended: its slots may be reused.
    case outputSettled(OutputSettledNotification)
    /// A handoff peer's process was adopted: its request and copies of its fds (the sender
    /// closes them once sent) for the supervisor to keep.
    case handoffDeposited(HandoffDeposit, descriptors: [Int32])
    /// A handoff peer's process left the broker.
    case handoffEnded(ProcessRequest)
    /// A handoff peer's process is being released: the answer with its fds comes next.
    case handoffReleasing(ProcessRequest)
    /// A handoff peer said its process exited: the drain starts next.
    case handoffExited(ProcessRequest)

    public var frame: ControlFrame {
        switch self {
        case .drained(let drained): return ControlFrame(type: BrokerMessageType.drained.rawValue, id: 0, body: ControlJSON.encode(drained))
        case .inputEnded(let ended): return ControlFrame(type: BrokerMessageType.inputEnded.rawValue, id: 0, body: ControlJSON.encode(ended))
        case .inputSettled(let settled): return ControlFrame(type: BrokerMessageType.inputSettled.rawValue, id: 0, body: ControlJSON.encode(settled))
        case .outputSettled(let settled): return ControlFrame(type: BrokerMessageType.outputSettled.rawValue, id: 0, body: ControlJSON.encode(settled))
        case .handoffDeposited(let deposit, _):
            return ControlFrame(type: BrokerMessageType.handoffDeposited.rawValue, id: 0, body: ControlJSON.encode(deposit))
        case .handoffEnded(let process): return ControlFrame(type: BrokerMessageType.handoffEnded.rawValue, id: 0, body: ControlJSON.encode(process))
        case .handoffReleasing(let process):
            return ControlFrame(type: BrokerMessageType.handoffReleasing.rawValue, id: 0, body: ControlJSON.encode(process))
        case .handoffExited(let process):
            return ControlFrame(type: BrokerMessageType.handoffExited.rawValue, id: 0, body: ControlJSON.encode(process))
        }
    }

    /// The fds that go with it.
    public var descriptors: [Int32] {
        if case .handoffDeposited(_, let descriptors) = self { return descriptors }
        return []
    }
}

