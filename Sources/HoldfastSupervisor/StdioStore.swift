import HoldfastCore
import HoldfastPosix
import HoldfastProtocol

/// The supervisor as the fd store (docs/ARCHITECTURE.md, "Surviving a broker crash"): the host
/// ends of every live process's stdio stay here while the broker relays copies of them, so a
/// broker's crash leaves every pipe with a holder — no process sees SIGPIPE, EPIPE or a false
/// end-of-file — and the next broker is handed the same fds with the same stream descriptions,
/// and resumes the streams from their checkpoints.
///
/// Pure bookkeeping under the supervisor's lock: which broker incarnation holds which process's
/// streams, which exits it was told of, which checkpoint slots are taken. The fds are numbers
/// here; the supervisor opens, duplicates and closes them.
struct StdioStore {
    /// Which broker incarnation has a process's streams, or is being handed them.
    enum Adoption: Equatable, Codable, Sendable {
        case adopting(Int)
        case adopted(Int)

        var incarnation: Int {
            switch self {
            case .adopting(let incarnation), .adopted(let incarnation): return incarnation
            }
        }
    }

    /// Written down whole by a live upgrade (`Snapshot`): a field added here travels to the next
    /// binary by itself. Every fd it holds must be listed in `heldDescriptors`, which the
    /// upgrade keeps open across the exec (a test checks that every `Int32` in here is listed).
    struct Held: Codable, Equatable, Sendable {
        /// As the first broker got it: fd indexes into `descriptors`, checkpoint slots named.
        var request: AdoptRequest
        /// The host ends (-1 once closed: a stdin the broker ended).
        var descriptors: [Int32]
        var adoption: Adoption
        /// The process exited: every broker that takes the streams over is told so.
        var exited = false
        /// The incarnation that was told (nil: none yet).
        var exitSentTo: Int?
        /// The broker that has it now was handed no stream (the only one, stdin, had ended).
        var nothingHandedOver = false
        /// Its stdin was ended by the host (an END, every byte before it written): a broker after
        /// a crash still owes the host the acknowledgements and the END echo the dead one may not
        /// have sent (a migration's blackout, say), and is handed the stream for them. Optional:
        /// absent from the state an older daemon hands over in a live upgrade.
        var inputEndedByHost: Bool?
        /// That ended stdin is done with its END echo (`input-settled`): nothing is owed for it.
        var inputSettled: Bool?
        /// The process is done and its exit reported; kept only for its ended stdin, whose END
        /// echo a broker crash must not lose (its outputs' fds and slots are gone). Released at
        /// `input-settled`.
        var keptForEcho: Bool?
        /// A handoff peer's process its broker was releasing (`handoff-releasing`): whether the
        /// peer got the fds is not known here, so a broker after a crash is handed them to keep,
        /// unrelayed, for the peer's next `release` (`AdoptRequest.releasing`).
        var releasing: Bool?
        /// Outputs the broker reported `still-open` at the exit (an orphan of the process holds
        /// them and writes on): it relays them still, into their slots, so at the release those
        /// slots are kept out of reuse (`heldOpen`) until it says they ended.
        var outputsHeldOpen: Set<StreamKind>?

        /// Every fd this entry holds open (fd numbers survive an exec unchanged).
        var heldDescriptors: [Int32] { descriptors.filter { $0 >= 0 } }
    }

    /// What a live upgrade hands to the next binary: every entry as it is (its fds are the same
    /// numbers in the next image), and the checkpoint slots' bookkeeping. Which broker had what
    /// is not in it: the next image's first broker is handed everything, as after a crash.
    struct Snapshot: Codable, Equatable, Sendable {
        var held: [String: Held]
        var slots: CheckpointSlots
        /// `heldOpen`'s slots, as a revision-2 daemon wrote them (without their fds, which it
        /// had closed): freed once the next image's first broker starts. Not written any more.
        var heldOpen: [Int]? = nil
        /// `heldOpen` whole: each output's fds are kept across the exec, and the next image's
        /// first broker resumes it.
        var heldOpenOutputs: [HeldOpen]? = nil

