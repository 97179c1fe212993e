import HoldfastProtocol
import NIOConcurrencyHelpers

// MARK: - The engine: the protocol's two halves under one lock, and the tasks that move frames

extension ResumableStream {
    /// The driver of one resumable stream end. The protocol's decisions are made by two values,
    /// `ResumableSender` (the send direction) and `ResumableReceiver` (the receive direction),
    /// held under one lock with what only the driver needs: the tasks waiting (producer, pump,
    /// drain, END echo), the right to write frames, hello attempts. The engine does the I/O the
    /// machines ask for — one readv or sendmsg at a time, on the stream's executor — and reports
    /// back what happened. Its tasks: the pump (`+Writing`: everything this end writes), and
    /// the readers (`+Reading`: data on the receive side, acknowledgements on the send side).
    final class Engine: Sendable {
        let direction: StreamDirection
        let configuration: ResumableConfiguration
        let executor: (any TaskExecutor)?
        let state: NIOLockedValueBox<State>
        /// Frame headers of one batched write (used by whoever holds the sending token).
        let headers = ScratchBytes(count: StreamFramePrefix.size * Engine.maxFramesPerWrite)
        /// The next frame's header as it arrives (used by the one receiving task).
        let inboundHeader = ScratchBytes(count: StreamFramePrefix.size)

        typealias State = ResumableEngineState
        /// The stream's session type, named here for the engine's extensions in other files.
        typealias Session = ResumableSession<Transport>

        /// Most bytes one sender write takes (one sendmsg).
        static var maximumBatch: Int { 1 << 20 }
        /// Frames one sendmsg may carry (each a header and its body's regions).
        static var maxFramesPerWrite: Int { 16 }

        /// This end resumed after its relay crashed (its hellos say so).
        let restarted: Bool
        /// Where the stream's progress is kept for a relay that outlives a crash of this one.
        let checkpoint: StreamCheckpoint?
        /// Bytes earlier incarnations of this stream reported lost, and where the highest of
        /// them ended (from the checkpoint).
        let lostBefore: (bytes: UInt64, to: UInt64)

        /// This stream's loss over every incarnation: the earlier ones' count, and this one's
        /// ranges above what they already counted.
        func lostInAll(_ record: GapRecord) -> (bytes: UInt64, to: UInt64) {
            var bytes = lostBefore.bytes
            var to = lostBefore.to
            for range in record.ranges {
                let from = max(range.lowerBound, lostBefore.to)
                if range.upperBound > from { bytes += range.upperBound - from }
                to = max(to, range.upperBound)
            }
            return (bytes, to)
        }

        /// A gap was recorded: the checkpoint keeps the total for a successor.
        func noteLoss(_ record: GapRecord) {
            guard let checkpoint else { return }
            let all = lostInAll(record)
            checkpoint.lost(total: all.bytes, to: all.to)
        }

        init(
            direction: StreamDirection, configuration: ResumableConfiguration, storage: any RingBlockStorage, executor: (any TaskExecutor)?,
            resumeAt: UInt64?, restoring: RestoredRing?, hole: Range<UInt64>?, checkpoint: StreamCheckpoint?
        ) {
            precondition(restoring == nil || restoring?.end == resumeAt, "a restored ring ends where the stream resumes")
            self.direction = direction
            self.configuration = configuration
            self.executor = executor
            self.restarted = resumeAt != nil
            self.checkpoint = checkpoint
            let start = resumeAt ?? 0
            // What earlier incarnations lost is this stream's too (read before `start` below).
            let earlier = resumeAt != nil ? checkpoint?.recovered : nil
            self.lostBefore = (earlier?.lost ?? 0, earlier?.lostTo ?? 0)
            self.state = NIOLockedValueBox(
                State(
                    sender: ResumableSender(
                        ring: restoring.map { ReplayRing(capacity: configuration.ringCapacity, storage: storage, restoring: $0) }
                            ?? ReplayRing(capacity: configuration.ringCapacity, storage: storage, start: start),
                        restarted: resumeAt != nil, hole: hole),
                    receiver: ResumableReceiver(ackEvery: configuration.ackEvery, start: start, 
                        // A checkpointed receiver must acknowledge only what reached the process:
                        // its checkpoint counts delivered bytes, and a successor resumes there.
                        acknowledgeDelivered: configuration.acknowledgeDelivered || (checkpoint != nil && direction == .receive))))
            if configuration.holdEndEcho { state.withLockedValue { $0.receiver.endEchoHeld = true } }
            checkpoint?.start(at: start, resumed: resumeAt != nil)
            // A hole is lost from the start: in the slot now (the range and the count), so a
            // broker killed before its GAP went out hands both to the next one, which must not
            // send those offsets' bytes as data either.
            if let hole {
                checkpoint?.hole(hole)
                noteLoss(state.withLockedValue { $0.sender.lost })
            }
        }

