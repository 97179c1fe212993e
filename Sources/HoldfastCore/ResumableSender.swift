import HoldfastProtocol

/// The sending half of the resumable stream protocol (docs/PROTOCOL.md), as a value: the replay
/// ring and every offset of the send side. It decides, and returns what to do; it does no I/O and
/// takes no lock — `ResumableStream.Engine` holds it under its lock, writes the frames it asks
/// for and reports back what was written. Tested alone in `ResumableMachineTests`.
///
/// Offsets: `acknowledged ≤ position ≤ end` on the current connection (`position`: the next byte
/// to write there); `sentHighWater` is the highest offset handed to the current connection (an
/// ACK beyond it is a lie), `everHandedOut` the highest handed to any connection (a hello that
/// claims more is one too).
struct ResumableSender: Sendable {
    /// What the sender's end writes next.
    enum Frame {
        /// The ring's bytes from `offset`, `count` in all, as regions in stream order. The ring
        /// is pinned from `offset` until `wroteData` (a hostile early ACK frees nothing under the
        /// write).
        case data([UnsafeRawBufferPointer], offset: UInt64, count: Int)
        /// END: every byte before `final` was written on this connection.
        case end(final: UInt64)
        /// GAP: the bytes from the peer's offset up to `to` are gone; data goes on at `to`.
        case gap(to: UInt64)
        case idle
    }

    /// Where sending stands on one connection (each connection starts over from the peer's
    /// hello).
    struct Connection: Sendable, Equatable {
        var generation: UInt64 = 0
        /// The next byte to write on it.
        var position: UInt64 = 0
        var endSent = false
        /// The peer's hello said it holds less than the ring's oldest byte (a restart on one side
        /// lost them): a GAP to `position` goes first.
        var gapDue = false
    }

    /// The unacknowledged bytes, kept for replay. A reference (its blocks are memory that is
    /// written outside the lock); only this value's owner calls it.
    let ring: ReplayRing
    /// Where the stream ends, once the producer said so (`end()`).
    private(set) var finalOffset: UInt64?
    /// The receiver echoed END: it holds every byte.
    private(set) var endEchoReceived = false
    private(set) var connection = Connection()
    /// The highest offset handed to the current connection's writes.
    private(set) var sentHighWater: UInt64 = 0
    /// The highest offset ever written on any connection (for the replay statistic).
    private(set) var everSent: UInt64 = 0
    /// The highest offset ever handed to a write, on any connection: no peer can hold a byte
    /// beyond it.
    private(set) var everHandedOut: UInt64 = 0
    /// Bytes written again after a reconnect.
    private(set) var replayedBytes: UInt64 = 0
    /// This end resumed after its relay crashed: its ring starts where the checkpoint said, and
    /// a peer holding less is told of the gap instead of refused.
    let restarted: Bool
    /// Offsets inside the ring whose bytes are unknown: a read the crash interrupted took some of
    /// them from the pipe, and how many cannot be known. Never sent as data: a GAP over them.
    let hole: Range<UInt64>?
    /// The offsets the peer will never get (merged ranges), and their total.
    private(set) var lost = GapRecord()
    /// How much the producer reserves for its next read: what the source gave last time,
    /// doubled while it keeps filling what was offered.
    private(set) var readAhead = ResumableSender.minimumReadAhead

    /// Most bytes one producer read takes (one readv).
    static var maximumReadAhead: Int { 1 << 20 }
    static var minimumReadAhead: Int { 64 * 1024 }

    /// - Parameter restarted: the ring starts at a resumed offset (`ring.end`): nothing before it
    ///   can be sent, and nothing before it was handed out by this incarnation.
    init(ring: ReplayRing, restarted: Bool = false, hole: Range<UInt64>? = nil) {
        precondition(hole.map { $0.lowerBound >= ring.acknowledged && $0.upperBound <= ring.end } ?? true, "a hole lies in the restored ring")
        self.ring = ring
        self.restarted = restarted
        self.hole = hole
        // Those bytes are gone whether or not the GAP that tells it has gone out yet.
        if let hole { lost.add(hole) }
        everHandedOut = ring.end
        everSent = ring.end
    }

    /// Bytes the producer gave.
    var offset: UInt64 { ring.end }
    /// Bytes the receiver holds, for certain.
    var acknowledged: UInt64 { ring.acknowledged }
    /// Bytes given but not known to have arrived.
    var undelivered: UInt64 { (finalOffset ?? ring.end) - ring.acknowledged }
    /// Ended, every byte acknowledged and the END echoed: the stream is done.
    var isComplete: Bool { endEchoReceived && ring.acknowledged == finalOffset }
    /// Ended and every byte acknowledged (the echo may still be on its way).
    var isDrained: Bool { ring.count == 0 && finalOffset != nil }