        /// Every fd its entries hold, in a stable order.
        var heldDescriptors: [Int32] {
            held.keys.sorted().flatMap { held[$0]!.heldDescriptors } + (heldOpenOutputs ?? []).flatMap(\.descriptors)
        }
    }

    func snapshot() -> Snapshot {
        Snapshot(held: held, slots: slots, heldOpenOutputs: heldOpen.isEmpty ? nil : heldOpen.keys.sorted().map { heldOpen[$0]! })
    }


    /// The store a live upgrade wrote down: every process is for the first broker to take over
    /// (adopted by incarnation 0, which never ran here), and every exit is owed to it.
    init(restoring snapshot: Snapshot) {
        slots = snapshot.slots
        for slot in snapshot.heldOpen ?? [] { heldOpen[slot] = HeldOpen(incarnation: 0, slots: [slot]) }
        for var output in snapshot.heldOpenOutputs ?? [] {
            output.incarnation = 0
            if let slot = output.slots.first { heldOpen[slot] = output }
        }
        held = snapshot.held.mapValues { entry in
            var entry = entry
            entry.adoption = .adopted(0)
            entry.exitSentTo = nil
            entry.nothingHandedOver = false
            return entry
        }
    }

    /// What a broker started after a crash is sent for one process: the request with `resume`
    /// set, and the indexes of the fds it names (the stdin the host ended is left out).
    struct Readoption {
        var process: String
        var request: AdoptRequest
        var descriptors: [Int32]
        /// Who had it before this claim, to put back if it is handed over later (`unclaim`).
        var previous: Adoption
    }

    /// The broker running now (its incarnation counts every start) and its channel.
    private(set) var incarnation = 0
    private(set) var client: ControlClient?
    private(set) var held: [String: Held] = [:]
    var slots: CheckpointSlots

    /// An output that outlived its process's exit report (an orphan of the process holds it and
    /// writes on), by its checkpoint slot, with the broker incarnation that relays it. Its slots
    /// stay out of reuse until the stream ends (`outputSettled`): freed at the exit, they went
    /// to another process's stream while the orphan's went on writing into them — its bytes
    /// into the other's replay ring, both checkpoints overwritten by the other. Its fds stay
    /// here too, as a live process's do, and a broker after a crash (or a live upgrade's next
    /// image) is handed it to resume (`handHeldOpen`): closed at the exit, the dying broker's
    /// copies were the pipe's last reader — the orphan's next write took SIGPIPE, and what the
    /// pipe and the ring held was lost, at every broker crash and every `dpkg -i`.
    struct HeldOpen: Codable, Equatable, Sendable {
        var incarnation: Int
        var slots: [Int]
        /// The process it was an output of (its id may be another process's by now).
        var process: String? = nil
        /// As the first broker got it, its fd indexes into `descriptors`; nil for one a
        /// revision-2 daemon's state named by its slot only (freed at the next broker's start).
        var stream: StreamDescription? = nil
        /// The output's host end and its windows' ends.
        var descriptors: [Int32] = []
    }

    private(set) var heldOpen: [Int: HeldOpen] = [:]

    init(slots: Int) {
        self.slots = CheckpointSlots(count: slots)
    }

    // MARK: Brokers

    /// A broker started: its incarnation.
    mutating func brokerStarted(_ client: ControlClient) -> Int {
        incarnation += 1
        self.client = client
        return incarnation
    }

    mutating func brokerGone(_ client: ControlClient) {
        if self.client === client { self.client = nil }
    }

    /// The incarnation `client` belongs to: the current one, or (a channel of a broker that has
    /// died since) an older one.
    func incarnation(of client: ControlClient) -> Int {
        self.client === client ? incarnation : incarnation - 1
    }

    /// The broker running now, if `incarnation` is behind it (a process adopted by a broker that
    /// died before its successor looked).
    func successor(of incarnation: Int) -> (incarnation: Int, client: ControlClient)? {
        guard let client, self.incarnation > incarnation else { return nil }
        return (self.incarnation, client)
    }

    // MARK: Processes