        /// Send side: the producer has ended (`finish`): what is left is a bounded drain.
        var producerEnded: Bool { state.withLockedValue { $0.sender.finalOffset != nil } }

        var statistics: ResumableStatistics {
            state.withLockedValue { s in
                var stats = s.statistics
                stats.offset = direction == .send ? s.sender.offset : s.receiver.received
                stats.acknowledged = s.sender.acknowledged
                stats.ringBytes = s.sender.ring.count
                stats.ringBlocks = s.sender.ring.blockCount
                stats.replayedBytes = s.sender.replayedBytes
                stats.sentBytes = s.sender.everSent
                stats.lost = direction == .send ? s.sender.lost : s.receiver.lost
                stats.lostBytesInAll = lostInAll(stats.lost).bytes
                stats.ended = direction == .send ? s.sender.endEchoReceived : s.receiver.inboundFinal != nil
                return stats
            }
        }

        var debugSummary: String {
            state.withLockedValue { s in
                let sender = s.sender
                let receiver = s.receiver
                return "\(direction) ring [\(sender.acknowledged), \(sender.offset)) final \(sender.finalOffset.map(String.init) ?? "-") "
                    + "echo \(sender.endEchoReceived) producer \(s.producer != nil) sending \(s.sending) doorbell \(s.doorbell) "
                    + "pumpWaiter \(s.pumpWaiter != nil) "
                    + "sender(gen \(sender.connection.generation) pos \(sender.connection.position) end \(sender.connection.endSent)) "
                    + "high \(sender.sentHighWater) received \(receiver.received) inboundFinal \(receiver.inboundFinal.map(String.init) ?? "-") "
                    + "receiver(gen \(receiver.connection.generation) ackSent \(receiver.connection.ackSent) end \(receiver.connection.endSent)) "
                    + "ackTimer \(receiver.ackTimerArmed) ackDue \(receiver.ackDue) "
                    + "frame(gen \(receiver.cursor.generation) remaining \(receiver.cursor.remaining) skip \(receiver.cursor.skip)) "
                    + "progressWaiters \(s.progressWaiters.count) closed \(s.closed) lastAttempt \(s.lastAttempt)"
            }
        }

        func count(_ counter: WritableKeyPath<ResumableStatistics, UInt64>) {
            state.withLockedValue { $0.statistics[keyPath: counter] &+= 1 }
        }

        /// A number larger than any this stream used for a previous dial: at least `floor` (the
        /// owner's clock, so attempts also grow across restarts of the dialing process) and
        /// always one more than the last.
        func nextAttempt(floor: UInt64) -> UInt64 {
            state.withLockedValue { s in
                s.lastAttempt = max(s.lastAttempt &+ 1, floor)
                return s.lastAttempt
            }
        }

        /// Notes where a new session starts, for the pump (which reads it under this lock).
        func record(_ session: Session) {
            state.withLockedValue { s in
                s.sessionStart = (ObjectIdentifier(session), session.peerHello.receivedOffset, session.ourReceivedOffset)
            }
        }

        /// Receive side: every byte and the END arrived; what is left is echoing the END.
        var hasTheWholeInput: Bool { state.withLockedValue { direction == .receive && $0.receiver.isFinished } }

