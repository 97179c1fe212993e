import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import NIOConcurrencyHelpers
import Synchronization

/// Live instances of the broker's per-process objects: zero when the broker holds no process
/// (`stats`; the soak checks it at every quiet moment — a leak shows here before it shows in RSS).
enum LiveObjects {
    static let processes = Atomic<Int>(0)
    static let streams = Atomic<Int>(0)
}

/// One connection-backed stream end of the broker: raw or resumable.
enum StreamTransport: Sendable {
    case raw(ConnSlot<AsyncFD>)
    case resumable(ResumableStream<AsyncFD>)

    /// - Parameters:
    ///   - checkpoint: a resumable stream's slot in the shared checkpoint area, if it has one.
    ///   - resumeAt: where a stream taken over from a crashed broker goes on (nil: a new stream).
    static func make(
        _ endpoint: ValidatedEndpoint, mode: StreamModeName, direction: StreamDirection, settings: BrokerSettings,
        checkpoint: StreamCheckpoint? = nil, resumeAt: UInt64? = nil,
        ring: (storage: SharedRingStorage, restored: RestoredRing?, hole: Range<UInt64>?)? = nil, inputEnded: Bool = false,
        holdEndEcho: Bool = false, observer: (@Sendable (SlotEvent) -> Void)? = nil
    ) -> StreamTransport {
        switch (mode, endpoint.token, endpoint.secret) {
        case (.resumable, let token?, let secret?):
            var configuration = settings.resumable
            configuration.holdEndEcho = holdEndEcho
            return .resumable(GuestStreams.resumable(
                to: endpoint.address, token: token, secret: secret, direction: direction, configuration: configuration,
                policy: settings.redialPolicy, checkpoint: checkpoint, resumeAt: resumeAt, storage: ring?.storage, restoring: ring?.restored,
                hole: ring?.hole, inputEnded: inputEnded,
                observer: observer))
        case (.resumable, _, _):
            // AdoptCheck refuses a resumable stream without its token and secret.
            preconditionFailure("a validated resumable stream without its token or secret")
        case (.raw, _, _):
            return .raw(GuestStreams.raw(to: endpoint.address, name: endpoint.addressText, policy: settings.redialPolicy, observer: observer))
        }
    }

    var managed: any ManagedSlot {
        switch self {
        case .raw(let slot): return slot
        case .resumable(let stream): return stream
        }
    }

    var outbound: any OutboundStream {
        switch self {
        case .raw(let slot): return slot
        case .resumable(let stream): return stream
        }
    }

    var inbound: any InboundStream {
        switch self {
        case .raw(let slot): return slot
        case .resumable(let stream): return stream
        }
    }

    func close() {
        switch self {
        case .raw(let slot): slot.close()
        case .resumable(let stream): stream.close()
        }
    }

    func processExited(drainTimeout: Duration) {
        switch self {
        case .raw(let slot): slot.setDrainTimeout(drainTimeout)
        case .resumable(let stream): stream.processExited()
        }
    }

    var state: StreamState {
        let phase: SlotPhase
        switch self {
        case .raw(let slot): phase = slot.phase
        case .resumable(let stream): phase = stream.slot.phase
        }
        switch phase {
        case .connected: return .connected
        case .empty: return .parked
        case .closed: return .closed
        case .abandoned: return .abandoned
        }
    }

    /// Raw mode's loss: bytes a connection had accepted when it died, which may or may not have
    /// reached the host (resumable mode replays them: 0).
    var unconfirmed: UInt64 {
        guard case .raw(let slot) = self else { return 0 }
        return slot.statistics.bytesUnconfirmed
    }

    /// While parked, why its last dial failed, and how many failed since it was last connected.
    var dialTrouble: (lastError: String?, failures: UInt64?) {
        guard state == .parked else { return (nil, nil) }
        let statistics: SlotStatistics
        switch self {
        case .raw(let slot): statistics = slot.statistics
        case .resumable(let stream): statistics = stream.slot.statistics
        }
        return (statistics.lastDialError, statistics.dialFailuresSinceConnected > 0 ? statistics.dialFailuresSinceConnected : nil)
    }