    /// Gives each resumable stream of `request` a checkpoint slot (its tty input one too), as
    /// far as slots last: a stream without one still relays, but does not survive a crash.
    mutating func assignCheckpoints(_ request: inout AdoptRequest) {
        for index in request.streams.indices where request.streams[index].mode == .resumable {
            request.streams[index].checkpoint = slots.allocate()
            if request.streams[index].inputAddress != nil { request.streams[index].inputCheckpoint = slots.allocate() }
        }
    }

    /// The slots `request` names but `kept`, given back (its process never started, or is done).
    mutating func freeCheckpoints(of request: AdoptRequest, keeping kept: Set<Int> = []) -> [Int] {
        let named = request.streams.flatMap { [$0.checkpoint, $0.inputCheckpoint].compactMap { $0 } }.filter { !kept.contains($0) }
        for slot in named { slots.free(slot) }
        return named
    }

    /// The broker that has `process` reported these of its outputs `still-open` at its exit.
    mutating func outputsHeldOpen(_ process: String, kinds: Set<StreamKind>) {
        guard !kinds.isEmpty, held[process] != nil else { return }
        held[process]?.outputsHeldOpen = kinds
    }

    /// The broker relaying an output held open past its process's exit says it ended (the
    /// output's checkpoint slot): its fds to close, and its slots, free, to be cleared. Nil
    /// for a slot not held open (said twice, or by a broker that was not handed it).
    mutating func outputSettled(slot: Int, by incarnation: Int) -> (descriptors: [Int32], slots: [Int])? {
        guard let entry = heldOpen[slot], entry.incarnation == incarnation else { return nil }
        return dropHeldOpen(slot: slot)
    }

    /// Lets go of the output held open in `slot`: its fds to close and its slots (free) to clear.
    mutating func dropHeldOpen(slot: Int) -> (descriptors: [Int32], slots: [Int])? {
        guard let entry = heldOpen.removeValue(forKey: slot) else { return nil }
        for slot in entry.slots { slots.free(slot) }
        return (entry.descriptors.filter { $0 >= 0 }, entry.slots)
    }

    /// An output held open past its process's exit, for broker `incarnation` to resume.
    struct HeldOpenHandover {
        var slot: Int
        var request: AdoptRequest
        var descriptors: [Int32]
    }

    /// The outputs held open by brokers before `incarnation` (gone: one broker runs at a time,
    /// and a new one starts once the last was reaped), each now broker `incarnation`'s to
    /// resume (the caller copies the fds to send them); and the slots of those a revision-2
    /// state named without their fds, freed, to be cleared.
    mutating func handHeldOpen(to incarnation: Int) -> (handed: [HeldOpenHandover], freed: [Int]) {
        var handed: [HeldOpenHandover] = []
        var freed: [Int] = []
        for (slot, entry) in heldOpen.sorted(by: { $0.key < $1.key }) where entry.incarnation < incarnation {
            guard var stream = entry.stream, let process = entry.process, !entry.descriptors.isEmpty else {
                freed += dropHeldOpen(slot: slot)?.slots ?? []
                continue
            }
            heldOpen[slot]?.incarnation = incarnation
            stream.resume = true
            handed.append(HeldOpenHandover(
                slot: slot, request: AdoptRequest(process: process, streams: [stream], orphanedOutput: true), descriptors: entry.descriptors))
        }
        return (handed, freed)
    }