        /// Send side: the source ended and the peer acknowledged every byte; what is left is the
        /// END (sent, or to send) and its echo.
        var hasOnlyTheEndLeft: Bool { state.withLockedValue { direction == .send && $0.sender.isDrained } }

        /// What we report as received in our hello.
        var receivedForHello: UInt64 { state.withLockedValue { direction == .receive ? $0.receiver.acknowledgeable : 0 } }

        /// Receive side: the relay is about to write `count` bytes to the process (the
        /// checkpoint says so first)...
        /// Into a stage holding `stageLevel` bytes, if the sink has one.
        func willDeliver(_ count: Int, stageLevel: Int? = nil) {
            guard let checkpoint else { return }
            checkpoint.beginTake(at: state.withLockedValue { $0.receiver.acknowledgeable }, upTo: count, windowLevel: stageLevel)
        }

        /// ...and `count` of them went in.
        func delivered(_ count: Int) {
            let (pump, delivered) = state.withLockedValue { s -> (CheckedContinuation<Void, Never>?, UInt64) in
                s.receiver.delivered(count)
                return (s.receiver.confirmed != nil && count > 0 ? s.ringDoorbell() : nil, s.receiver.acknowledgeable)
            }
            checkpoint?.took(upTo: delivered)
            pump?.resume()
        }

        /// The END echo may go out (`ResumableConfiguration.holdEndEcho`).
        func releaseEndEcho() {
            let pump = state.withLockedValue { s -> CheckedContinuation<Void, Never>? in
                guard s.receiver.endEchoHeld else { return nil }
                s.receiver.endEchoHeld = false
                return s.ringDoorbell()
            }
            pump?.resume()
        }

        var inboundFinished: Bool { state.withLockedValue { $0.receiver.isFinished } }

        // MARK: Hello validation

        /// Checks a peer's hello against this end's state: first its proof (nothing of the
        /// stream's state is read or changed for a hello that does not verify), then the
        /// attempt and the offsets, and only when everything holds does it change anything: the
        /// attempt becomes the newest accepted, and a valid report of what the peer holds
        /// acknowledges it (it may have arrived just before the old connection died).
        /// `challenge`: our nonce on this connection, which the host's proof must cover.
        func validate(
            _ peer: StreamHello, token: [UInt8], ourRole: StreamRole, secret: StreamSecret, challenge: [UInt8]?
        ) -> StreamProtocolError? {
            guard peer.token == token else { return .wrongToken }
            guard peer.role != ourRole else { return .unauthenticated }
            guard StreamAuthentication.verify(peer, secret: secret, challenge: challenge) else { return .unauthenticated }
            var wake: [CheckedContinuation<Void, Never>] = []
            defer { for waiter in wake { waiter.resume() } }
            return state.withLockedValue { s -> StreamProtocolError? in
                // The dialer's connections race through accept: only a newer one may replace the
                // current one (and a recorded hello, replayed, is never newer).
                if ourRole == .host, peer.attempt <= s.lastAttempt { return .staleAttempt(peer.attempt, newest: s.lastAttempt) }
                do throws(StreamProtocolError) {
                    switch direction {
                    case .receive:
                        try s.receiver.acceptHello(peerReceived: peer.receivedOffset)
                    case .send:
                        let lostSoFar = s.sender.lost.bytes
                        if try s.sender.acceptHello(peerReceived: peer.receivedOffset, peerRestarted: peer.restarted) {
                            wake = s.takeProgressWaiters()
                            checkpoint?.acknowledged(s.sender.acknowledged)
                        }
                        if s.sender.lost.bytes != lostSoFar { noteLoss(s.sender.lost) }
                    }
                } catch {
                    return error
                }
                if ourRole == .host { s.lastAttempt = peer.attempt }
                return nil
            }
        }

        // MARK: Producer (send side)