    // MARK: The producer

    /// Writable ring space, up to `limit` bytes as regions in stream order; empty while the ring
    /// is full. Fill a prefix, then `commit`.
    func reserve(upTo limit: Int) -> [UnsafeMutableRawBufferPointer] {
        guard canTake else { return [] }
        return ring.reserve(upTo: limit)
    }

    /// The fewest bytes of room a read is offered. A pipe whose writer made it packetized
    /// (O_DIRECT on its write end) gives a read shorter than a packet (up to a page: 64 KiB on
    /// some arm64 kernels) that much, and the kernel drops the rest of the packet: a process
    /// could make its own bytes vanish with no gap reported. So the producer waits for this
    /// much room (or an empty ring, if the ring is smaller) instead of reading a sliver.
    static var smallestOffer: Int { 64 * 1024 }

    /// Whether the ring has room for a read (`smallestOffer`).
    var canTake: Bool { ring.room >= min(Self.smallestOffer, ring.capacity) }

    /// The producer filled the first `count` of the `offered` bytes it reserved.
    mutating func commit(_ count: Int, offered: Int) {
        ring.commit(count)
        if count >= offered {
            readAhead = min(Self.maximumReadAhead, max(readAhead, offered) * 2)
        } else if count > 0 {
            readAhead = max(Self.minimumReadAhead, count + count / 2)
        }
    }

    /// The producer has no more: END follows the last byte given so far. Idempotent.
    mutating func end() {
        if finalOffset == nil { finalOffset = ring.end }
    }

    // MARK: Hellos

    /// A peer's hello says it holds `peerReceived` bytes. Believed only if not beyond what was
    /// ever handed to a connection (not what the ring holds: a byte may have been written and
    /// lost) and not before what it already acknowledged (those bytes are gone); then what it
    /// holds is acknowledged (the ACK may have been lost with the old connection). A refused
    /// hello changes nothing. Returns whether it acknowledged anything new.
    ///
    /// A peer below the ring's oldest byte is refused — unless one side restarted after a crash
    /// (this end, or the peer says so in its hello): then those bytes are lost, recorded, and the
    /// connection starts with a GAP frame.
    mutating func acceptHello(peerReceived: UInt64, peerRestarted: Bool = false) throws(StreamProtocolError) -> Bool {
        guard peerReceived <= everHandedOut else {
            throw .offsetFromTheFuture(reported: peerReceived, limit: everHandedOut)
        }
        guard peerReceived >= ring.acknowledged else {
            guard restarted || peerRestarted else {
                throw .offsetAlreadyDiscarded(reported: peerReceived, oldest: ring.acknowledged)
            }
            lost.add(peerReceived..<ring.acknowledged)
            return false
        }
        guard peerReceived > ring.acknowledged else { return false }
        ring.acknowledge(upTo: peerReceived)
        return true
    }

    // MARK: Writing

    /// The next frame to write on connection `generation`, at most `limit` data bytes.
    ///
    /// On a new connection sending starts over at what its peer said in its hello
    /// (`peerReceived`), or at the oldest unacknowledged byte when that is unknown (a session
    /// replaced before its first write): the receiver drops what it already has. Data is pinned
    /// until `wroteData`.
    mutating func nextFrame(generation: UInt64, peerReceived: UInt64?, limit: Int) -> Frame {
        if connection.generation != generation {
            connection = Connection(generation: generation, position: max(peerReceived ?? 0, ring.acknowledged))
            // Only a hello that was accepted below the ring (a restart) gets here with less.
            connection.gapDue = (peerReceived ?? ring.acknowledged) < ring.acknowledged
            sentHighWater = connection.position
        }
        if connection.gapDue { return .gap(to: connection.position) }
        // A newer connection's hello may have acknowledged past where this one is: those bytes
        // arrived, and the ring no longer holds them.
        if connection.position < ring.acknowledged { connection.position = ring.acknowledged }
        let position = connection.position
        if let hole, hole.contains(position) {
            lost.add(hole)
            return .gap(to: hole.upperBound)
        }
        if position < ring.end {
            // Data stops where the hole starts.
            let limit = hole.map { position < $0.lowerBound ? min(limit, Int($0.lowerBound - position)) : limit } ?? limit
            let regions = ring.regions(from: position, limit: limit)
            let count = regions.reduce(0) { $0 + $1.count }
            ring.pin(position)
            sentHighWater = max(sentHighWater, position + UInt64(count))
            everHandedOut = max(everHandedOut, position + UInt64(count))
            return .data(regions, offset: position, count: count)
        }
        if let final = finalOffset, position == final, !connection.endSent { return .end(final: final) }
        return .idle
    }