    /// Bytes broker crashes took from this stream (reported to the host as gaps); nil when
    /// none. Those every broker before this one reported count too (the engine reads them from
    /// the checkpoint).
    var lostBytes: UInt64? {
        guard case .resumable(let stream) = self else { return nil }
        let lost = stream.statistics.lostBytesInAll
        return lost > 0 ? lost : nil
    }

    /// (bytes to the host, bytes from the host, reconnects)
    var figures: (UInt64, UInt64, UInt64) {
        switch self {
        case .raw(let slot):
            let stats = slot.statistics
            return (stats.bytesWritten, stats.bytesRead, stats.connects > 0 ? stats.connects - 1 : 0)
        case .resumable(let stream):
            let stats = stream.statistics
            let connects = stream.slot.statistics.connects
            let reconnects = connects > 0 ? connects - 1 : 0
            return stream.direction == .send ? (stats.acknowledged, 0, reconnects) : (0, stats.offset, reconnects)
        }
    }
}

/// One fd of a process and the host streams it is relayed to.
final class ManagedStream: Sendable {
    let description: StreamDescription
    let handle: AsyncFD
    /// To the host: stdout, stderr, a tty's output.
    let output: StreamTransport?
    /// Where the output's and the input's progress is kept, if they have slots.
    let outputCheckpoint: StreamCheckpoint?
    let inputCheckpoint: StreamCheckpoint?
    /// From the host: stdin, a tty's input.
    let input: StreamTransport?
    /// The output's window and the input's stage, with the level each had when this broker
    /// took them over (nil: the stream has none — raw, or not the supervisor's).
    private let outputWindow: (ends: WindowEnds, level: Int)?
    private let inputStage: (ends: WindowEnds, level: Int)?
    private let relay = NIOLockedValueBox<Task<[RelayReport], Never>?>(nil)
    /// The host ended this input: the relay is seeing its END echo home (see `start`).
    private let inputEnded = NIOLockedValueBox(false)
    private let lingerTimeout: Duration
    /// Tells the supervisor the stdin pipe was closed here: it holds a copy (so a broker crash
    /// gives the process no end-of-file), which must close too for the process to see one; and
    /// whether the host ended it (what a successor after a crash still owes the host).
    private let inputClosed: @Sendable (_ endedByHost: Bool) async -> Void
    /// Tells the supervisor a stdin the host ended is done with its END echo (its slot): the
    /// supervisor keeps such a stdin past the exit report until then (`input-settled`).
    private let inputSettled: @Sendable (_ checkpoint: Int) -> Void

    deinit { LiveObjects.streams.subtract(1, ordering: .relaxed) }

