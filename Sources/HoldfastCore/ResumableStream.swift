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
    /// Receive side: acknowledge (and report in hellos) only bytes the consumer confirmed it
    /// delivered (`delivered`), not bytes merely received: the sender then keeps every byte
    /// that is not in the process's pipe yet, so a relay that crashes with bytes in its buffer
    /// loses none of them. The broker's stdin relays set it.
    public var acknowledgeDelivered = false
    /// Receive side: the END echo waits for `releaseEndEcho()`. The echo tells the sender it may
    /// forget the stream; an owner that must first make the end known elsewhere holds it until
    /// then (the broker's stdin: the supervisor must know the host ended it before the host can
    /// close the stream, or a broker killed in between leaves the next one a stdin that never
    /// ends, redialling a host that no longer knows it).
    public var holdEndEcho = false

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
///
/// The protocol's decisions are two values with no I/O, `ResumableSender` and
/// `ResumableReceiver`; the `Engine` (ResumableEngine*.swift) drives the one of this end's
/// direction: it holds it under its lock, does the reads and writes it asks for, and parks the
/// tasks that wait.
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
    ///   - resumeAt: this end is a new relay taking over from one that crashed: the stream goes
    ///     on at this offset (what its checkpoint recovered), and its hellos say it restarted, so
    ///     bytes the crash took are reported as a gap rather than refused (docs/PROTOCOL.md, "Gaps").
    ///   - restoring: what the crashed relay's ring held (its storage outlived it): sent again
    ///     from where the peer stands, so only bytes it never had in that memory are a gap.
    ///   - hole: offsets at the end of the restored ring whose bytes are unknown (a read the
    ///     crash interrupted): told to the peer as a gap, never sent.
    ///   - checkpoint: where to keep this end's progress for such a successor.
    ///   - inputEnded: such a successor resuming an input the peer had already ended (its END
    ///     arrived at the crashed relay): it holds the whole input, so a peer that no longer
    ///     knows the stream waits for no echo from it.
    ///   - storage: where the replay ring's blocks come from.
    ///   - executor: where the stream's own tasks run (its pump, its acknowledgement reader):
    ///     the I/O reactor's thread for real sockets, so a frame read or written on readiness
    ///     costs no hop to another thread. `nil`: the global executor.
    public init(
        token: [UInt8], secret: StreamSecret, role: StreamRole, direction: StreamDirection,
        configuration: ResumableConfiguration = ResumableConfiguration(),
        policy: RedialPolicy = .default, storage: any RingBlockStorage = BufferPool.ring,
        executor: (any TaskExecutor)? = nil,
        resumeAt: UInt64? = nil, restoring: RestoredRing? = nil, hole: Range<UInt64>? = nil, checkpoint: StreamCheckpoint? = nil,
        inputEnded: Bool = false,
        dial: (@Sendable () async throws -> Transport)? = nil,
        attemptClock: (@Sendable () -> UInt64)? = nil,
        observer: (@Sendable (SlotEvent) -> Void)? = nil
    ) {
        self.token = token
        self.secret = secret
        self.role = role
        self.direction = direction
        self.configuration = configuration
        let engine = Engine(
            direction: direction, configuration: configuration, storage: storage, executor: executor, resumeAt: resumeAt, restoring: restoring,
            hole: hole, checkpoint: checkpoint)
        let restarted = resumeAt != nil
        self.engine = engine
        // Set once the slot exists: a dial that learns the peer forgot the stream closes it.
        let forgottenSlot = NIOLockedValueBox<ConnSlot<Session>?>(nil)
        // The run of "unknown stream" answers going on now (nil: none).
        let forgotten = NIOLockedValueBox<ForgottenRun?>(nil)
        // A pause in a run longer than the slowest redial and its dial's bound is no run: the
        // peer was not asked meanwhile (this end stopped, the guest paused).
        let longestPause = policy.maxInterval + policy.connectTimeout + Self.forgottenAfter
        var slotDial: ConnSlot<Session>.Dial?
        if let dial {
            slotDial = { [token, role] in
                let transport: Transport
                do {
                    transport = try await dial()
                } catch {
                    // No answer from the peer (a host agent restarting, a blackout): what it
                    // said before is not said "again and again" across this.
                    forgotten.withLockedValue { $0 = nil }
                    throw error
                }
                do {
                    let hello = StreamAuthentication.sign(
                        StreamHello(
                            role: role, token: token, receivedOffset: engine.receivedForHello,
                            attempt: engine.nextAttempt(floor: attemptClock?() ?? 0), nonce: StreamAuthentication.nonce(), restarted: restarted),
                        secret: secret)
                    let session = try await Handshake.initiate(on: transport, hello: hello) { peer in
                        // The host's proof covers our nonce: a recorded answer does not verify.
                        engine.validate(peer, token: token, ourRole: role, secret: secret, challenge: hello.nonce)
                    }
                    engine.record(session)
                    forgotten.withLockedValue { $0 = nil }
                    return session
                } catch {
                    transport.close()
                    if let problem = error as? StreamProtocolError, problem != .truncated {
                        engine.count(\.refusedConnections)
                    }
                    // An input that has every byte and its END, redialling only to echo the END:
                    // "unknown stream" means the peer no longer waits for the echo (it had it and
                    // closed the stream, the connection cut before we saw that; or it restarted).
                    // Redialling on would hold the stream until the drain timeout for nobody. A
                    // peer that says so for a second, without a connection between, means it (a
                    // host agent restarting registers its streams again within that). Likewise an
                    // output whose every byte the peer acknowledged, redialling only to deliver
                    // its END: the peer had it and closed the stream (a host application done at
                    // END), or dropped the stream; either way nobody will take the END. Found by
                    // the soak: a broker killed after the host had a handed-over process's END
                    // and closed its stream left the successor redialling it until the drain
                    // timeout (300 s there), the process in its table all along.
                    if case .refusedByPeer(let refusal)? = error as? StreamProtocolError, refusal.code == .unknownToken,
                        inputEnded || engine.hasTheWholeInput || engine.hasOnlyTheEndLeft, let slot = forgottenSlot.withLockedValue({ $0 })
                    {
                        // Only a run of such answers — every dial for a second, at least three,
                        // nothing else between — is the peer meaning it. Counted from the first
                        // one ever, as before, one answer after a pause (a host agent that was
                        // down for a while, a guest paused) closed the stream at once, while the
                        // host was still registering its streams again.
                        let now = ContinuousClock.now
                        let run = forgotten.withLockedValue { run -> ForgottenRun in
                            if let going = run, now - going.last <= longestPause {
                                run = ForgottenRun(since: going.since, last: now, answers: going.answers + 1)
                            } else {
                                run = ForgottenRun(since: now, last: now, answers: 1)
                            }
                            return run!
                        }
                        if run.answers >= Self.forgottenAnswers, now - run.since >= Self.forgottenAfter { Task { slot.close() } }
                    } else {
                        forgotten.withLockedValue { $0 = nil }
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
        forgottenSlot.withLockedValue { $0 = slot }
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
        // Closed (by its owner, or given up after its drain timeout): this end no longer has the
        // stream. Installing the connection would only close it, and the peer's dial would have
        // succeeded — it would dial again at once, without end.
        if slot.isClosed {
            await Handshake.refuse(transport, .wrongToken)
            throw .wrongToken
        }
        if let problem = engine.validate(hello, token: token, ourRole: role, secret: secret, challenge: nil) {
            engine.count(\.refusedConnections)
            await Handshake.refuse(transport, problem)
            throw problem
        }
        let ours = StreamAuthentication.sign(
            StreamHello(
                role: role, token: token, receivedOffset: engine.receivedForHello, nonce: StreamAuthentication.nonce(), restarted: engine.restarted),
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

    /// A producer that reads its source itself and then calls `send` (a terminal's relay) says
    /// so before each read, so a crash between its read and the send is reported as a gap of
    /// at most `length` bytes rather than lost silently.
    public func willTake(upTo length: Int) {
        engine.willTake(length)
    }

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
    /// byte leaves the pipe only into the ring. A source with a window is read from its window,
    /// its level recorded first (`ByteReader.fillWindow`).
    public func pull(from source: some ByteReader, pool: BufferPool) async throws(StreamClosed) -> PullResult {
        let regions = try await engine.reserve(slot, upTo: min(engine.readAhead, source.largestRead ?? .max))
        let offered = regions.reduce(0) { $0 + $1.count }
        let fill: WindowFill
        do {
            fill = try source.fillWindow(upTo: offered)
        } catch {
            fill = .endOfFile  // as a read's failure below: a pty's EIO after its last slave closed
        }
        switch fill {
        case .unwindowed:
            engine.willTake(offered)
        case .holding(let level):
            // The read below empties the window into the ring: the level before it settles,
            // after a crash inside it, how much it took.
            engine.willTake(min(level, offered), windowLevel: level)
        case .nothing:
            engine.commit(0, of: regions)
            return .nothing
        case .endOfFile:
            engine.commit(0, of: regions)
            return .endOfFile
        }
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

    public func willDeliver(_ count: Int, stageLevel: Int?) {
        engine.willDeliver(count, stageLevel: stageLevel)
    }

    public func delivered(_ count: Int) {
        engine.delivered(count)
    }

    /// The END echo this stream holds (`ResumableConfiguration.holdEndEcho`) may go out.
    public func releaseEndEcho() {
        engine.releaseEndEcho()
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

    /// How long an input with its END (or an output with only its END left) is refused
    /// "unknown stream" before it lets go.
    static var forgottenAfter: Duration { .seconds(1) }
    /// ...and at least this many of them.
    static var forgottenAnswers: Int { 3 }

    /// "unknown stream" answers in a row: the first's time, the last's, how many.
    struct ForgottenRun: Sendable {
        var since: ContinuousClock.Instant
        var last: ContinuousClock.Instant
        var answers: Int
    }

    public func close() {
        slot.close()
    }

    public var isClosed: Bool { slot.isClosed }
    public func disconnect() { slot.disconnect() }
    public func redialNow() { slot.redialNow() }

    public var statistics: ResumableStatistics { engine.statistics }

    /// Send side: its producer has ended (`finish` was called), so no byte will be added: what is
    /// left is a drain the drain timeout bounds.
    public var producerEnded: Bool { engine.producerEnded }

    /// The slot's and the engine's internal state in two lines, for diagnosing a stuck stream.
    public var debugSummary: String { "\(slot.debugSummary)\n  engine: \(engine.debugSummary)" }

    var engineForTests: Engine { engine }
}

extension BufferPool {
    /// Replay-ring blocks: 64 KiB each.
    public static let ring = BufferPool(bufferSize: ReplayRing.defaultBlockSize, retained: 64)
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
    /// The highest offset a write to a connection has completed (send side): what a reconnect
    /// would have to replay if the peer had none of it.
    public var sentBytes: UInt64 = 0
    /// Connections refused: bad hello, wrong token, impossible offsets.
    public var refusedConnections: UInt64 = 0
    /// Connections dropped for a protocol violation after the hello.
    public var protocolErrors: UInt64 = 0
    public var ended = false
    /// Offsets that will never arrive (a relay's crash took them; each side reports them), as
    /// this end saw them...
    public var lost = GapRecord()
    /// ...and the bytes lost over every incarnation of this end (a resumed end carries its
    /// predecessors' count in the checkpoint).
    public var lostBytesInAll: UInt64 = 0
}