        /// Writable ring space, up to `limit` bytes as regions in stream order, parking while the
        /// ring is full (back-pressure). Throws when the stream closes, counting what it held
        /// unacknowledged.
        func reserve(_ slot: ConnSlot<Session>, upTo limit: Int) async throws(StreamClosed) -> [UnsafeMutableRawBufferPointer] {
            while true {
                let outcome: Result<[UnsafeMutableRawBufferPointer], StreamClosed>? = state.withLockedValue { s in
                    if s.closed || slot.isClosed {
                        return .failure(StreamClosed(unsent: s.sender.ring.count, abandoned: slot.phase == .abandoned))
                    }
                    let regions = s.sender.reserve(upTo: limit)
                    return regions.isEmpty ? nil : .success(regions)
                }
                if let outcome { return try outcome.get() }
                await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                    let resumeNow = state.withLockedValue { s -> Bool in
                        if s.closed || s.sender.canTake || slot.isClosed { return true }
                        s.producer = continuation
                        return false
                    }
                    if resumeNow { continuation.resume() }
                }
            }
        }

        /// What the producer's next read should offer.
        var readAhead: Int { state.withLockedValue { $0.sender.readAhead } }

        /// Records bytes the producer put in the ring (a prefix of the `regions` it reserved).
        /// Nobody is woken: the producer sends them itself right after (`sendInline`), or
        /// whoever holds the sending token finds them before letting go, or — with no
        /// connection — the next connection's doorbell does.
        func commit(_ count: Int, of regions: [UnsafeMutableRawBufferPointer]) {
            let offered = regions.reduce(0) { $0 + $1.count }
            let (end, quiet) = state.withLockedValue { s -> (UInt64, CheckedContinuation<Void, Never>?) in
                s.sender.commit(count, offered: offered)
                // The drain watch of a quiet orphan's output: its clock runs again.
                let quiet = count > 0 ? s.quietWaiter : nil
                if quiet != nil { s.quietWaiter = nil }
                return (s.sender.offset, quiet)
            }
            quiet?.resume()
            checkpoint?.took(upTo: end)
        }

        /// The producer's next read may take up to `length` bytes — out of a window holding
        /// `windowLevel` bytes, if it reads one: the checkpoint says so first.
        func willTake(_ length: Int, windowLevel: Int? = nil) {
            guard let checkpoint else { return }
            checkpoint.beginTake(at: state.withLockedValue { $0.sender.offset }, upTo: length, windowLevel: windowLevel)
        }

        func finish(_ slot: ConnSlot<Session>) async -> UInt64 {
            let (pump, quiet) = state.withLockedValue { s -> (CheckedContinuation<Void, Never>?, CheckedContinuation<Void, Never>?) in
                s.sender.end()
                defer { s.quietWaiter = nil }
                return (s.ringDoorbell(), s.quietWaiter)
            }
            pump?.resume()
            quiet?.resume()
            await waitForCompletion(slot, until: .finished)
            return state.withLockedValue { $0.sender.undelivered }
        }

        func startDrainWatch(_ slot: ConnSlot<Session>) {
            let start = state.withLockedValue { s -> Bool in
                guard !s.drainWatch else { return false }
                s.drainWatch = true
                return true
            }
            guard start else { return }
            Task(executorPreference: executor) { [self] in
                await waitForCompletion(slot, until: .drained)
            }
        }

        /// Waits until `goal` is reached, giving up — and abandoning the stream — once nothing
        /// progressed for the drain timeout while something was owed. Progress is any
        /// acknowledgement or END echo. An output with nothing owed whose source has not ended
        /// (an orphan holding the process's stdout, quiet between lines) is waited on with no
        /// clock: the timeout bounds a peer that stops taking bytes, and there are none for it
        /// to take. Before, such an orphan's stream was abandoned a drain timeout after the exit
        /// with the host connected: its next line was dropped and its next write died of SIGPIPE.
        private func waitForCompletion(_ slot: ConnSlot<Session>, until goal: State.Goal) async {
            while true {
                let (finished, mark, quiet) = state.withLockedValue { s in
                    (s.reached(goal, direction: direction) || s.closed, s.sender.acknowledged, s.isQuiet(goal, direction: direction, slot: slot))
                }
                if finished { return }
                if quiet {
                    await waitWhileQuiet(goal, slot: slot)
                    continue
                }
                let progressed = await waitForProgress(since: mark, timeout: configuration.drainTimeout)
                // Quiet again by now (connected, nothing owed: a connection back after a drop,
                // or the last bytes acknowledged as the timer fired): nothing to give up on.
                if !progressed, !state.withLockedValue({ $0.isQuiet(goal, direction: direction, slot: slot) }) {
                    abandon(slot)
                    return
                }
            }
        }

