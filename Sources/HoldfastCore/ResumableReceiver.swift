import HoldfastProtocol

/// The receiving half of the resumable stream protocol (docs/PROTOCOL.md), as a value: what was
/// received, where the stream ends, when to acknowledge, the END echo, and where the frame being
/// read stands. It decides, and returns what to do; it does no I/O and takes no lock —
/// `ResumableStream.Engine` holds it under its lock, reads the bytes it asks for and reports
/// back what was read. Tested alone in `ResumableMachineTests`.
struct ResumableReceiver: Sendable {
    /// What the receiver's end writes next.
    enum Frame: Equatable {
        /// Everything before the offset arrived.
        case ack(UInt64)
        /// The END echo: the stream's end arrived (once per connection: an echo lost with its
        /// connection goes out again on the next).
        case endEcho(final: UInt64)
        case idle
    }

    /// What to do after a frame's header was read.
    enum Inbound: Equatable {
        /// A DATA body of `length` bytes follows: read it. Its first `skip` bytes are a replay of
        /// bytes already received: drop them.
        case body(length: Int, skip: Int)
        /// END at the received offset: the stream ended. Deliver nothing more; the pump
        /// acknowledges and echoes it.
        case ended
        /// Nothing to do (an ACK of 0: a sender has nothing to acknowledge).
        case nothing
        /// A GAP moved the received offset on: the skipped bytes are recorded as lost; the pump
        /// acknowledges the new offset.
        case skipped
        /// The peer refuses the stream: read its ERROR body and drop the connection.
        case refusal
    }

    /// Where writing stands on one connection.
    struct Connection: Sendable, Equatable {
        var generation: UInt64 = 0
        /// The last acknowledgement the peer has (our hello's offset counts as one).
        var ackSent: UInt64 = 0
        var endSent = false
    }

    /// The frame being read on one connection.
    struct Cursor: Sendable, Equatable {
        var generation: UInt64 = 0
        /// Bytes of the current DATA body still to come...
        var remaining = 0
        /// ...of which this many, first, are a replay's overlap to drop.
        var skip = 0
        /// Bytes of the next frame's header read so far (a body's read may take them with it).
        var headerFilled = 0
    }

    /// What reading body bytes asks of the engine.
    struct Delivery: Equatable {
        /// Bytes read that were already received (a replay's overlap): drop them...
        var skipped: Int
        /// ...and deliver the rest.
        var delivered: Int
        /// Start the ack timer: the first unacknowledged bytes since the last one fired.
        var armAckTimer: Bool
        /// Wake the pump: `ackEvery` bytes were delivered since it was last woken for that.
        var wakePump: Bool
    }

    /// Acknowledge after this many bytes (or when the ack timer fires, or at the end).
    let ackEvery: Int
    /// Bytes received (delivered to the consumer), in stream order.
    private(set) var received: UInt64 = 0
    /// Where the stream ends, once END arrived.
    private(set) var inboundFinal: UInt64?
    /// An acknowledgement is due whatever its size (the ack timer fired, or END arrived).
    private(set) var ackDue = false
    private(set) var ackTimerArmed = false
    private var deliveredSinceWake = 0
    private(set) var connection = Connection()
    /// The END echo went out on some connection.
    private(set) var endEchoSent = false
    /// The echo waits for its owner (`ResumableConfiguration.holdEndEcho`) until released.
    var endEchoHeld = false
    private(set) var cursor = Cursor()
    /// The offsets the sender said are gone (GAP frames): never delivered, reported instead.
    private(set) var lost = GapRecord()
    /// Acknowledging only delivered bytes: the consumer confirmed everything before this offset
    /// (nil: every received byte counts as delivered).
    private(set) var confirmed: UInt64?
    /// What may be acknowledged, and reported in a hello.
    var acknowledgeable: UInt64 { confirmed ?? received }

    /// - Parameter start: where a resumed stream stands (the checkpoint's offset); 0 when new.
    init(ackEvery: Int, start: UInt64 = 0, acknowledgeDelivered: Bool = false) {
        self.ackEvery = ackEvery
        self.received = start
        self.confirmed = acknowledgeDelivered ? start : nil
    }

    /// The consumer delivered `count` more bytes (acknowledging delivered bytes only). They are
    /// acknowledged at once: the sender's ring is what holds them until then.
    mutating func delivered(_ count: Int) {
        guard let confirmed else { return }
        self.confirmed = min(received, confirmed + UInt64(count))
        if count > 0 { ackDue = true }
    }

    /// END arrived and everything before it was delivered: `receive` returns 0 from now on.
    var isFinished: Bool { inboundFinal != nil && inboundFinal == received }

    // MARK: Hellos

    /// A peer's hello: we never send data, so a peer that says it holds any is refused.
    func acceptHello(peerReceived: UInt64) throws(StreamProtocolError) {
        // (A resumed receiver sends no data either: the same holds.)
        guard peerReceived == 0 else { throw .offsetFromTheFuture(reported: peerReceived, limit: 0) }
    }

    // MARK: Reading frames

    /// Where reading stands on connection `generation`: a new connection starts at a frame
    /// boundary (the bytes of an old one are never read as the new one's).
    mutating func reading(on generation: UInt64) -> Cursor {
        if cursor.generation != generation { cursor = Cursor(generation: generation) }
        return cursor
    }

    /// Whether reading on `generation` can go on without the connection becoming readable: a
    /// body under way, or a whole header already read with the last body.
    func hasBufferedFrame(on generation: UInt64) -> Bool {
        cursor.generation == generation && (cursor.remaining > 0 || hasWholeHeader)
    }