    init(_ stream: ValidatedStream, process: String, handle: AsyncFD, window: WindowEnds?, inputWindow: WindowEnds?, broker: Broker) {
        LiveObjects.streams.add(1, ordering: .relaxed)
        let description = stream.description
        self.description = description
        self.handle = handle
        // The windows (docs/ARCHITECTURE.md, "Surviving a broker crash"): a stdin's only window
        // is its stage; a tty's output has `window` and its input `inputWindow`. Their levels
        // now settle a take the crashed broker left pending, and are where the relays start.
        func measured(_ ends: WindowEnds?, _ name: String) -> (ends: WindowEnds, level: Int)? {
            guard let ends else { return nil }
            do {
                return (ends, try ends.level())
            } catch {
                broker.logger.error("cannot read a stream window's level: relayed without it", metadata: [
                    "process": "\(process)", "stream": "\(name)", "error": "\(error)",
                ])
                ends.close()
                return nil
            }
        }
        let kind = description.kind
        let measuredWindow = kind == .stdin ? nil : measured(window, kind.rawValue)
        let measuredStage = kind == .stdin ? measured(window, "stdin") : kind == .tty ? measured(inputWindow, "tty/input") : nil
        outputWindow = measuredWindow
        inputStage = measuredStage
        self.lingerTimeout = broker.settings.drainTimeout
        self.inputClosed = { [weak broker] endedByHost in await broker?.inputEnded(process, endedByHost: endedByHost) }
        self.inputSettled = { [weak broker] checkpoint in broker?.inputSettled(process, checkpoint: checkpoint) }
        // Handed over only to acknowledge and echo: ended from the start, so a drain leaves it be.
        if description.kind == .stdin, description.ended == true { inputEnded.withLockedValue { $0 = true } }
        func transport(_ endpoint: ValidatedEndpoint, _ direction: StreamDirection) -> StreamTransport {
            let name = description.kind == .tty && direction == .receive ? "tty/input" : description.kind.rawValue
            let watch = DialWatch(process: process, stream: name, address: endpoint.addressText, broker: broker)
            let metrics = broker.metrics.slotObserver()
            // Broker.adopt checked the slot exists. Read before the stream starts, which
            // overwrites it.
            var checkpoint = endpoint.checkpoint.flatMap { broker.checkpoints?.checkpoint($0) }
            let resumes = description.resume == true
            let level = (direction == .send ? measuredWindow : measuredStage)?.level
            let recovered = resumes ? checkpoint.flatMap { broker.recover($0, windowLevel: level, process: process, stream: name, direction: direction) } : nil
            let resumeAt = recovered.map { direction == .send ? $0.outputResumesAt : $0.inputResumesAt }
            // An output's replay ring lives in the shared ring area when its slot has one: a
            // resumed stream gets back what the crashed broker's ring held. A read the crash
            // interrupted leaves a hole at its end — its blocks were taken, but how much of them
            // the read filled cannot be known: those offsets go to the host as a gap.
            var ring: (storage: SharedRingStorage, restored: RestoredRing?, hole: Range<UInt64>?)?
            if direction == .send, description.mode == .resumable, let slot = endpoint.checkpoint, let storage = broker.rings?.storage(slot) {
                let restored = storage.start(restoringUpTo: resumeAt == nil ? nil : recovered.map(\.outputResumesAt))
                let hole = recovered?.outputHole(in: restored)
                if let restored { broker.restoredRing(restored, hole: hole, process: process, stream: name) }
                ring = (storage, restored, hole)
            }
            // What the interrupted take left unknown goes into the slot as the stream starts,
            // before its new state: an output's hole (its bytes are never sent as data); an input's
            // write the crash interrupted may have delivered its bytes, and the next ones start
            // before them, so they may reach the process twice — counted, carried to later
            // brokers and reported with the exit.
            if resumeAt != nil {
                let repeated = direction == .receive ? UInt64(recovered?.uncertain ?? 0) : 0
                checkpoint?.takenOver = StreamCheckpoint.TakenOver(hole: ring?.hole, repeated: repeated)
            }
            let made = StreamTransport.make(
                endpoint, mode: description.mode, direction: direction, settings: broker.settings, checkpoint: checkpoint, resumeAt: resumeAt,
                ring: ring, inputEnded: direction == .receive && resumeAt != nil && description.ended == true,
                // A stdin's END echo waits until the supervisor was told the host ended it
                // (below, after the relay): it is what lets the host forget the stream.
                holdEndEcho: description.kind == .stdin && description.ended != true
            ) { event in
                metrics(event)
                watch.event(event)
            }
            watch.watch(made.managed)
            return made
        }
        switch description.kind {
        case .stdout, .stderr:
            output = transport(stream.primary, .send)
            input = nil
        case .stdin:
            output = nil
            input = transport(stream.primary, .receive)
        case .tty:
            output = transport(stream.primary, .send)
            input = stream.ttyInput.map { transport($0, .receive) }
        }
        let slot = { (endpoint: ValidatedEndpoint?) in endpoint?.checkpoint.flatMap { broker.checkpoints?.checkpoint($0) } }
        outputCheckpoint = output == nil ? nil : slot(stream.primary)
        inputCheckpoint = input == nil ? nil : slot(description.kind == .stdin ? stream.primary : stream.ttyInput)
    }

    var transports: [StreamTransport] { [output, input].compactMap { $0 } }

    /// A raw output's loss so far (`StreamTransport.unconfirmed`), nil when none.
    var rawUnconfirmed: UInt64? {
        let count = output?.unconfirmed ?? 0
        return count > 0 ? count : nil
    }

    /// Output bytes the stream took from the process and the host has not acknowledged (a
    /// resumable stream's replay ring); 0 for raw mode, which keeps nothing. What still waits
    /// in the pipe is not counted: asking the kernel takes the pipe's lock, which the process
    /// may hold.
    var unacknowledgedOutput: UInt64 {
        guard case .resumable(let stream)? = output else { return 0 }
        let statistics = stream.statistics
        return statistics.offset - min(statistics.offset, statistics.acknowledged)
    }

