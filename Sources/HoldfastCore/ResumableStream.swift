import HoldfastProtocol
import NIOConcurrencyHelpers

/// Which way a resumable stream's data flows, seen from this end.
public enum StreamDirection: String, Sendable, Codable {
    /// This end produces the data and reads acknowledgements (guest stdout/stderr/tty output,
    /// host stdin).
    case send
    /// This end consumes the data and sends acknowledgements (guest stdin/tty input, host
    /// stdout/stderr).
    case receive
}

public struct ResumableConfiguration: Sendable, Equatable {
    /// Most unacknowledged bytes a sender keeps for replay; a full ring stops reading the source.
    public var ringCapacity: Int
    /// A receiver acknowledges after this many bytes...
    public var ackEvery: Int
    /// ...or this long after the first unacknowledged byte, whichever comes first.
    public var ackDelay: Duration
    /// The largest data frame a sender writes (the protocol's limit by default: fewer headers for
    /// the receiver to read; a frame's body may span several ring blocks).
    public var maxFrame: Int
    /// After `processExited`/`finish`: how long the stream may make no progress (no
    /// acknowledgement, no connection) before it gives up and reports what it could not deliver.
    public var drainTimeout: Duration

    public init(
        ringCapacity: Int = 1 << 20, ackEvery: Int = 256 * 1024, ackDelay: Duration = .milliseconds(10),
        maxFrame: Int = StreamFramePrefix.maxDataBody, drainTimeout: Duration = .seconds(30)
    ) {
        precondition(maxFrame > 0 && maxFrame <= StreamFramePrefix.maxDataBody)
        self.ringCapacity = ringCapacity
        self.ackEvery = ackEvery
        self.ackDelay = ackDelay
        self.maxFrame = maxFrame
        self.drainTimeout = drainTimeout
    }
}

/// One resumable stream end: exactly once across any number of reconnects.
///
/// After every connect each side says hello with the stream's token and how much of the other's
/// data it holds; the sender replays from there out of its `ReplayRing`. Cumulative ACK frames
/// trim the ring; END ends the stream explicitly and is echoed back by the receiver, so a clean
/// end is never confused with a lost connection. The connection itself lives in a `ConnSlot`, so
/// everything the slot guarantees (parking, redial cycles, bridge-up) holds here too.
///
/// The guest end dials (`dial` is given); the host end accepts (`accept(_:hello:)`).
public final class ResumableStream<Transport: ByteConnection>: OutboundStream, InboundStream, ManagedSlot {
    public typealias Session = ResumableSession<Transport>

    public let token: [UInt8]
    public let role: StreamRole
    public let direction: StreamDirection
    public let configuration: ResumableConfiguration
    public let slot: ConnSlot<Session>
    /// Proves our hellos and checks the peer's: only its holders speak for the stream.
    public let secret: StreamSecret
    private let engine: Engine

    /// - Parameters:
    ///   - dial: opens a transport to the peer (guest side). The stream adds the handshake; the
    ///     slot's connect timeout bounds both together.
    ///   - attemptClock: a monotonic clock (nanoseconds) that numbers dials, so a restarted
    ///     dialer's attempts still outrank its predecessor's at the acceptor.
    ///   - observer: slot events, for metrics and logs.
    ///   - storage: where the replay ring's blocks come from.
    ///   - executor: where the stream's own tasks run (its pump, its acknowledgement reader):
    ///     the I/O reactor's thread for real sockets, so a frame read or written on readiness
    ///     costs no hop to another thread. `nil`: the global executor.
    public init(
        token: [UInt8], secret: StreamSecret, role: StreamRole, direction: StreamDirection,
        configuration: ResumableConfiguration = ResumableConfiguration(),
        policy: RedialPolicy = .default, storage: any RingBlockStorage = BufferPool.ring,
        executor: (any TaskExecutor)? = nil,
        dial: (@Sendable () async throws -> Transport)? = nil,
        attemptClock: (@Sendable () -> UInt64)? = nil,
        observer: (@Sendable (SlotEvent) -> Void)? = nil
    ) {
        self.token = token
        self.secret = secret
        self.role = role
        self.direction = direction
        self.configuration = configuration
        let engine = Engine(direction: direction, configuration: configuration, storage: storage, executor: executor)
        self.engine = engine
        var slotDial: ConnSlot<Session>.Dial?
        if let dial {
            slotDial = { [token, role] in
                let transport = try await dial()
                do {
                    let hello = StreamAuthentication.sign(
                        StreamHello(
                            role: role, token: token, receivedOffset: engine.receivedForHello,
                            attempt: engine.nextAttempt(floor: attemptClock?() ?? 0), nonce: StreamAuthentication.nonce()),
                        secret: secret)
                    let session = try await Handshake.initiate(on: transport, hello: hello) { peer in
                        // The host's proof covers our nonce: a recorded answer does not verify.
                        engine.validate(peer, token: token, ourRole: role, secret: secret, challenge: hello.nonce)
                    }
                    engine.record(session)
                    return session
                } catch {
                    transport.close()
                    if let problem = error as? StreamProtocolError, problem != .truncated {
                        engine.count(\.refusedConnections)
                    }
                    throw error
                }
            }
        }
        self.slot = ConnSlot(
            name: String(decoding: token, as: UTF8.self), policy: policy, dial: slotDial,
            observer: { event in
                engine.slotChanged(event)
                observer?(event)
            })
        Task(executorPreference: executor) { [slot, engine] in await engine.pump(slot) }
        if direction == .send {
            Task(executorPreference: executor) { [slot, engine] in await engine.readAcknowledgements(slot) }
        }
    }

    deinit {
        slot.close()
    }

    // MARK: Host side