        /// Suspends while the stream owes nothing and its source goes on (`owesNothingYet`):
        /// until the producer commits bytes, ends, or the stream closes.
        private func waitWhileQuiet(_ goal: State.Goal, slot: ConnSlot<Session>) async {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let resumeNow = state.withLockedValue { s -> Bool in
                    guard s.isQuiet(goal, direction: direction, slot: slot), !s.closed else { return true }
                    s.quietWaiter = continuation
                    return false
                }
                if resumeNow { continuation.resume() }
            }
        }

        /// Suspends until the acknowledged offset moves past `mark` (true) or `timeout` passes
        /// (false).
        private func waitForProgress(since mark: UInt64, timeout: Duration) async -> Bool {
            let id = state.withLockedValue { s -> UInt64 in
                s.nextWaiter &+= 1
                return s.nextWaiter
            }
            // Called once per acknowledgement while a stream drains: a sleeping task per call
            // would leave its timer queued for the whole timeout (TimeoutWheel says why).
            let timer = TimeoutWheel.shared.schedule(after: timeout) { [state] in
                state.withLockedValue { $0.progressWaiters.removeValue(forKey: id) }?.resume()
            }
            defer { TimeoutWheel.shared.cancel(timer) }
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let resumeNow = state.withLockedValue { s -> Bool in
                    if s.progressed(since: mark) { return true }
                    s.progressWaiters[id] = continuation
                    return false
                }
                if resumeNow { continuation.resume() }
            }
            return state.withLockedValue { $0.progressed(since: mark) }
        }

        private func abandon(_ slot: ConnSlot<Session>) {
            slot.abandon()
            closeDown()
        }

        // MARK: Slot events

        func slotChanged(_ event: SlotEvent) {
            switch event {
            case .disconnected:
                // A quiet drain watch runs its clock again: a host that dropped the stream (its
                // own drain bound, a restart) is given up on after the drain timeout, as before.
                state.withLockedValue { s -> CheckedContinuation<Void, Never>? in
                    defer { s.quietWaiter = nil }
                    return s.quietWaiter
                }?.resume()
            case .connected:
                state.withLockedValue { $0.ringDoorbell() }?.resume()
            case .closed, .abandoned:
                closeDown()
            default:
                break
            }
        }

        private func closeDown() {
            let (pump, producer, progress, echo) = state.withLockedValue { s in
                s.closed = true
                let pump = s.ringDoorbell()
                let producer = s.producer
                s.producer = nil
                let progress = Array(s.progressWaiters.values)
                s.progressWaiters.removeAll()
                var echo = s.echoWaiters
                s.echoWaiters.removeAll()
                if let quiet = s.quietWaiter { echo.append(quiet) }
                s.quietWaiter = nil
                return (pump, producer, progress, echo)
            }
            pump?.resume()
            producer?.resume()
            for waiter in progress { waiter.resume() }
            for waiter in echo { waiter.resume() }
        }

        /// A connection's read failed: a protocol violation is counted as one; a plain
        /// end-of-file or error is just the connection going away.
        func dropConnection(_ generation: UInt64, slot: ConnSlot<Session>, after error: any Error) {
            let reason: DisconnectReason
            switch error as? StreamProtocolError {
            case .truncated: reason = .endOfFile
            case .some:
                count(\.protocolErrors)
                reason = .protocolError
            case .none: reason = .readFailed
            }
            slot.disconnect(ifCurrent: generation, reason: reason)
        }
    }
}