    /// A resumable output whose pipe has ended: no byte will be added, it only drains.
    var outputEnded: Bool {
        guard case .resumable(let stream)? = output else { return false }
        return stream.producerEnded
    }

    func start(registry: SlotRegistry) {
        for transport in transports {
            registry.register(transport.managed)
            transport.managed.disconnect()  // the first dial
        }
        let handle = handle
        // Through the windows where the stream has them (concrete types either way: the relays
        // are generic, and the data path should not go through an existential).
        let windowed = outputWindow.map { WindowedSource(source: handle, window: $0.ends, level: $0.level) }
        // A stage is emptied by splicing it into the process's input. Into a sink a splice could
        // wait on (a handed-over socket: AsyncFD.foreignDescription) it would be bounced through
        // a buffer instead, and a crash between that read and its write loses the bytes unseen;
        // written directly, a crash inside a write is reported (possibly repeated). A stage a
        // predecessor left bytes in is still emptied first.
        let staging = inputStage.flatMap { stage in
            handle.spliceNeverWaits(asSource: false) || stage.level > 0 ? StagingSink(sink: handle, stage: stage.ends, level: stage.level) : nil
        }
        let source: any ByteReader = windowed ?? handle
        let sink: any ByteWriter = staging ?? handle
        let output = output
        let input = input
        let inputEnded = inputEnded
        let lingerTimeout = lingerTimeout
        let inputClosed = inputClosed
        let inputSettled = inputSettled
        // A stdin the host ended, resumed by a successor on /dev/null: the host's sender sends
        // END again on the next connection and gets its echo. A host that never comes back, or
        // forgot the stream, must not keep it for ever: bounded by the drain timeout.
        let resumedEnded = description.kind == .stdin && description.ended == true
        let settledSlot = description.mode == .resumable && description.kind == .stdin ? description.checkpoint : nil
        // A stdin that ends: a socket is shut down for writing first, so the process reads
        // end-of-file even while another fd of the same socket stays open (the runtime handed it
        // over for its stdout too, attached twice); closing our fd alone would never say it.
        let endInput = { [self] in
            if handle.isSocket { handle.shutdownWrite() }
            close()
        }
        // On the reactor's thread: a relay woken by readiness continues where it was seen.
        let task = Task(executorPreference: Reactor.shared) { () -> [RelayReport] in
            switch (output, input) {
            case (let output?, let input?):
                let report = await TtyRelay.run(reading: source, writing: sink, output: output.outbound, input: input.inbound)
                input.close()
                return [report.output, report.input]
            case (let output?, nil):
                if let windowed { return [await Relay.output(from: windowed, to: output.outbound)] }
                return [await Relay.output(from: handle, to: output.outbound)]
            case (nil, let input?):
                let bound = resumedEnded ? TimeoutWheel.shared.schedule(after: lingerTimeout) { input.close() } : nil
                defer { if let bound { TimeoutWheel.shared.cancel(bound) } }
                let report: RelayReport
                if let staging {
                    report = await Relay.input(from: input.inbound, to: staging)
                } else {
                    report = await Relay.input(from: input.inbound, to: handle)
                }
                // Cancelled: whoever stopped the relay owns the fd now — a release hands it
                // back, a drain or shutdown closes it. Closing it here lost stdin on release.
                if Task.isCancelled {
                    input.close()
                    return [report]
                }
                // The host ended stdin (or the process stopped reading): the process now sees
                // end-of-file. A resumable stream then stays, redialling if it must, until the
                // host has its END echo (bounded by the drain timeout): closed as soon as the
                // echo was written, a connection dropped with the echo unread (a migration at
                // that moment) left the host waiting for a reconnect that never came, and
                // reporting its last bytes as lost. The process exiting does not cut it short.
                guard case .resumable(let stream) = input, report.ending == .endOfStream else {
                    if !resumedEnded { await inputClosed(false) }
                    endInput()
                    input.close()
                    if resumedEnded, let settledSlot { inputSettled(settledSlot) }
                    return [report]
                }
                inputEnded.withLockedValue { $0 = true }
                // Written to the supervisor before the echo may go: once the host has the echo it
                // forgets the stream, so a broker killed after it must leave the supervisor
                // knowing the stdin ended (it hands the next broker the ended stdin, and closes
                // its own copy: the process reads end-of-file). Told after the echo, as it was,
                // a kill in between left the next broker a live stdin that never ended, its
                // process waiting on it for good.
                if !resumedEnded { await inputClosed(true) }
                stream.releaseEndEcho()
                endInput()
                _ = await stream.closeAfterEndDelivered(timeout: lingerTimeout)
                if let settledSlot { inputSettled(settledSlot) }
                return [report]
            case (nil, nil):
                return []
            }
        }
        relay.withLockedValue { $0 = task }
    }