    /// Accepts a connection whose hello was read by a listener: validates it, answers with our
    /// hello and installs it. A hello that does not fit (wrong token, an offset from the future
    /// or one already discarded) is refused with an ERROR frame; the stream is untouched.
    public func accept(_ transport: Transport, hello: StreamHello) async throws(StreamProtocolError) {
        if let problem = engine.validate(hello, token: token, ourRole: role, secret: secret, challenge: nil) {
            engine.count(\.refusedConnections)
            await Handshake.refuse(transport, problem)
            throw problem
        }
        let ours = StreamAuthentication.sign(
            StreamHello(role: role, token: token, receivedOffset: engine.receivedForHello, nonce: StreamAuthentication.nonce()),
            secret: secret, challenge: hello.nonce)
        do {
            try await FrameIO.write(ours.encoded, to: transport)
        } catch {
            transport.close()
            throw .truncated
        }
        let session = Session(transport: transport, peerHello: hello, ourReceivedOffset: ours.receivedOffset)
        engine.record(session)
        slot.set(session)
    }

    // MARK: Sending

    public func send(_ bytes: UnsafeRawBufferPointer) async throws(StreamClosed) {
        var offset = 0
        while offset < bytes.count {
            let regions = try await engine.reserve(slot, upTo: bytes.count - offset)
            for space in regions {
                space.copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes[offset..<offset + space.count]))
                offset += space.count
            }
            engine.commit(regions.reduce(0) { $0 + $1.count }, of: regions)
            await engine.sendInline(slot)
        }
    }

    /// Reads a pipe straight into the replay ring — one readv across as many free blocks as the
    /// pipe is likely to fill — then sends from there: the only copies are the kernel's, and a
    /// byte leaves the pipe only into the ring.
    public func pull(from source: some ByteReader, pool: BufferPool) async throws(StreamClosed) -> PullResult {
        let regions = try await engine.reserve(slot, upTo: engine.readAhead)
        let count: Int?
        do {
            count = try source.readNow(into: regions)
        } catch {
            count = 0  // a pty's EIO after its last slave closed is its end-of-file
        }
        engine.commit(count ?? 0, of: regions)
        if let count, count > 0 { await engine.sendInline(slot) }
        guard let count else { return .nothing }
        return count == 0 ? .endOfFile : .moved(count)
    }

    /// Sends END after the last byte and waits until the peer acknowledged everything and echoed
    /// the END — or until the stream made no progress for the drain timeout. Returns the bytes
    /// the peer never acknowledged (0 when everything arrived). Closes the stream.
    public func finish() async -> UInt64 {
        let undelivered = await engine.finish(slot)
        slot.close()
        return undelivered
    }

    /// The stream's process exited: from now on, no progress for the drain timeout abandons the
    /// stream (so a parked relay is released and reports what it could not deliver).
    public func processExited() {
        engine.startDrainWatch(slot)
    }

    // MARK: Receiving

    public func waitReceivable() async {
        while !engine.inboundFinished, let lease = await slot.current() {
            do {
                if engine.hasBufferedFrame(for: lease.generation) { return }
                try await lease.connection.waitReadable()
                return
            } catch {
                slot.disconnect(ifCurrent: lease.generation, reason: .readFailed)
            }
        }
    }

    public func receive(into buffer: UnsafeMutableRawBufferPointer) async -> Int {
        await engine.receive(into: buffer, slot: slot)
    }

    /// After `receive` returned 0: waits (bounded) until our END echo went out, so the sender
    /// learns the end arrived. Returns false on timeout or if the stream closed first.
    public func waitEndEchoed(timeout: Duration) async -> Bool {
        await engine.waitEndEchoed(timeout: timeout)
    }

    /// After `receive` returned 0: keeps the stream until the sender evidently holds our END
    /// echo, then closes it. An echo that went out is not yet an echo that arrived: a connection
    /// dropped with it unread (a migration at that moment) would leave the sender waiting for a
    /// reconnect that never comes, and reporting as lost bytes that arrived. So a connection
    /// that ends otherwise than cleanly is redialled, and the echo goes out again on the next
    /// one; the sender closing a connection that carried the echo, at a frame boundary, is the
    /// sign it has it (a sender closes once it is complete). Gives up after `timeout`. Returns
    /// whether the sender has the echo.
    public func closeAfterEndDelivered(timeout: Duration) async -> Bool {
        let timer = TimeoutWheel.shared.schedule(after: timeout) { [slot] in
            slot.close()  // ends the wait below
        }
        let delivered = await engine.waitEndDelivered(slot)
        TimeoutWheel.shared.cancel(timer)
        slot.close()
        return delivered
    }

    // MARK: Lifetime and inspection

    public func close() {
        slot.close()
    }

    public var isClosed: Bool { slot.isClosed }
    public func disconnect() { slot.disconnect() }
    public func redialNow() { slot.redialNow() }

    public var statistics: ResumableStatistics { engine.statistics }

    /// The slot's and the engine's internal state in two lines, for diagnosing a stuck stream.
    public var debugSummary: String { "\(slot.debugSummary)\n  engine: \(engine.debugSummary)" }

    var engineForTests: Engine { engine }
}

extension BufferPool {
    /// Replay-ring blocks: 64 KiB each.
    public static let ring = BufferPool(bufferSize: 64 * 1024, retained: 64)
}

public struct ResumableStatistics: Sendable, Equatable {
    /// Bytes this end accepted from its producer (send) or delivered to its consumer (receive).
    public var offset: UInt64 = 0
    /// Bytes the peer acknowledged (send side).
    public var acknowledged: UInt64 = 0
    /// Unacknowledged bytes held in the replay ring.
    public var ringBytes: Int = 0
    public var ringBlocks: Int = 0
    /// Bytes sent again after a reconnect.
    public var replayedBytes: UInt64 = 0
    /// Connections refused: bad hello, wrong token, impossible offsets.
    public var refusedConnections: UInt64 = 0
    /// Connections dropped for a protocol violation after the hello.
    public var protocolErrors: UInt64 = 0
    public var ended = false
}

// MARK: - The engine: state and the loops that move frames

extension ResumableStream {
    final class Engine: Sendable {
        let direction: StreamDirection
        let configuration: ResumableConfiguration
        let executor: (any TaskExecutor)?
        private let state: NIOLockedValueBox<State>
        /// Frame headers of one batched write (used by whoever holds the sending token).
        private let headers = ScratchBytes(count: StreamFramePrefix.size * Engine.maxFramesPerWrite)
        /// The next frame's header as it arrives (used by the one receiving task).
        private let inboundHeader = ScratchBytes(count: StreamFramePrefix.size)