/// A resumable stream engine's state (outside the generic engine, so the lock around it needs
/// no type metadata looked up at run time): the protocol's two halves, and what the driver needs
/// besides. A stream uses the half of its direction; the other stays as it was made.
struct ResumableEngineState: Sendable {
    var sender: ResumableSender
    var receiver: ResumableReceiver
    /// The newest session: the peer's received offset and ours, for the pump (only the
    /// newest matters: an older session is replaced before the pump could use it).
    var sessionStart: (id: ObjectIdentifier, peer: UInt64, ours: UInt64)?
    /// Who may write frames now (the pump, or the producer sending inline).
    var sending = false
    /// Dialer: the last attempt number used. Acceptor: the newest attempt accepted.
    var lastAttempt: UInt64 = 0
    /// The producer, parked while the ring is full.
    var producer: CheckedContinuation<Void, Never>?
    /// There may be something to write: whoever holds the sending token looks again.
    var doorbell = false
    var pumpWaiter: CheckedContinuation<Void, Never>?
    var progressWaiters: [UInt64: CheckedContinuation<Void, Never>] = [:]
    /// The drain watch, while the stream owes nothing and its source goes on.
    var quietWaiter: CheckedContinuation<Void, Never>?
    var nextWaiter: UInt64 = 0
    var echoWaiters: [CheckedContinuation<Void, Never>] = []
    var closed = false
    var drainWatch = false
    /// Receive side: the connection whose first frame was told to the slot (`noteTraffic`).
    var trafficNotedOn: UInt64 = 0
    /// The counters the engine keeps itself (refused connections, protocol errors); the rest of
    /// `ResumableStatistics` is read from the machines.
    var statistics = ResumableStatistics()

    /// What a wait for the stream's completion waits for.
    enum Goal {
        /// `finish`: the end echoed and everything acknowledged.
        case finished
        /// The process exited: the send side acknowledged to its end, the receive side ended.
        case drained
    }

    func reached(_ goal: Goal, direction: StreamDirection) -> Bool {
        switch goal {
        case .finished: return sender.isComplete
        case .drained: return direction == .send ? sender.isDrained : receiver.inboundFinal != nil
        }
    }

    /// Whether a drain toward `goal` has nothing to wait for from the peer yet: an output with
    /// every byte acknowledged whose producer has not ended (its process exited, and a process
    /// it left holds the pipe).
    func owesNothingYet(_ goal: Goal, direction: StreamDirection) -> Bool {
        goal == .drained && direction == .send && sender.ring.count == 0 && sender.finalOffset == nil
    }

    /// `owesNothingYet` with its host connected: the drain watch waits with no clock. Not
    /// while disconnected: a host that dropped the stream (host serve's own drain bound, a host
    /// agent gone) must not keep it, its slots and its fds, for as long as the orphan lives.
    func isQuiet<Connection: ByteConnection>(_ goal: Goal, direction: StreamDirection, slot: ConnSlot<Connection>) -> Bool {
        owesNothingYet(goal, direction: direction) && slot.phase == .connected
    }

    /// Whether anything moved since the acknowledged offset was `mark` (or nothing will any more).
    func progressed(since mark: UInt64) -> Bool {
        sender.acknowledged != mark || sender.endEchoReceived || closed
    }

    /// Marks work for the pump and returns its continuation (resume it outside the lock).
    mutating func ringDoorbell() -> CheckedContinuation<Void, Never>? {
        doorbell = true
        defer { pumpWaiter = nil }
        return pumpWaiter
    }

    /// Takes every continuation waiting for acknowledgement progress (the producer included).
    mutating func takeProgressWaiters() -> [CheckedContinuation<Void, Never>] {
        var waiters = Array(progressWaiters.values)
        progressWaiters.removeAll()
        if let producer {
            self.producer = nil
            waiters.append(producer)
        }
        return waiters
    }
}