    /// Records the held-open outputs of `entry` (being released) in `heldOpen`, with their fds;
    /// returns their slots, which the release must not free, and their fds, which it must not
    /// close.
    private mutating func keepHeldOpen(of entry: Held) -> (slots: Set<Int>, descriptors: Set<Int32>) {
        guard entry.request.handoffOwner == nil, let kinds = entry.outputsHeldOpen else { return ([], []) }
        var kept: (slots: Set<Int>, descriptors: Set<Int32>) = ([], [])
        for var stream in entry.request.streams where kinds.contains(stream.kind) {
            guard let slot = stream.checkpoint else { continue }  // a raw output: no slot, not resumed
            let slots = [slot] + (stream.inputCheckpoint.map { [$0] } ?? [])
            var descriptors: [Int32] = []
            func carry(_ index: Int) -> Int? {
                guard entry.descriptors.indices.contains(index), entry.descriptors[index] >= 0 else { return nil }
                descriptors.append(entry.descriptors[index])
                return descriptors.count - 1
            }
            func carry(_ window: WindowPipe?) -> WindowPipe? {
                guard let window, let read = carry(window.read) else { return nil }
                guard let write = carry(window.write) else {
                    descriptors.removeLast()
                    return nil
                }
                return WindowPipe(read: read, write: write)
            }
            if let fd = carry(stream.fd) {
                stream.fd = fd
                stream.window = carry(stream.window)
                stream.inputWindow = carry(stream.inputWindow)
            } else {
                descriptors = []
            }
            heldOpen[slot] = HeldOpen(
                incarnation: entry.adoption.incarnation, slots: slots, process: descriptors.isEmpty ? nil : entry.request.process,
                stream: descriptors.isEmpty ? nil : stream, descriptors: descriptors)
            kept.slots.formUnion(slots)
            kept.descriptors.formUnion(descriptors)
        }
        return kept
    }

    /// A process's streams were adopted by broker `incarnation`; its host ends stay here.
    /// Returns what an earlier entry of the id leaves (the caller closes the fds and clears the
    /// slots): a process kept only for its stdin's END echo (the new process takes the id, the
    /// old echo is given up), or a handoff peer's process the broker is done with — it let this
    /// id in, so it no longer holds that one — whose `handoff-ended` is not read yet (the reply
    /// to the adopt can overtake that notification). Overwritten, its copies stayed open for good.
    @discardableResult
    /// `stillAdopting`: broker `incarnation` has not answered the adopt yet (a create answered
    /// late): its exit is not told until it has (`adopted`), since a `process-exited` could
    /// overtake the adopt on the broker's channel.
    mutating func keep(
        _ process: String, request: AdoptRequest, descriptors: [Int32], adoptedBy incarnation: Int, stillAdopting: Bool = false
    ) -> (descriptors: [Int32], slots: [Int]) {
        let evicted = held[process] == nil ? nil : release(process, evenForEcho: true)
        held[process] = Held(request: request, descriptors: descriptors, adoption: stillAdopting ? .adopting(incarnation) : .adopted(incarnation))
        return evicted ?? ([], [])
    }

    /// Whether `process` had a stdin pipe that was closed here (the host's close-stdin).
    func inputClosed(_ process: String) -> Bool {
        guard let entry = held[process], let stdin = entry.request.streams.first(where: { $0.kind == .stdin }) else { return false }
        return entry.descriptors.indices.contains(stdin.fd) && entry.descriptors[stdin.fd] < 0
    }

    /// A handoff peer's process that broker `incarnation` adopted and deposited here (copies of
    /// its fds, its streams with the broker's checkpoint slots): handed to the next broker like
    /// the supervisor's own. Refused (the caller closes the fds and says why) if the id is held:
    /// by a live process, or by one of ours kept only for its stdin's END echo — a runtime's
    /// process is told it is not kept rather than take the host's echo its crash-survival (the
    /// host's own next process of the id does take it over: `keep`).
    mutating func keepHandoff(_ deposit: HandoffDeposit, descriptors: [Int32], adoptedBy incarnation: Int) -> HandoffKeeping {
        let process = deposit.request.process
        if let entry = held[process] { return entry.keptForEcho == true ? .heldForEcho : .held }
        var request = deposit.request
        request.handoffOwner = deposit.owner
        held[process] = Held(request: request, descriptors: descriptors, adoption: .adopted(incarnation))
        return .kept
    }

    /// What `keepHandoff` did.
    enum HandoffKeeping: Equatable {
        case kept
        /// A live process holds the id.
        case held
        /// A process of ours holds the id for its stdin's END echo.
        case heldForEcho
    }