        typealias State = ResumableEngineState

        /// Most bytes one producer read and one sender write take (one readv, one sendmsg).
        static var maximumBatch: Int { 1 << 20 }
        static var minimumReadAhead: Int { 64 * 1024 }
        /// Frames one sendmsg may carry (each a header and its body's regions).
        static var maxFramesPerWrite: Int { 16 }

        init(direction: StreamDirection, configuration: ResumableConfiguration, storage: any RingBlockStorage, executor: (any TaskExecutor)?) {
            self.direction = direction
            self.configuration = configuration
            self.executor = executor
            self.state = NIOLockedValueBox(State(ring: ReplayRing(capacity: configuration.ringCapacity, storage: storage)))
        }

        var statistics: ResumableStatistics {
            state.withLockedValue { s in
                var stats = s.statistics
                stats.offset = direction == .send ? s.ring.end : s.received
                stats.acknowledged = s.ring.acknowledged
                stats.ringBytes = s.ring.count
                stats.ringBlocks = s.ring.blockCount
                stats.ended = direction == .send ? s.endEchoReceived : s.inboundFinal != nil
                return stats
            }
        }

        var debugSummary: String {
            state.withLockedValue { s in
                "\(direction) ring [\(s.ring.acknowledged), \(s.ring.end)) final \(s.finalOffset.map(String.init) ?? "-") echo \(s.endEchoReceived) "
                    + "producer \(s.producer != nil) sending \(s.sending) doorbell \(s.doorbell) pumpWaiter \(s.pumpWaiter != nil) "
                    + "sender(gen \(s.sender.generation) pos \(s.sender.position) ackSent \(s.sender.ackSent) end \(s.sender.endSent)) "
                    + "sendGen \(s.sendGeneration) high \(s.sentHighWater) received \(s.received) inboundFinal \(s.inboundFinal.map(String.init) ?? "-") "
                    + "ackTimer \(s.ackTimerArmed) ackDue \(s.ackDue) frame(gen \(s.frameGeneration) remaining \(s.frameRemaining) skip \(s.frameSkip)) "
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

        /// What we report as received in our hello.
        var receivedForHello: UInt64 { state.withLockedValue { direction == .receive ? $0.received : 0 } }

        var inboundFinished: Bool { state.withLockedValue { $0.inboundFinal != nil && $0.inboundFinal == $0.received } }

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
                switch direction {
                case .receive:
                    // We never send data: the peer cannot hold any.
                    guard peer.receivedOffset == 0 else {
                        return .offsetFromTheFuture(reported: peer.receivedOffset, limit: 0)
                    }
                case .send:
                    // Against what was ever handed to a connection, not what the ring holds.
                    guard peer.receivedOffset <= s.everHandedOut else {
                        return .offsetFromTheFuture(reported: peer.receivedOffset, limit: s.everHandedOut)
                    }
                    guard peer.receivedOffset >= s.ring.acknowledged else {
                        return .offsetAlreadyDiscarded(reported: peer.receivedOffset, oldest: s.ring.acknowledged)
                    }
                }
                if ourRole == .host { s.lastAttempt = peer.attempt }
                if direction == .send, peer.receivedOffset > s.ring.acknowledged {
                    s.ring.acknowledge(upTo: peer.receivedOffset)
                    wake = s.takeProgressWaiters()
                }
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
                        return .failure(StreamClosed(unsent: s.ring.count, abandoned: slot.phase == .abandoned))
                    }
                    let regions = s.ring.reserve(upTo: limit)
                    return regions.isEmpty ? nil : .success(regions)
                }
                if let outcome { return try outcome.get() }
                await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                    let resumeNow = state.withLockedValue { s -> Bool in
                        if s.closed || !s.ring.isFull || slot.isClosed { return true }
                        s.producer = continuation
                        return false
                    }
                    if resumeNow { continuation.resume() }
                }
            }
        }

        /// What the producer's next read should offer.
        var readAhead: Int { state.withLockedValue { $0.readAhead } }

        /// Records bytes the producer put in the ring (a prefix of the `regions` it reserved).
        /// Nobody is woken: the producer sends them itself right after (`sendInline`), or
        /// whoever holds the sending token finds them before letting go, or — with no
        /// connection — the next connection's doorbell does.
        func commit(_ count: Int, of regions: [UnsafeMutableRawBufferPointer]) {
            let offered = regions.reduce(0) { $0 + $1.count }
            state.withLockedValue { s in
                s.ring.commit(count)
                if count >= offered {
                    s.readAhead = min(Self.maximumBatch, max(s.readAhead, offered) * 2)
                } else if count > 0 {
                    s.readAhead = max(Self.minimumReadAhead, count + count / 2)
                }
            }
        }

        func finish(_ slot: ConnSlot<Session>) async -> UInt64 {
            let pump = state.withLockedValue { s -> CheckedContinuation<Void, Never>? in
                if s.finalOffset == nil { s.finalOffset = s.ring.end }
                return s.ringDoorbell()
            }
            pump?.resume()
            await waitForCompletion(slot) { $0.endEchoReceived && $0.ring.acknowledged == $0.finalOffset }
            return state.withLockedValue { s in (s.finalOffset ?? s.ring.end) - s.ring.acknowledged }
        }

        func startDrainWatch(_ slot: ConnSlot<Session>) {
            let start = state.withLockedValue { s -> Bool in
                guard !s.drainWatch else { return false }
                s.drainWatch = true
                return true
            }
            guard start else { return }
            Task(executorPreference: executor) { [self] in
                await waitForCompletion(slot) { s in
                    s.direction == .send ? (s.ring.count == 0 && s.finalOffset != nil) : s.inboundFinal != nil
                }
            }
        }

        /// Waits until `done` holds, giving up — and abandoning the stream — once nothing
        /// progressed for the drain timeout. Progress is any acknowledgement or END echo.
        private func waitForCompletion(_ slot: ConnSlot<Session>, _ done: @escaping @Sendable (StateView) -> Bool) async {
            while true {
                let (finished, mark) = state.withLockedValue { s in
                    (done(StateView(s, direction: direction)) || s.closed, s.ring.acknowledged)
                }
                if finished { return }
                let progressed = await waitForProgress(since: mark, timeout: configuration.drainTimeout)
                if !progressed {
                    abandon(slot)
                    return
                }
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
                    if s.ring.acknowledged != mark || s.closed || s.endEchoReceived { return true }
                    s.progressWaiters[id] = continuation
                    return false
                }
                if resumeNow { continuation.resume() }
            }
            return state.withLockedValue { $0.ring.acknowledged != mark || $0.endEchoReceived || $0.closed }
        }

        private func abandon(_ slot: ConnSlot<Session>) {
            slot.abandon()
            closeDown()
        }

        // MARK: Slot events

        func slotChanged(_ event: SlotEvent) {
            switch event {
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
                let echo = s.echoWaiters
                s.echoWaiters.removeAll()
                return (pump, producer, progress, echo)
            }
            pump?.resume()
            producer?.resume()
            for waiter in progress { waiter.resume() }
            for waiter in echo { waiter.resume() }
        }

        // MARK: The pump: everything this end writes

        private typealias Work = ResumableWork

        /// One task per stream writes every frame: data from the ring (replaying from the peer's
        /// received offset after each reconnect), acknowledgements, END and its echo. Parks on a
        /// doorbell when there is nothing to write: no timers tick on an idle stream.
        func pump(_ slot: ConnSlot<Session>) async {
            while let lease = await slot.current() {
                guard takeSendingToken() else {
                    // The producer, sending inline, holds the token; it wakes the pump when it
                    // lets go.
                    await waitForWork()
                    continue
                }
                let didWork = await sendDue(on: lease, slot: slot)
                if !didWork { await waitForWork() }
            }
        }

        /// The producer's fast path after it put bytes in the ring: if nobody is sending, send
        /// them from this task at once — no wake-up of the pump, no thread hop per chunk.
        func sendInline(_ slot: ConnSlot<Session>) async {
            guard direction == .send, let lease = slot.connectedLease(), takeSendingToken() else { return }
            _ = await sendDue(on: lease, slot: slot)
        }

        /// Takes the right to write frames on the current connection. When it is held elsewhere
        /// the doorbell is rung, so the holder looks for work once more before it lets go.
        private func takeSendingToken() -> Bool {
            state.withLockedValue { s in
                if s.sending {
                    s.doorbell = true
                    return false
                }
                s.sending = true
                return true
            }
        }

        /// Gives the token back; wakes the pump if it was waiting for it.
        private func releaseSendingToken(_ s: inout State) -> CheckedContinuation<Void, Never>? {
            s.sending = false
            defer { s.pumpWaiter = nil }
            return s.pumpWaiter
        }

        /// Writes every frame that is due on `lease` (data from the ring, replaying from the
        /// peer's received offset after a reconnect; acknowledgements; END and its echo), then
        /// gives the sending token back. Returns whether anything was due. Caller holds the token.
        private func sendDue(on lease: ConnSlot<Session>.Lease, slot: ConnSlot<Session>) async -> Bool {
            let prefix = headers.slice(0, StreamFramePrefix.size)
            var didWork = false
            while true {
                var wake: CheckedContinuation<Void, Never>?
                let work: Work = state.withLockedValue { s in
                    if s.sender.generation != lease.generation {
                        let start = s.sessionStart?.id == ObjectIdentifier(lease.connection) ? s.sessionStart : nil
                        // Without a record (a session replaced at once) the safe choice is to
                        // replay from the oldest unacknowledged byte: the peer drops duplicates.
                        s.sender = SenderState(
                            generation: lease.generation, position: max(start?.peer ?? 0, s.ring.acknowledged),
                            ackSent: start?.ours ?? 0, endSent: false)
                        s.sendGeneration = lease.generation
                        s.sentHighWater = s.sender.position
                    }
                    s.doorbell = false
                    // A newer connection's hello may have acknowledged past where this one is:
                    // those bytes arrived, and the ring no longer holds them.
                    if direction == .send, s.sender.position < s.ring.acknowledged { s.sender.position = s.ring.acknowledged }
                    let position = s.sender.position
                    switch direction {
                    case .send:
                        if position < s.ring.end {
                            let limit = min(Self.maximumBatch, configuration.maxFrame * Self.maxFramesPerWrite)
                            let regions = s.ring.regions(from: position, limit: limit)
                            let count = regions.reduce(0) { $0 + $1.count }
                            s.ring.pin(position)
                            s.sentHighWater = max(s.sentHighWater, position + UInt64(count))
                            s.everHandedOut = max(s.everHandedOut, position + UInt64(count))
                            return .data(regions, offset: position, count: count)
                        }
                        if let final = s.finalOffset, position == final, !s.sender.endSent { return .end(final) }
                    case .receive:
                        let ackSent = s.sender.ackSent
                        if s.received > ackSent, s.ackDue || s.received - ackSent >= UInt64(configuration.ackEvery) || s.inboundFinal != nil {
                            s.ackDue = false
                            return .ack(s.received)
                        }
                        if let final = s.inboundFinal, final == s.received, !s.sender.endSent { return .end(final) }
                    }
                    // Nothing due: give the token back.
                    wake = releaseSendingToken(&s)
                    return .idle
                }
                let failed: Bool
                switch work {
                case .idle:
                    wake?.resume()
                    return didWork
                case .data(let regions, let offset, let count):
                    let (vectors, frames) = frameVectors(regions, offset: offset)
                    let sent: Int
                    do {
                        try await lease.connection.write(vectors: vectors)
                        sent = count
                        failed = false
                    } catch {
                        sent = Self.bodyBytes(accepted: error.accepted, frames: frames)
                        failed = true
                    }
                    state.withLockedValue { s in
                        s.ring.unpin()
                        if !failed, s.sender.generation == lease.generation { s.sender.position = offset + UInt64(sent) }
                        // Bytes below the highest offset ever handed to a connection are replays.
                        let sentEnd = offset + UInt64(sent)
                        if offset < s.everSent { s.statistics.replayedBytes &+= min(sentEnd, s.everSent) - offset }
                        s.everSent = max(s.everSent, sentEnd)
                    }
                case .ack(let offset):
                    failed = !(await writeControl(.ack, value: offset, on: lease.connection, prefix: prefix))
                    if !failed { state.withLockedValue { if $0.sender.generation == lease.generation { $0.sender.ackSent = offset } } }
                case .end(let final):
                    failed = !(await writeControl(.end, value: final, on: lease.connection, prefix: prefix))
                    if !failed {
                        state.withLockedValue { if $0.sender.generation == lease.generation { $0.sender.endSent = true } }
                        if direction == .receive { echoSent() }
                    }
                }
                didWork = true
                if failed {
                    state.withLockedValue { releaseSendingToken(&$0) }?.resume()
                    slot.disconnect(ifCurrent: lease.generation, reason: .writeFailed)
                    return didWork
                }
            }
        }

        /// The iovecs of one batched write: the regions cut into frames of at most `maxFrame`
        /// bytes, each after its header (in `headers`). Returns them and the frames' body sizes.
        private func frameVectors(_ regions: [UnsafeRawBufferPointer], offset: UInt64) -> ([UnsafeRawBufferPointer], [Int]) {
            var vectors: [UnsafeRawBufferPointer] = []
            vectors.reserveCapacity(regions.count + Self.maxFramesPerWrite + 1)
            var frames: [Int] = []
            var inFrame = 0
            var headerIndex = -1
            func openFrame() {
                headerIndex += 1
                vectors.append(UnsafeRawBufferPointer(headers.slice(headerIndex * StreamFramePrefix.size, StreamFramePrefix.size)))
                frames.append(0)
                inFrame = 0
            }
            openFrame()
            for region in regions {
                var rest = region
                while !rest.isEmpty {
                    if inFrame == configuration.maxFrame { openFrame() }
                    let take = min(rest.count, configuration.maxFrame - inFrame)
                    vectors.append(UnsafeRawBufferPointer(rebasing: rest[rest.startIndex..<rest.startIndex + take]))
                    rest = UnsafeRawBufferPointer(rebasing: rest[(rest.startIndex + take)...])
                    inFrame += take
                    frames[headerIndex] = inFrame
                }
            }
            var start = offset
            for (index, length) in frames.enumerated() {
                StreamFramePrefix(type: .data, bodyLength: length, value: start)
                    .encode(into: headers.slice(index * StreamFramePrefix.size, StreamFramePrefix.size))
                start += UInt64(length)
            }
            return (vectors, frames)
        }

        /// Of a batched write that failed after `accepted` bytes: the data bytes among them.
        private static func bodyBytes(accepted: Int, frames: [Int]) -> Int {
            var left = accepted
            var body = 0
            for length in frames {
                guard left > StreamFramePrefix.size else { break }
                left -= StreamFramePrefix.size
                let taken = min(left, length)
                body += taken
                left -= taken
            }
            return body
        }

        private func writeControl(_ type: StreamFrameType, value: UInt64, on connection: Session, prefix: UnsafeMutableRawBufferPointer) async -> Bool {
            StreamFramePrefix(type: type, bodyLength: 0, value: value).encode(into: prefix)
            do {
                try await connection.write(UnsafeRawBufferPointer(prefix))
                return true
            } catch {
                return false
            }
        }

        private func waitForWork() async {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let resumeNow = state.withLockedValue { s -> Bool in
                    if (s.doorbell && !s.sending) || s.closed { return true }
                    s.pumpWaiter = continuation
                    return false
                }
                if resumeNow { continuation.resume() }
            }
        }

        private func echoSent() {
            let waiters = state.withLockedValue { s -> [CheckedContinuation<Void, Never>] in
                s.endEchoSent = true
                defer { s.echoWaiters.removeAll() }
                return s.echoWaiters
            }
            for waiter in waiters { waiter.resume() }
        }

        func waitEndEchoed(timeout: Duration) async -> Bool {
            let timer = TimeoutWheel.shared.schedule(after: timeout) { [state] in
                let waiters = state.withLockedValue { s -> [CheckedContinuation<Void, Never>] in
                    defer { s.echoWaiters.removeAll() }
                    return s.echoWaiters
                }
                for waiter in waiters { waiter.resume() }
            }
            defer { TimeoutWheel.shared.cancel(timer) }
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let resumeNow = state.withLockedValue { s -> Bool in
                    if s.endEchoSent || s.closed { return true }
                    s.echoWaiters.append(continuation)
                    return false
                }
                if resumeNow { continuation.resume() }
            }
            return state.withLockedValue { $0.endEchoSent }
        }

        /// Receive side, after END: true once a connection on which our END echo went out
        /// ended cleanly, at a frame boundary; false if the stream is closed first. Any other
        /// end of a connection is a drop like any other: the slot redials and the pump echoes
        /// END again on the next connection (it does once per connection).
        func waitEndDelivered(_ slot: ConnSlot<Session>) async -> Bool {
            let final = state.withLockedValue { $0.inboundFinal }
            while let lease = await slot.current() {
                do {
                    while let prefix = try await Self.readFrameUnlessEnded(lease.connection) {
                        switch prefix.type {
                        case .end where prefix.value == final, .ack where prefix.value == 0:
                            continue  // a sender repeats END on every new connection
                        default:
                            throw StreamProtocolError.unexpectedFrame(expected: .end, got: prefix.type)
                        }
                    }
                    if await echoSent(on: lease.generation) { return true }
                    slot.disconnect(ifCurrent: lease.generation, reason: .endOfFile)
                } catch {
                    dropConnection(lease.generation, slot: slot, after: error)
                }
            }
            return false
        }

        /// Whether the pump wrote END on connection `generation`. Its write may have returned a
        /// moment before it recorded so, hence the short wait.
        private func echoSent(on generation: UInt64) async -> Bool {
            for _ in 0..<50 {
                if state.withLockedValue({ $0.sender.generation == generation && $0.sender.endSent }) { return true }
                try? await Task.sleep(for: .milliseconds(5))
            }
            return false
        }

        /// One frame's prefix (a body is read and dropped); nil at an end-of-file between frames.
        private static func readFrameUnlessEnded(_ connection: Session) async throws -> StreamFramePrefix? {
            let raw = UnsafeMutableRawBufferPointer.allocate(byteCount: StreamFramePrefix.size, alignment: 8)
            defer { raw.deallocate() }
            let first = try await connection.read(into: raw)
            if first == 0 { return nil }
            if first < raw.count { try await FrameIO.readExactly(connection, into: UnsafeMutableRawBufferPointer(rebasing: raw[first...])) }
            let prefix = try StreamFramePrefix.decode(UnsafeRawBufferPointer(raw))
            if prefix.type == .error {
                let body = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, prefix.bodyLength), alignment: 1)
                defer { body.deallocate() }
                try await FrameIO.readExactly(connection, into: UnsafeMutableRawBufferPointer(rebasing: body[..<prefix.bodyLength]))
                throw StreamProtocolError.refusedByPeer(StreamRefusal.decode(prefix: prefix, body: Array(body[..<prefix.bodyLength])))
            }
            return prefix
        }

        // MARK: Reading acknowledgements (send side)

        /// Reads what the receiver sends back: ACK and the END echo. Anything else, or an ACK for
        /// bytes never sent on this connection, drops the connection (not the stream).
        func readAcknowledgements(_ slot: ConnSlot<Session>) async {
            let reader = BufferedFrameReader()
            while let lease = await slot.current() {
                reader.reset(for: lease.generation)
                do {
                    let prefix = try await reader.next(from: lease.connection)
                    switch prefix.type {
                    case .ack:
                        try acknowledge(prefix.value, generation: lease.generation)
                    case .end:
                        try endEchoed(prefix.value)
                    case .error:
                        let body = try await reader.body(of: prefix, from: lease.connection)
                        throw StreamProtocolError.refusedByPeer(StreamRefusal.decode(prefix: prefix, body: body))
                    case .data, .hello:
                        throw StreamProtocolError.unexpectedFrame(expected: .ack, got: prefix.type)
                    }
                } catch {
                    dropConnection(lease.generation, slot: slot, after: error)
                }
            }
        }

        /// A connection's read failed: a protocol violation is counted as one; a plain
        /// end-of-file or error is just the connection going away.
        private func dropConnection(_ generation: UInt64, slot: ConnSlot<Session>, after error: any Error) {
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

        private func acknowledge(_ offset: UInt64, generation: UInt64) throws {
            let wake = try state.withLockedValue { s -> [CheckedContinuation<Void, Never>] in
                guard s.sendGeneration == generation else { return [] }  // a stale connection
                guard offset <= s.sentHighWater else {
                    throw StreamProtocolError.offsetFromTheFuture(reported: offset, limit: s.sentHighWater)
                }
                guard offset > s.ring.acknowledged else { return [] }
                s.ring.acknowledge(upTo: offset)
                return s.takeProgressWaiters()
            }
            for continuation in wake { continuation.resume() }
        }

        private func endEchoed(_ offset: UInt64) throws {
            let wake = try state.withLockedValue { s -> [CheckedContinuation<Void, Never>] in
                guard let final = s.finalOffset, offset == final, s.ring.acknowledged == final || offset <= s.sentHighWater else {
                    throw StreamProtocolError.malformed("END echo at \(offset) for a stream not ended there")
                }
                if s.ring.acknowledged < final { s.ring.acknowledge(upTo: final) }
                s.endEchoReceived = true
                return s.takeProgressWaiters()
            }
            for continuation in wake { continuation.resume() }
        }

        // MARK: Receiving data (receive side)

        /// Whether `receive` can make progress without the connection becoming readable first: a
        /// body under way, or a whole header already read with the last body (an END, say).
        func hasBufferedFrame(for generation: UInt64) -> Bool {
            state.withLockedValue {
                $0.frameGeneration == generation && ($0.frameRemaining > 0 || $0.headerFilled == StreamFramePrefix.size)
            }
        }

        /// Reads frames from the current connection until it has data for the caller: DATA goes
        /// straight into `buffer`; END ends the stream (returns 0 from then on). A dead
        /// connection only makes it wait for the next one.
        func receive(into buffer: UnsafeMutableRawBufferPointer, slot: ConnSlot<Session>) async -> Int {
            while true {
                if inboundFinished { return 0 }
                guard let lease = await slot.current() else { return 0 }
                do {
                    if let count = try await receiveOnce(into: buffer, from: lease) { return count }
                } catch {
                    dropConnection(lease.generation, slot: slot, after: error)
                }
            }
        }

        /// Returns bytes delivered, 0 at the end, or nil when a frame header or a control frame
        /// was consumed.
        ///
        /// A body is read straight into `buffer`. When the rest of the current body fits, the
        /// same readv also takes the next frame's header (into `inboundHeader`), so a stream of
        /// frames costs one read per body, not two.
        private func receiveOnce(into buffer: UnsafeMutableRawBufferPointer, from lease: ConnSlot<Session>.Lease) async throws -> Int? {
            let (remaining, skip, headerFilled) = state.withLockedValue { s -> (Int, Int, Int) in
                if s.frameGeneration != lease.generation {
                    s.frameGeneration = lease.generation
                    s.frameRemaining = 0
                    s.frameSkip = 0
                    s.headerFilled = 0
                }
                return (s.frameRemaining, s.frameSkip, s.headerFilled)
            }
            let size = StreamFramePrefix.size
            if remaining > 0 {
                return try await receiveBodies(into: buffer, from: lease, remaining: remaining, skip: skip, headerFilled: headerFilled)
            }
            if headerFilled < size {
                let count = try await Self.read(lease.connection, into: [inboundHeader.slice(headerFilled, size - headerFilled)])
                if count == 0 { throw StreamProtocolError.truncated }
                state.withLockedValue { $0.headerFilled += count }
                if headerFilled + count < size { return nil }
            }
            state.withLockedValue { $0.headerFilled = 0 }
            let prefix = try StreamFramePrefix.decode(UnsafeRawBufferPointer(inboundHeader.bytes))
            switch prefix.type {
            case .data:
                try state.withLockedValue { s in
                    guard prefix.value <= s.received else { throw StreamProtocolError.dataGap(expected: s.received, got: prefix.value) }
                    if let final = s.inboundFinal, prefix.value + UInt64(prefix.bodyLength) > final {
                        throw StreamProtocolError.malformed("data after the end of the stream")
                    }
                    s.frameRemaining = prefix.bodyLength
                    s.frameSkip = Int(min(UInt64(prefix.bodyLength), s.received - prefix.value))
                }
                return nil
            case .end:
                let pump = try state.withLockedValue { s -> CheckedContinuation<Void, Never>? in
                    guard prefix.value == s.received else {
                        throw StreamProtocolError.malformed("END at \(prefix.value) but \(s.received) bytes received")
                    }
                    s.inboundFinal = prefix.value
                    s.ackDue = true
                    return s.ringDoorbell()
                }
                pump?.resume()
                return 0
            case .ack:
                guard prefix.value == 0 else { throw StreamProtocolError.offsetFromTheFuture(reported: prefix.value, limit: 0) }
                return nil
            case .error:
                let body = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, prefix.bodyLength), alignment: 1)
                defer { body.deallocate() }
                try await FrameIO.readExactly(lease.connection, into: UnsafeMutableRawBufferPointer(rebasing: body[..<prefix.bodyLength]))
                throw StreamProtocolError.refusedByPeer(StreamRefusal.decode(prefix: prefix, body: Array(body[..<prefix.bodyLength])))
            case .hello:
                throw StreamProtocolError.unexpectedFrame(expected: .data, got: .hello)
            }
        }

        /// The body path of `receiveOnce`: the rest of the current DATA frame straight into
        /// `buffer`, and — while the next frame's header came with it, is the DATA that follows
        /// at once, and the buffer has room — the bodies of the frames after it too, as far as
        /// they have arrived (no wait): many small frames cost one pass, not one each. Anything
        /// else (a control frame, a replay overlap, a header that does not decode) is left for
        /// the frame path. Returns bytes delivered, or nil when none were (a replay's overlap).
        private func receiveBodies(
            into buffer: UnsafeMutableRawBufferPointer, from lease: ConnSlot<Session>.Lease, remaining: Int, skip: Int, headerFilled: Int
        ) async throws -> Int? {
            let size = StreamFramePrefix.size
            var remaining = remaining
            var skip = skip
            var headerFilled = headerFilled
            var filled = 0
            var first = true
            while true {
                let room = UnsafeMutableRawBufferPointer(rebasing: buffer[filled...])
                let want = min(remaining, room.count)
                var targets = [UnsafeMutableRawBufferPointer(rebasing: room[..<want])]
                if want == remaining, headerFilled < size { targets.append(inboundHeader.slice(headerFilled, size - headerFilled)) }
                let total: Int
                if first {
                    total = try await Self.read(lease.connection, into: targets)
                    if total == 0 { throw StreamProtocolError.truncated }
                } else {
                    // Later frames only as far as they have arrived: what is here is delivered now.
                    guard let now = try? lease.connection.readNow(into: targets), now > 0 else { break }
                    total = now
                }
                first = false
                let count = min(total, want)
                let headerBytes = total - count
                let skipped = min(skip, count)
                let delivered = count - skipped
                if skipped > 0, delivered > 0 {
                    // Bytes we already had (a replay overlapping what we received): drop them.
                    room.copyMemory(from: UnsafeRawBufferPointer(rebasing: room[skipped..<count]))
                }
                filled += delivered
                let (timer, pump, next) = state.withLockedValue { s -> (Bool, CheckedContinuation<Void, Never>?, Int?) in
                    s.frameRemaining -= count
                    s.frameSkip -= skipped
                    s.headerFilled += headerBytes
                    s.received &+= UInt64(delivered)
                    var timer = false
                    if delivered > 0, !s.ackTimerArmed {
                        s.ackTimerArmed = true
                        timer = true
                    }
                    var pump: CheckedContinuation<Void, Never>?
                    s.deliveredSinceDoorbell += delivered
                    if s.deliveredSinceDoorbell >= configuration.ackEvery {
                        s.deliveredSinceDoorbell = 0
                        pump = s.ringDoorbell()
                    }
                    // Go on into the next frame only if it is the DATA that follows at once.
                    guard s.frameRemaining == 0, s.headerFilled == size, filled < buffer.count,
                        let prefix = try? StreamFramePrefix.decode(UnsafeRawBufferPointer(inboundHeader.bytes)),
                        prefix.type == .data, prefix.value == s.received,
                        s.inboundFinal.map({ prefix.value + UInt64(prefix.bodyLength) <= $0 }) ?? true
                    else { return (timer, pump, nil) }
                    s.headerFilled = 0
                    s.frameRemaining = prefix.bodyLength
                    s.frameSkip = 0
                    return (timer, pump, prefix.bodyLength)
                }
                if timer { armAckTimer() }
                pump?.resume()
                guard let next else { break }
                remaining = next
                skip = 0
                headerFilled = 0
            }
            return filled > 0 ? filled : nil
        }

        /// Reads at least one byte into `targets` (in order), waiting while there is none; 0 at
        /// end-of-file.
        private static func read(_ connection: Session, into targets: [UnsafeMutableRawBufferPointer]) async throws -> Int {
            while true {
                if let count = try connection.readNow(into: targets) { return count }
                try await connection.waitReadable()
            }
        }

        private func armAckTimer() {
            Task(executorPreference: executor) { [self] in
                try? await Task.sleep(for: configuration.ackDelay)
                let pump = state.withLockedValue { s -> CheckedContinuation<Void, Never>? in
                    s.ackTimerArmed = false
                    s.ackDue = true
                    return s.ringDoorbell()
                }
                pump?.resume()
            }
        }
    }

    typealias SenderState = ResumableSenderState

    typealias StateView = ResumableStateView
}