    /// The host ended this input and the relay is seeing its END echo home: leave it be when
    /// the process exits (it closes itself, bounded).
    var endedByHost: Bool { inputEnded.withLockedValue { $0 } }

    /// Waits for the relay to finish, however long it takes.
    func finished() async -> [RelayReport] {
        guard let task = relay.withLockedValue({ $0 }) else { return [] }
        return await task.value
    }

    /// Waits for the relay to finish (at most `timeout`); nil if it is still running. Each call
    /// that times out leaves a waiter on the relay until it ends: for a bounded number of waits
    /// (an unbounded wait is `finished()`).
    func finished(within timeout: Duration) async -> [RelayReport]? {
        guard let task = relay.withLockedValue({ $0 }) else { return [] }
        return await task.value(within: timeout)
    }

    /// Stops relaying, waiting at most `bound` for the relay to end: false when it has not (its
    /// write is inside the kernel, waiting for a pipe lock another process holds), and the fd
    /// must not be closed until it has — its number could be reused under the write.
    func stop(within bound: Duration) async -> Bool {
        let task = relay.withLockedValue { $0 }
        task?.cancel()
        for transport in transports { transport.close() }
        guard let task else { return true }
        return await task.value(within: bound) != nil
    }

    /// Stops relaying and closes the streams; the fd stays open for `detach`.
    func stop() async {
        let task = relay.withLockedValue { $0 }
        task?.cancel()
        for transport in transports { transport.close() }
        _ = await task?.value
    }

    /// Closes everything (a stream that was never started).
    func discard() {
        for transport in transports { transport.close() }
        close()
    }

    /// Closes the process's fd and the windows (the supervisor keeps its copies of both).
    func close() {
        handle.close()
        outputWindow?.ends.close()
        inputStage?.ends.close()
    }

    func status(process: String) -> [StreamStatus] {
        var result: [StreamStatus] = []
        if let output {
            let (toHost, fromHost, reconnects) = output.figures
            result.append(StreamStatus(
                process: process, kind: description.kind, mode: description.mode, address: description.address,
                state: output.state, bytesToHost: toHost, bytesFromHost: fromHost, reconnects: reconnects, undelivered: output.unconfirmed,
                lastDialError: output.dialTrouble.lastError, failedDials: output.dialTrouble.failures,
                lostBytes: output.lostBytes))
        }
        if let input {
            let (toHost, fromHost, reconnects) = input.figures
            result.append(StreamStatus(
                process: process, kind: description.kind, direction: description.kind == .tty ? "input" : nil,
                mode: description.mode, address: description.inputAddress ?? description.address, state: input.state,
                bytesToHost: toHost, bytesFromHost: fromHost, reconnects: reconnects, undelivered: 0,
                lastDialError: input.dialTrouble.lastError, failedDials: input.dialTrouble.failures,
                lostBytes: input.lostBytes))
        }
        return result
    }
}

/// The streams of one process.
/// Who handed a process's stdio to the broker: the supervisor (processes it started), or a
/// runtime on the handoff socket, by uid. A handoff peer manages only its own.
public enum ProcessOwner: Sendable, Equatable, CustomStringConvertible {
    case supervisor
    case handoff(uid: UInt32)

    public var description: String {
        switch self {
        case .supervisor: return "the supervisor"
        case .handoff(let uid): return "a handoff peer with uid \(uid)"
        }
    }
}

final class AdoptedProcess: Sendable {
    let id: String
    let owner: ProcessOwner
    /// Its resumable streams' (address, token) pairs: taken while it lives.
    let identities: Set<ResumableIdentity>
    private let streams = NIOLockedValueBox<[ManagedStream]>([])
    private let terminalSizer = NIOLockedValueBox<TerminalSizer?>(nil)
    private let exitMarking = NIOLockedValueBox<Task<Void, Never>?>(nil)