    /// The `limit` smallest of `keys`, in order: one pass keeping a short sorted list, not a
    /// sort of them all — a broker's restart claims its processes 8 at a time, and sorting every
    /// entry for each batch cost 3,000 processes some 13 million string comparisons while every
    /// stream waited.
    static func first(_ limit: Int, of keys: some Sequence<String>) -> [String] {
        guard limit < 64 else { return Array(keys.sorted().prefix(limit)) }
        var smallest: [String] = []
        for key in keys {
            if smallest.count == limit, let last = smallest.last, key >= last { continue }
            let index = smallest.firstIndex { key < $0 } ?? smallest.endIndex
            smallest.insert(key, at: index)
            if smallest.count > limit { smallest.removeLast() }
        }
        return smallest
    }

    /// Up to `limit` of the processes broker `incarnation` (the current one) does not have yet,
    /// each marked as being handed to it. Empty once every one is, or if `incarnation` is no
    /// longer current. The caller copies each batch's fds to send them: a bounded batch bounds
    /// the fds a restart needs on top of those kept (`Supervisor.descriptorReserve`).
    mutating func claim(for incarnation: Int, limit: Int = .max) -> [Readoption] {
        guard incarnation == self.incarnation else { return [] }
        var claimed: [Readoption] = []
        for process in Self.first(limit, of: held.lazy.filter { $0.value.adoption.incarnation < incarnation }.map(\.key)) {
            guard let entry = held[process] else { continue }
            held[process]?.adoption = .adopting(incarnation)
            if entry.releasing == true {
                claimed.append(Self.keptRelease(of: process, entry))
                continue
            }
            var request = AdoptRequest(
                process: process, streams: [], handoffOwner: entry.request.handoffOwner, endingInput: entry.keptForEcho == true ? true : nil)
            var descriptors: [Int32] = []
            // A window goes with its stream, at the indexes of this request.
            func carry(_ window: WindowPipe?) -> WindowPipe? {
                guard let window, entry.descriptors.indices.contains(window.read), entry.descriptors.indices.contains(window.write),
                    entry.descriptors[window.read] >= 0, entry.descriptors[window.write] >= 0
                else { return nil }
                descriptors += [entry.descriptors[window.read], entry.descriptors[window.write]]
                return WindowPipe(read: descriptors.count - 2, write: descriptors.count - 1)
            }
            for var stream in entry.request.streams {
                var fd = entry.descriptors[stream.fd]
                if fd < 0 {
                    // Closed: handed over only if the host ended it, resumably, with a checkpoint
                    // to resume from (then at offset of its END, so nothing more is taken).
                    // and not once its echo was seen home (`input-settled`).
                    guard stream.kind == .stdin, stream.mode == .resumable, stream.checkpoint != nil, entry.inputEndedByHost == true,
                        entry.inputSettled != true
                    else { continue }
                    fd = Self.endedInput
                    stream.ended = true
                }
                stream.fd = descriptors.count
                stream.resume = true
                descriptors.append(fd)
                stream.window = carry(stream.window)
                stream.inputWindow = carry(stream.inputWindow)
                request.streams.append(stream)
            }
            held[process]?.nothingHandedOver = request.streams.isEmpty
            claimed.append(Readoption(process: process, request: request, descriptors: descriptors, previous: entry.adoption))
        }
        return claimed
    }

    /// A claimed process could not be handed over yet (no fd for its copies, here or in the
    /// broker): it is the broker's to take again, as if never claimed, at the next `claim`.
    mutating func unclaim(_ claimed: Readoption, for incarnation: Int) {
        guard held[claimed.process]?.adoption == .adopting(incarnation) else { return }
        held[claimed.process]?.adoption = claimed.previous
    }

    /// A release a broker crash interrupted, for the next broker to keep: each stream whose fd
    /// is still held, without its windows (nothing is relayed) and nothing to resume.
    private static func keptRelease(of process: String, _ entry: Held) -> Readoption {
        var request = AdoptRequest(process: process, streams: [], handoffOwner: entry.request.handoffOwner, releasing: true)
        var descriptors: [Int32] = []
        for var stream in entry.request.streams where entry.descriptors.indices.contains(stream.fd) && entry.descriptors[stream.fd] >= 0 {
            descriptors.append(entry.descriptors[stream.fd])
            stream.fd = descriptors.count - 1
            stream.window = nil
            stream.inputWindow = nil
            request.streams.append(stream)
        }
        return Readoption(process: process, request: request, descriptors: descriptors, previous: entry.adoption)
    }