/// Reads a sender's incoming frames (acknowledgements, the END echo, an ERROR) through a small
/// buffer, so acknowledgements that arrived together cost one read, and a read that emptied the
/// socket lets the next wait skip its EAGAIN probe. One per reading task; `reset` on every new
/// connection (bytes of an old one are never read as the new one's).
final class BufferedFrameReader: @unchecked Sendable {
    /// Sixteen prefixes: small, because every outbound stream keeps one for its whole life.
    private let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 16 * StreamFramePrefix.size, alignment: 8)
    private var start = 0
    private var end = 0
    private var generation: UInt64 = 0

    deinit { buffer.deallocate() }

    func reset(for generation: UInt64) {
        guard generation != self.generation else { return }
        self.generation = generation
        start = 0
        end = 0
    }

    /// The next frame's prefix. A body is left for `body(of:from:)`.
    func next(from connection: some ByteReader) async throws -> StreamFramePrefix {
        try await fill(StreamFramePrefix.size, from: connection)
        let prefix = try StreamFramePrefix.decode(UnsafeRawBufferPointer(rebasing: buffer[start..<start + StreamFramePrefix.size]))
        start += StreamFramePrefix.size
        return prefix
    }

    /// The body of a non-DATA frame (at most a few hundred bytes, by the prefix's limits): what
    /// is buffered, then the rest read directly.
    func body(of prefix: StreamFramePrefix, from connection: some ByteReader) async throws -> [UInt8] {
        let buffered = min(prefix.bodyLength, end - start)
        var body = Array(buffer[start..<start + buffered])
        start += buffered
        if body.count < prefix.bodyLength {
            let rest = UnsafeMutableRawBufferPointer.allocate(byteCount: prefix.bodyLength - body.count, alignment: 1)
            defer { rest.deallocate() }
            try await FrameIO.readExactly(connection, into: rest)
            body += rest
        }
        return body
    }

    private func fill(_ count: Int, from connection: some ByteReader) async throws {
        if buffer.count - start < count {
            buffer.baseAddress!.copyMemory(from: buffer.baseAddress! + start, byteCount: end - start)
            end -= start
            start = 0
        }
        while end - start < count {
            let target = UnsafeMutableRawBufferPointer(rebasing: buffer[end...])
            guard let got = try connection.readNow(into: target) else {
                try await connection.waitReadable()
                continue
            }
            if got == 0 { throw StreamProtocolError.truncated }
            end += got
        }
    }
}