    deinit { LiveObjects.processes.subtract(1, ordering: .relaxed) }

    /// Its exit was said: the first call's `mark` runs (once), and every call gets it to await —
    /// a repeat is answered only once what the first one writes before its answer is written.
    /// `first`: this call is the one that drains.
    func markExit(_ mark: @escaping @Sendable () async -> Void) -> (marking: Task<Void, Never>, first: Bool) {
        exitMarking.withLockedValue { marking in
            if let marking { return (marking, false) }
            let task = Task { await mark() }
            marking = task
            return (task, true)
        }
    }

    init(id: String, owner: ProcessOwner, identities: Set<ResumableIdentity> = []) {
        LiveObjects.processes.add(1, ordering: .relaxed)
        self.id = id
        self.owner = owner
        self.identities = identities
    }

    func start(_ managed: [ManagedStream], registry: SlotRegistry) {
        streams.withLockedValue { $0 = managed }
        for stream in managed { stream.start(registry: registry) }
    }

    private var all: [ManagedStream] { streams.withLockedValue { $0 } }

    /// Its streams whose fds are open and whose bytes a read takes away, by file.
    var consumedFiles: [(kind: StreamKind, file: FileIdentity)] {
        all.compactMap { stream in
            guard !stream.handle.isClosed, let file = stream.handle.consumedFile else { return nil }
            return (stream.description.kind, file)
        }
    }

    func streamKind(onFD fd: Int32) -> StreamKind? {
        all.first { $0.handle.fd == fd }?.description.kind
    }

    func release(registry: SlotRegistry) async -> ([StreamDescription], [Int32]) {
        var descriptions: [StreamDescription] = []
        var fds: [Int32] = []
        for stream in all {
            await stream.stop()
            for transport in stream.transports { registry.unregister(transport.managed) }
            guard let fd = stream.handle.detach() else { continue }
            stream.close()  // the windows: the handle is detached
            var description = stream.description.asReleased
            description.fd = fds.count
            descriptions.append(description)
            fds.append(fd)
        }
        return (descriptions, fds)
    }