    /// `process`'s broker is releasing it to its handoff peer (`handoff-releasing`); nothing
    /// for a process of the supervisor's own.
    mutating func releasing(_ process: String) {
        guard held[process]?.request.handoffOwner != nil else { return }
        held[process]?.releasing = true
    }

    /// A handoff peer told the broker its process exited (`handoff-exited`): marked exited, and
    /// told to this broker already, so only a broker after a crash of it is told again (it then
    /// drains the process and lets it go). Nothing for a process of the supervisor's own.
    mutating func handoffExited(_ process: String) {
        guard let entry = held[process], entry.request.handoffOwner != nil else { return }
        held[process]?.exited = true
        held[process]?.exitSentTo = entry.adoption.incarnation
    }

    mutating func adopted(_ process: String, by incarnation: Int) {
        guard held[process]?.adoption == .adopting(incarnation) else { return }
        held[process]?.adoption = .adopted(incarnation)
    }

    mutating func exited(_ process: String) {
        held[process]?.exited = true
    }

    /// Whether the store was told `process` exited; nil if it holds nothing of it.
    func knowsExited(_ process: String) -> Bool? { held[process]?.exited }

    /// What to do about an exited process's streams.
    enum ExitDelivery {
        /// Tell this broker (`processExited`): it has the streams and was not told yet.
        case tell(ControlClient)
        /// Nothing is left to drain (its only stream, stdin, was ended): report it now.
        case nothingToDrain
        /// Not exited, or no broker has its streams yet (the next one is told), or told already.
        case notDue
    }

    /// If `process` exited and the current broker has its streams but was not told yet: marks it
    /// told and returns the broker's channel (the caller sends `processExited`).
    mutating func takeExitDue(_ process: String) -> ExitDelivery {
        guard let entry = held[process], entry.exited, let client, entry.adoption == .adopted(incarnation),
            entry.exitSentTo != incarnation
        else { return .notDue }
        guard !entry.nothingHandedOver else {
            held[process]?.exitSentTo = incarnation
            return .nothingToDrain
        }
        held[process]?.exitSentTo = incarnation
        return .tell(client)
    }

    /// Whether the store holds `process`'s stdin open (a pipe, not a terminal's).
    func holdsInput(_ process: String) -> Bool {
        guard let entry = held[process], let stdin = entry.request.streams.first(where: { $0.kind == .stdin }) else { return false }
        return entry.descriptors[stdin.fd] >= 0
    }

    /// The broker closed `process`'s stdin: returns the fd to close (nil if none is held).
    mutating func inputEnded(_ process: String, endedByHost: Bool) -> Int32? {
        guard let entry = held[process], let stdin = entry.request.streams.first(where: { $0.kind == .stdin }) else { return nil }
        let fd = entry.descriptors[stdin.fd]
        guard fd >= 0 else { return nil }
        held[process]?.descriptors[stdin.fd] = -1
        if endedByHost { held[process]?.inputEndedByHost = true }
        return fd
    }

    /// In a `Readoption`'s descriptors: an input the host ended, handed over on /dev/null (the
    /// caller opens it): its successor resumes it from its checkpoint only to acknowledge what
    /// was written and echo the END.
    static let endedInput: Int32 = -2