/// A few bytes of scratch memory owned by one engine and used by one task at a time (the
/// holder of the sending token, or the one receiving task), which is why it is `@unchecked`.
final class ScratchBytes: @unchecked Sendable {
    let bytes: UnsafeMutableRawBufferPointer

    init(count: Int) {
        bytes = .allocate(byteCount: count, alignment: 8)
    }

    deinit { bytes.deallocate() }

    func slice(_ offset: Int, _ count: Int) -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(rebasing: bytes[offset..<offset + count])
    }
}

extension ResumableEngineState {
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

/// A resumable stream engine's state (outside the generic engine, so the lock around it needs
/// no type metadata looked up at run time).
struct ResumableEngineState: Sendable {
    // Send side.
    var ring: ReplayRing
    var finalOffset: UInt64?
    var endEchoReceived = false
    var producer: CheckedContinuation<Void, Never>?
    /// For acknowledgement validation: the connection generation being sent on and the
    /// highest offset handed to it. An ACK beyond that is a lie.
    var sendGeneration: UInt64 = 0
    var sentHighWater: UInt64 = 0
    /// The newest session: the peer's received offset and ours, for the pump (only the
    /// newest matters: an older session is replaced before the pump could use it).
    var sessionStart: (id: ObjectIdentifier, peer: UInt64, ours: UInt64)?
    /// Who may write frames now (the pump, or the producer sending inline), and where
    /// the current connection stands.
    var sending = false
    var sender = ResumableSenderState()
    /// Dialer: the last attempt number used. Acceptor: the newest attempt accepted.
    var lastAttempt: UInt64 = 0
    /// The highest offset ever handed to any connection (for the replay statistic).
    var everSent: UInt64 = 0
    /// The highest offset ever handed to a write, on any connection: no peer can hold a
    /// byte beyond it (a hello that says so is refused).
    var everHandedOut: UInt64 = 0
    /// How much the producer reserves for its next read: what the source gave last time,
    /// doubled while it keeps filling what was offered.
    var readAhead = 64 * 1024
    // Receive side.
    var received: UInt64 = 0
    var inboundFinal: UInt64?
    var ackTimerArmed = false
    var ackDue = false
    var endEchoSent = false
    var echoWaiters: [CheckedContinuation<Void, Never>] = []
    /// The DATA frame being read: bytes of it still to come, for this generation.
    var frameGeneration: UInt64 = 0
    var frameRemaining = 0
    var frameSkip = 0
    /// Bytes of the next frame's header read so far (with the end of the previous body).
    var headerFilled = 0
    var deliveredSinceDoorbell = 0
    // Both.
    var doorbell = false
    var pumpWaiter: CheckedContinuation<Void, Never>?
    var progressWaiters: [UInt64: CheckedContinuation<Void, Never>] = [:]
    var nextWaiter: UInt64 = 0
    var closed = false
    var drainWatch = false
    var statistics = ResumableStatistics()
}

/// What the pump writes next.
enum ResumableWork {
    case data([UnsafeRawBufferPointer], offset: UInt64, count: Int)
    case ack(UInt64)
    case end(UInt64)
    case idle
}

/// Where sending stands on the current connection.
struct ResumableSenderState: Sendable {
    var generation: UInt64 = 0
    var position: UInt64 = 0
    var ackSent: UInt64 = 0
    var endSent = false
}

/// A read-only view of the engine state for completion predicates.
struct ResumableStateView {
    let endEchoReceived: Bool
    let ring: (acknowledged: UInt64, count: Int)
    let finalOffset: UInt64?
    let inboundFinal: UInt64?
    let direction: StreamDirection

    init(_ s: ResumableEngineState, direction: StreamDirection) {
        endEchoReceived = s.endEchoReceived
        ring = (s.ring.acknowledged, s.ring.count)
        finalOffset = s.finalOffset
        inboundFinal = s.inboundFinal
        self.direction = direction
    }
}