    /// The process exited: inputs close; outputs get the drain timeout, then report. Also
    /// returns the outputs still open (held by an orphan of the process): still relayed, into
    /// their slots, for the caller to follow to their end.
    /// `onStuckInput`: told of an input whose relay did not stop within `inputStopBound`.
    func drain(
        timeout: Duration, onStuckInput: (StreamKind) -> Void = { _ in }
    ) async -> (results: [DrainedNotification.StreamResult], heldOpen: [ManagedStream]) {
        var results: [DrainedNotification.StreamResult] = []
        for stream in all {
            if stream.output == nil {
                // An input the host ended finishes on its own (its END echo must reach the
                // host); any other stops now — within a bound: its relay may be inside a write
                // the kernel holds (an orphan of the process holds the stdin pipe's lock, its
                // watchdog has taken the loop over), and waiting for it held the exit report
                // until the orphan let go, for good if it never did. The fd closes once that
                // write returns.
                if !stream.endedByHost {
                    if await stream.stop(within: Self.inputStopBound) {
                        stream.close()
                    } else {
                        onStuckInput(stream.description.kind)
                        Task {
                            await stream.stop()
                            stream.close()
                        }
                    }
                }
                continue
            }
            stream.output?.processExited(drainTimeout: timeout)
        }
        // The relay ends at the pipe's end-of-file; a grandchild that keeps the pipe open must not
        // hold the exit report forever, so the wait is bounded too — and the streams are waited
        // for together: an orphan holding stdout and stderr costs one bound, not two.
        let outputs = all.filter { $0.output != nil }
        let finished = await withTaskGroup(of: (Int, DrainedNotification.StreamResult).self) { group in
            for (index, stream) in outputs.enumerated() {
                group.addTask {
                    func ended(_ reports: [RelayReport]?) -> DrainedNotification.StreamResult? {
                        guard let report = reports?.first else { return nil }
                        stream.close()
                        return .init(
                            kind: stream.description.kind, bytes: report.bytes, undelivered: report.undelivered, ending: report.ending.rawValue,
                            lost: stream.output?.lostBytes, unconfirmed: stream.rawUnconfirmed)
                    }
                    if let result = ended(await stream.finished(within: timeout + .seconds(1))) { return (index, result) }
                    // Still running. Its pipe ended and it only drains what it holds (a slow
                    // host, a loaded machine): that is bounded — the drain timeout gives it up
                    // after `timeout` without progress, and nothing is added — so it is waited
                    // for (up to ten more times), for an exact count. With bytes on their way
                    // and no connection it is making no progress either: given up within
                    // `timeout` of its last progress (which may have come after the exit), or
                    // it reconnects and ends: waited for once more. Reported now instead, the
                    // bytes it gave up a moment later went uncounted (and the ones it delivered
                    // later counted as undelivered).
                    for _ in 0..<10 where stream.outputEnded || (stream.unacknowledgedOutput > 0 && stream.output?.state != .connected) {
                        if let result = ended(await stream.finished(within: timeout + .seconds(1))) { return (index, result) }
                        if !stream.outputEnded { break }
                    }
                    // Held open (an orphan of the process writes on, or its host keeps up): the
                    // exit goes out now, with what is still on its way as a count that is not
                    // final (the supervisor marks the exit cut short).
                    return (index, .init(
                        kind: stream.description.kind, bytes: stream.output?.figures.0 ?? 0, undelivered: stream.unacknowledgedOutput,
                        ending: DrainedNotification.StreamResult.stillOpen, lost: stream.output?.lostBytes, unconfirmed: stream.rawUnconfirmed))
                }
            }
            var byIndex: [Int: DrainedNotification.StreamResult] = [:]
            for await (index, result) in group { byIndex[index] = result }
            return byIndex
        }
        results += outputs.indices.compactMap { finished[$0] }
        let heldOpen = outputs.indices.filter { finished[$0]?.ending == DrainedNotification.StreamResult.stillOpen }.map { outputs[$0] }
        // An input reports only what crashes did to it (its bytes are not output to drain) — a
        // terminal's input too, in an entry of its own beside its output's (it was left out:
        // typed bytes a broker crash repeated into the terminal were never reported).
        for stream in all where stream.input != nil {
            let lost = stream.input?.lostBytes ?? 0
            let repeated = stream.inputCheckpoint?.repeated ?? 0
            if lost > 0 || repeated > 0 {
                results.append(.init(
                    kind: stream.description.kind, bytes: stream.input?.figures.1 ?? 0, undelivered: 0, ending: "input", lost: lost > 0 ? lost : nil,
                    repeated: repeated > 0 ? repeated : nil))
            }
        }
        return (results, heldOpen)
    }

    /// How long a drain waits for an input's relay to stop.
    static let inputStopBound = Duration.seconds(2)

    func closeInput() -> Bool {
        let inputs = all.compactMap(\.input)
        for input in inputs { input.close() }
        return !inputs.isEmpty
    }

    /// Resizes its terminal on the reactor's thread (`TerminalSizer`: the process can hold the
    /// terminal's size lock), answering within 2 s.
    func resize(_ size: WindowSize) async throws(HoldfastError) {
        guard let tty = all.first(where: { $0.description.kind == .tty }) else {
            throw HoldfastError(.noTTY, "process '\(id)' has no terminal")
        }
        let sizer = terminalSizer.withLockedValue { sizer in
            if sizer == nil { sizer = TerminalSizer(tty.handle) }
            return sizer!
        }
        switch await sizer.resize(to: size) {
        case .applied:
            return
        case .failed(let error):
            throw HoldfastError(.resizeFailed, "\(error)")
        case .pending:
            throw HoldfastError(
                .resizeFailed,
                "the terminal's process holds the terminal's size lock in the kernel: the size is applied when it lets go")
        }
    }

    func status() -> [StreamStatus] {
        all.flatMap { $0.status(process: id) }
    }

    /// The status of its streams but `excluded` (those held open past its exit, counted when
    /// each ends).
    func status(excluding excluded: [ManagedStream]) -> [StreamStatus] {
        all.filter { stream in !excluded.contains { $0 === stream } }.flatMap { $0.status(process: id) }
    }

    /// Where its streams keep their progress (a quiesce waits until none is inside a take).
    var checkpoints: [StreamCheckpoint] {
        all.flatMap { [$0.outputCheckpoint, $0.inputCheckpoint].compactMap { $0 } }
    }

    func stop() async {
        for stream in all {
            await stream.stop()
            stream.close()
        }
    }
}