    /// The process is done (exit reported): its fds to close and its slots to clear; the slots
    /// are free again. A handoff peer's process's slots are the broker's: it clears and reuses
    /// them itself, so none are returned.
    ///
    /// A stdin the host ended whose END echo is not known to be home (no `input-settled` yet)
    /// stays, alone, unless `evenForEcho`: a broker crash before the echo reached the host would
    /// otherwise leave the host's sender waiting out its drain timeout and reporting delivered
    /// bytes as undelivered. Everything else of the process is returned.
    mutating func release(_ process: String, evenForEcho: Bool = false) -> (descriptors: [Int32], slots: [Int])? {
        guard let entry = held.removeValue(forKey: process) else { return nil }
        let (heldOpenSlots, heldOpenDescriptors) = keepHeldOpen(of: entry)
        if !evenForEcho, entry.request.handoffOwner == nil, entry.inputEndedByHost == true, entry.inputSettled != true,
            let stdin = entry.request.streams.first(where: { $0.kind == .stdin && $0.mode == .resumable }),
            let slot = stdin.checkpoint, entry.descriptors.indices.contains(stdin.fd), entry.descriptors[stdin.fd] < 0
        {
            var kept = entry
            var stream = stdin
            stream.fd = 0
            stream.window = nil
            kept.request.streams = [stream]
            kept.descriptors = [-1]
            kept.keptForEcho = true
            held[process] = kept
            let others = entry.request.streams.flatMap { [$0.checkpoint, $0.inputCheckpoint].compactMap { $0 } }.filter {
                $0 != slot && !heldOpenSlots.contains($0)
            }
            for other in others { slots.free(other) }
            return (entry.descriptors.filter { $0 >= 0 && !heldOpenDescriptors.contains($0) }, others)
        }
        let slots = entry.request.handoffOwner == nil ? freeCheckpoints(of: entry.request, keeping: heldOpenSlots) : []
        return (entry.descriptors.filter { $0 >= 0 && !heldOpenDescriptors.contains($0) }, slots)
    }

    /// The broker says `process`'s ended stdin (checkpoint `slot`) is done with its END echo.
    /// If the process was kept only for that echo, it is released now (its fds and slots are
    /// returned); a `slot` that is not this process's stdin's (a later process of the same id)
    /// changes nothing.
    mutating func inputSettled(_ process: String, slot: Int) -> (descriptors: [Int32], slots: [Int])? {
        guard let entry = held[process], entry.request.streams.contains(where: { $0.kind == .stdin && $0.checkpoint == slot }) else {
            return nil
        }
        held[process]?.inputSettled = true
        return entry.keptForEcho == true ? release(process, evenForEcho: true) : nil
    }

    /// Whether `process` is kept only for its stdin's END echo.
    func isKeptForEcho(_ process: String) -> Bool { held[process]?.keptForEcho == true }

    /// Whether `process` is a handoff peer's (deposited by a broker).
    func isHandoff(_ process: String) -> Bool { held[process]?.request.handoffOwner != nil }

    /// The first host end kept of a process of the supervisor's own — a terminal process's
    /// master (`Launcher.makeStdio`, runc's console) — if still open; nil for a handed-over one.
    func firstHostEnd(of process: String) -> Int32? {
        guard let entry = held[process], entry.request.handoffOwner == nil, let first = entry.descriptors.first, first >= 0 else { return nil }
        return first
    }
}

/// The slot numbers of the checkpoint area. A freed slot is reused only after many others were
/// freed (first in, first out): a stream that outlived its process's report (an input seeing
/// its END echo home) might still write one last value into its slot, and must not land in a
/// newer stream's. New slots are taken while the quarantine fills, so the pages touched stay
/// few (only those cost memory).
struct CheckpointSlots: Codable, Equatable, Sendable {
    let count: Int
    /// Slots never handed out here (the broker's, for handoff peers' streams).
    let reserved: Range<Int>
    /// Freed slots this many deep are reused before new ones.
    static let quarantine = Failpoint.slotQuarantine ?? 1024
    private var nextUnused = 0
    private var freed: [Int] = []
    private var freedHead = 0

    init(count: Int, reserved: Range<Int> = CheckpointMemory.handoffSlots) {
        self.count = count
        self.reserved = reserved
    }

    mutating func allocate() -> Int? {
        let waiting = freed.count - freedHead
        if waiting > 0, waiting > Self.quarantine || nextUnused >= count {
            let slot = freed[freedHead]
            freedHead += 1
            if freedHead > 4096, freedHead * 2 > freed.count {
                freed.removeFirst(freedHead)
                freedHead = 0
            }
            return slot
        }
        if reserved.contains(nextUnused) { nextUnused = reserved.upperBound }
        guard nextUnused < count else { return nil }
        defer { nextUnused += 1 }
        return nextUnused
    }

    mutating func free(_ slot: Int) {
        freed.append(slot)
    }
}