    /// The next frame's header is read entirely.
    var hasWholeHeader: Bool { cursor.headerFilled == StreamFramePrefix.size }

    /// `count` more bytes of the next frame's header were read.
    mutating func readHeader(_ count: Int) {
        cursor.headerFilled += count
    }

    /// A whole frame header, decoded: what to do with it. Refused: DATA beyond what was received
    /// (a gap) or beyond the end, END anywhere but at the received offset, an ACK of anything
    /// but 0 (we send no data), a hello.
    mutating func take(_ header: StreamFramePrefix) throws(StreamProtocolError) -> Inbound {
        cursor.headerFilled = 0
        switch header.type {
        case .data:
            guard header.value <= received else { throw .dataGap(expected: received, got: header.value) }
            // A sender's GAP may take `received` up to the last offset there is: a body past it
            // would wrap the offset (or, added up, trap: this side's process — a host agent
            // serving every VM's streams — ended by one frame).
            guard UInt64(header.bodyLength) <= UInt64.max - header.value else {
                throw .malformed("data past the largest offset a stream has")
            }
            if let final = inboundFinal, header.value + UInt64(header.bodyLength) > final {
                throw .malformed("data after the end of the stream")
            }
            cursor.remaining = header.bodyLength
            cursor.skip = Int(min(UInt64(header.bodyLength), received - header.value))
            return .body(length: cursor.remaining, skip: cursor.skip)
        case .end:
            guard header.value == received else {
                throw .malformed("END at \(header.value) but \(received) bytes received")
            }
            inboundFinal = header.value
            ackDue = true
            return .ended
        case .ack:
            guard header.value == 0 else { throw .offsetFromTheFuture(reported: header.value, limit: 0) }
            return .nothing
        case .gap:
            // From an authenticated sender, as trustworthy as its DATA: it says which bytes no
            // longer exist. One at or below what we hold is a repeat (its connection dropped
            // before our ACK of it): nothing to do.
            guard header.value > received else { return .nothing }
            if let final = inboundFinal, header.value > final { throw .malformed("GAP beyond the end of the stream") }
            lost.add(received..<header.value)
            received = header.value
            // Nothing is between the two to deliver: the consumer's confirmations go on from here.
            if confirmed != nil { confirmed = header.value }
            ackDue = true
            return .skipped
        case .error:
            return .refusal
        case .hello:
            throw .unexpectedFrame(expected: .data, got: .hello)
        }
    }

    /// `count` bytes of the current body were read, and `headerBytes` of the next frame's header
    /// with them.
    mutating func readBody(_ count: Int, headerBytes: Int) -> Delivery {
        let skipped = min(cursor.skip, count)
        let delivered = count - skipped
        cursor.remaining -= count
        cursor.skip -= skipped
        cursor.headerFilled += headerBytes
        received &+= UInt64(delivered)
        var armAckTimer = false
        if delivered > 0, !ackTimerArmed {
            ackTimerArmed = true
            armAckTimer = true
        }
        deliveredSinceWake += delivered
        var wakePump = false
        if deliveredSinceWake >= ackEvery {
            deliveredSinceWake = 0
            wakePump = true
        }
        return Delivery(skipped: skipped, delivered: delivered, armAckTimer: armAckTimer, wakePump: wakePump)
    }

    /// After a body: if the header read with it is the DATA that follows at once (no gap, no
    /// overlap, within the end), its body is read straight on — returns its length. Anything
    /// else is left for `take`.
    mutating func continueWith(_ header: StreamFramePrefix) -> Int? {
        guard cursor.remaining == 0, hasWholeHeader, header.type == .data, header.value == received,
            UInt64(header.bodyLength) <= UInt64.max - header.value,
            inboundFinal.map({ header.value + UInt64(header.bodyLength) <= $0 }) ?? true
        else { return nil }
        cursor.headerFilled = 0
        cursor.remaining = header.bodyLength
        cursor.skip = 0
        return header.bodyLength
    }

    /// The ack timer fired: acknowledge whatever arrived.
    mutating func ackTimerFired() {
        ackTimerArmed = false
        ackDue = true
    }

    // MARK: Writing

    /// The next frame to write on connection `generation`. A new connection starts with what our
    /// hello reported (`ourHelloReceived`) as acknowledged, or nothing when unknown (an ACK
    /// again is harmless). An ACK is due after `ackEvery` bytes, when `ackDue`, or once the
    /// stream ended; the END echo after the last ACK, once per connection.
    mutating func nextFrame(generation: UInt64, ourHelloReceived: UInt64?) -> Frame {
        if connection.generation != generation {
            connection = Connection(generation: generation, ackSent: ourHelloReceived ?? 0)
        }
        let ackable = acknowledgeable
        if ackable > connection.ackSent,
            ackDue || ackable - connection.ackSent >= UInt64(ackEvery) || inboundFinal != nil
        {
            ackDue = false
            return .ack(ackable)
        }
        if let final = inboundFinal, final == ackable, !connection.endSent, !endEchoHeld { return .endEcho(final: final) }
        return .idle
    }

    /// An ACK of `offset` went out on connection `generation`.
    mutating func wroteAck(_ offset: UInt64, generation: UInt64) {
        if connection.generation == generation { connection.ackSent = offset }
    }

    /// The END echo went out on connection `generation`.
    mutating func wroteEndEcho(generation: UInt64) {
        if connection.generation == generation { connection.endSent = true }
        endEchoSent = true
    }

    /// Whether the END echo went out on connection `generation`.
    func echoedEnd(on generation: UInt64) -> Bool {
        connection.generation == generation && connection.endSent
    }
}