    /// A `.data` frame's write on connection `generation` ended: `written` of its bytes went out
    /// (`connectionFailed`: the write failed after them, and the connection is being dropped, so
    /// its position no longer matters).
    mutating func wroteData(from offset: UInt64, written: Int, generation: UInt64, connectionFailed: Bool) {
        ring.unpin()
        let sentEnd = offset + UInt64(written)
        if !connectionFailed, connection.generation == generation { connection.position = sentEnd }
        // Bytes below the highest offset ever written are replays.
        if offset < everSent { replayedBytes &+= min(sentEnd, everSent) - offset }
        everSent = max(everSent, sentEnd)
    }

    /// The GAP to `to` went out on connection `generation`: sending goes on there.
    mutating func wroteGap(to: UInt64, generation: UInt64) {
        guard connection.generation == generation else { return }
        connection.gapDue = false
        connection.position = max(connection.position, to)
        sentHighWater = max(sentHighWater, to)
        everHandedOut = max(everHandedOut, to)
    }

    /// END went out on connection `generation`.
    mutating func wroteEnd(generation: UInt64) {
        if connection.generation == generation { connection.endSent = true }
    }

    // MARK: What the receiver sends back

    /// An ACK read on connection `generation`. One from a connection that is not the one being
    /// written to is stale and ignored; one beyond what was handed to this connection is refused.
    /// Returns whether it acknowledged anything new.
    mutating func acknowledge(_ offset: UInt64, generation: UInt64) throws(StreamProtocolError) -> Bool {
        guard connection.generation == generation else { return false }
        guard offset <= sentHighWater else {
            throw .offsetFromTheFuture(reported: offset, limit: sentHighWater)
        }
        guard offset > ring.acknowledged else { return false }
        ring.acknowledge(upTo: offset)
        return true
    }

    /// The receiver's END echo: it holds every byte up to `final`. Refused unless the stream
    /// ended exactly there and those bytes were handed out (or acknowledged already).
    mutating func endEchoed(_ offset: UInt64) throws(StreamProtocolError) {
        guard let final = finalOffset, offset == final, ring.acknowledged == final || offset <= sentHighWater else {
            throw .malformed("END echo at \(offset) for a stream not ended there")
        }
        if ring.acknowledged < final { ring.acknowledge(upTo: final) }
        endEchoReceived = true
    }
}

/// Stream offsets that were lost (a relay's crash), as merged ranges: what a stream reports so
/// nothing is lost silently. Keeps the first ranges in full and the total of all.
public struct GapRecord: Sendable, Equatable {
    /// At most this many ranges are kept (a stream with more is broken far beyond a report).
    public static let keptRanges = 16
    public private(set) var ranges: [Range<UInt64>] = []
    public private(set) var bytes: UInt64 = 0

    public init() {}

    /// Records `range` (empty or already recorded parts add nothing).
    public mutating func add(_ range: Range<UInt64>) {
        guard !range.isEmpty else { return }
        var merged = range
        var kept: [Range<UInt64>] = []
        var covered: UInt64 = 0
        // Lengths as offsets' differences: `Range.count` is an Int, and traps on a range longer
        // than Int.max — which one GAP frame from a sender names.
        for existing in ranges {
            if existing.overlaps(merged) || existing.upperBound == merged.lowerBound || merged.upperBound == existing.lowerBound {
                let clamped = existing.clamped(to: range)
                covered += clamped.upperBound - clamped.lowerBound
                merged = min(existing.lowerBound, merged.lowerBound)..<max(existing.upperBound, merged.upperBound)
            } else {
                kept.append(existing)
            }
        }
        bytes += (range.upperBound - range.lowerBound) - covered
        kept.append(merged)
        kept.sort { $0.lowerBound < $1.lowerBound }
        ranges = Array(kept.prefix(Self.keptRanges))
    }

    /// "bytes 10-20, 30-31" (half-open offsets, as the protocol counts them).
    public var summary: String {
        ranges.map { "\($0.lowerBound)..<\($0.upperBound)" }.joined(separator: ", ")
    }
}
