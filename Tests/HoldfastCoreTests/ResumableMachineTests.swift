import HoldfastProtocol
import Testing

@testable import HoldfastCore

// The resumable protocol's two halves alone: no connection, no task, no lock. Each test drives a
// machine the way the engine does (frames asked for, writes and reads reported back) and checks
// what it decides.

/// A sender whose producer gave `count` bytes of a known pattern (byte i is `i % 251`).
private func sender(holding count: Int, capacity: Int = 16 * 1024) -> ResumableSender {
    var sender = ResumableSender(ring: ReplayRing(capacity: capacity, pool: BufferPool(bufferSize: 1024, retained: 0)))
    give(&sender, count)
    return sender
}

private func give(_ sender: inout ResumableSender, _ count: Int) {
    var start = Int(sender.offset)
    var left = count
    while left > 0 {
        let regions = sender.reserve(upTo: left)
        precondition(!regions.isEmpty, "the test's ring is full")
        var filled = 0
        for region in regions {
            for index in 0..<region.count { region[index] = UInt8((start + index) % 251) }
            start += region.count
            filled += region.count
        }
        sender.commit(filled, offered: filled)
        left -= filled
    }
}

/// What a data frame carries, or nil for another frame.
private func data(_ frame: ResumableSender.Frame) -> (offset: UInt64, bytes: [UInt8])? {
    guard case .data(let regions, let offset, let count) = frame else { return nil }
    let bytes = regions.flatMap { Array($0) }
    #expect(bytes.count == count)
    return (offset, bytes)
}

private func pattern(_ range: Range<Int>) -> [UInt8] {
    range.map { UInt8($0 % 251) }
}

/// Asks for the next frame on `generation` and reports it written whole; returns what it was.
@discardableResult
private func writeNext(_ sender: inout ResumableSender, generation: UInt64, peerReceived: UInt64? = nil, limit: Int = 1 << 20)
    -> ResumableSender.Frame
{
    let frame = sender.nextFrame(generation: generation, peerReceived: peerReceived, limit: limit)
    switch frame {
    case .data(_, let offset, let count):
        sender.wroteData(from: offset, written: count, generation: generation, connectionFailed: false)
    case .end:
        sender.wroteEnd(generation: generation)
    case .gap(let to):
        sender.wroteGap(to: to, generation: generation)
    case .idle:
        break
    }
    return frame
}

@Suite("ResumableSender")
struct ResumableSenderTests {
    @Test func aNewConnectionReplaysFromWhatThePeerSaysItHolds() throws {
        var sender = sender(holding: 3000)
        let first = try #require(data(writeNext(&sender, generation: 1, peerReceived: 0)))
        #expect(first.offset == 0 && first.bytes == pattern(0..<3000))
        #expect(try sender.acknowledge(1000, generation: 1))
        #expect(sender.replayedBytes == 0)

        // The connection dies; the peer's next hello says it holds 2000 bytes.
        #expect(try sender.acceptHello(peerReceived: 2000))
        #expect(sender.acknowledged == 2000, "what the peer holds counts as acknowledged")
        let replay = try #require(data(writeNext(&sender, generation: 2, peerReceived: 2000)))
        #expect(replay.offset == 2000 && replay.bytes == pattern(2000..<3000), "exactly the bytes the peer lacks")
        #expect(sender.replayedBytes == 1000)
        guard case .idle = sender.nextFrame(generation: 2, peerReceived: 2000, limit: 1 << 20) else {
            Issue.record("nothing more is due")
            return
        }
    }

    @Test func withoutTheSessionsHelloItReplaysFromTheOldestUnacknowledgedByte() throws {
        var sender = sender(holding: 3000)
        writeNext(&sender, generation: 1)
        #expect(try sender.acknowledge(1200, generation: 1))
        let replay = try #require(data(writeNext(&sender, generation: 2, peerReceived: nil)))
        #expect(replay.offset == 1200 && replay.bytes == pattern(1200..<3000), "the receiver drops what it already has")
    }

    @Test func aConnectionBehindWhatANewerHelloAcknowledgedSkipsTheBytesThatArrived() throws {
        var sender = sender(holding: 3000)
        writeNext(&sender, generation: 1, limit: 1000)
        // 1000..<3000 are being written when the peer's next hello (a new connection, not yet
        // the pump's) reports 2500 bytes; then the write fails.
        let inFlight = try #require(data(sender.nextFrame(generation: 1, peerReceived: 0, limit: 1 << 20)))
        #expect(inFlight.offset == 1000)
        #expect(try sender.acceptHello(peerReceived: 2500))
        sender.wroteData(from: 1000, written: 0, generation: 1, connectionFailed: true)
        #expect(sender.connection.position == 1000)
        let next = try #require(data(writeNext(&sender, generation: 1)))
        #expect(next.offset == 2500 && next.bytes == pattern(2500..<3000), "the ring no longer holds what arrived")
    }

    @Test func writesAreCutAtTheLimitAndGoOnWhereTheyStopped() throws {
        var sender = sender(holding: 2500)
        let first = try #require(data(writeNext(&sender, generation: 1, limit: 1000)))
        let second = try #require(data(writeNext(&sender, generation: 1, limit: 1000)))
        let third = try #require(data(writeNext(&sender, generation: 1, limit: 1000)))
        #expect(first.offset == 0 && second.offset == 1000 && third.offset == 2000)
        #expect(first.bytes + second.bytes + third.bytes == pattern(0..<2500))
    }

    @Test func aFailedWriteMovesNothingOnItsConnectionButCountsWhatWentOut() throws {
        var sender = sender(holding: 3000)
        let frame = sender.nextFrame(generation: 1, peerReceived: 0, limit: 1 << 20)
        #expect(data(frame)?.offset == 0)
        sender.wroteData(from: 0, written: 1800, generation: 1, connectionFailed: true)
        #expect(sender.connection.position == 0)
        #expect(sender.everSent == 1800)
        // The next connection's peer had 1000 of them: 800 go out again.
        #expect(try sender.acceptHello(peerReceived: 1000))
        let replay = try #require(data(writeNext(&sender, generation: 2, peerReceived: 1000)))
        #expect(replay.offset == 1000 && replay.bytes == pattern(1000..<3000))
        #expect(sender.replayedBytes == 800)
    }

    @Test func anAckFromAStaleConnectionIsIgnored() throws {
        var sender = sender(holding: 3000)
        writeNext(&sender, generation: 1)
        // Connection 2 begins (a replay from 0); an ACK still arriving on connection 1 is ignored.
        _ = sender.nextFrame(generation: 2, peerReceived: 0, limit: 100)
        sender.wroteData(from: 0, written: 100, generation: 2, connectionFailed: false)
        #expect(try sender.acknowledge(3000, generation: 1) == false)
        #expect(sender.acknowledged == 0)
        // So is one on a connection the pump has not started writing on yet.
        #expect(try sender.acknowledge(100, generation: 3) == false)
        #expect(sender.acknowledged == 0)
        #expect(try sender.acknowledge(100, generation: 2))
        #expect(sender.acknowledged == 100)
    }

    @Test func anAckBeyondWhatWasSentIsRefused() throws {
        var sender = sender(holding: 3000)
        writeNext(&sender, generation: 1, limit: 2000)
        #expect(throws: StreamProtocolError.offsetFromTheFuture(reported: 2001, limit: 2000)) {
            try sender.acknowledge(2001, generation: 1)
        }
        #expect(sender.acknowledged == 0, "the ring holds 3000 bytes, but only 2000 were sent")
        #expect(try sender.acknowledge(2000, generation: 1))
        #expect(try sender.acknowledge(1500, generation: 1) == false, "an old ACK acknowledges nothing")
        #expect(sender.acknowledged == 2000)
    }

    @Test func helloOffsetsFromTheFutureOrAlreadyDiscardedAreRefusedAndChangeNothing() throws {
        var sender = sender(holding: 3000)
        writeNext(&sender, generation: 1, limit: 2000)
        #expect(try sender.acknowledge(1500, generation: 1))
        let before = (sender.acknowledged, sender.connection, sender.sentHighWater, sender.everHandedOut, sender.ring.count)

        #expect(throws: StreamProtocolError.offsetFromTheFuture(reported: 2500, limit: 2000)) {
            try sender.acceptHello(peerReceived: 2500)  // the ring holds it, but it was never handed out
        }
        #expect(throws: StreamProtocolError.offsetAlreadyDiscarded(reported: 1000, oldest: 1500)) {
            try sender.acceptHello(peerReceived: 1000)
        }
        let after = (sender.acknowledged, sender.connection, sender.sentHighWater, sender.everHandedOut, sender.ring.count)
        #expect(before == after)
        #expect(try sender.acceptHello(peerReceived: 1500) == false, "the oldest byte kept is a valid report")
        #expect(try sender.acceptHello(peerReceived: 2000))
    }

    @Test func endFollowsTheLastByteOncePerConnectionAndItsEchoCompletesTheStream() throws {
        var sender = sender(holding: 1000)
        sender.end()
        give(&sender, 0)
        sender.end()
        #expect(sender.finalOffset == 1000, "end is idempotent")
        #expect(data(writeNext(&sender, generation: 1))?.offset == 0)
        guard case .end(let final) = writeNext(&sender, generation: 1) else {
            Issue.record("END after the last byte")
            return
        }
        #expect(final == 1000)
        guard case .idle = sender.nextFrame(generation: 1, peerReceived: 0, limit: 1 << 20) else {
            Issue.record("END goes out once per connection")
            return
        }
        // A new connection whose peer has everything: END again, alone.
        #expect(try sender.acceptHello(peerReceived: 1000))
        guard case .end = writeNext(&sender, generation: 2, peerReceived: 1000) else {
            Issue.record("END again on the next connection")
            return
        }
        #expect(sender.isDrained && !sender.isComplete)
        #expect(throws: StreamProtocolError.self) { try sender.endEchoed(999) }
        #expect(!sender.endEchoReceived)
        try sender.endEchoed(1000)
        #expect(sender.isComplete && sender.undelivered == 0)
    }

    @Test func anEndEchoAcknowledgesEverythingHandedOut() throws {
        var sender = sender(holding: 1000)
        sender.end()
        writeNext(&sender, generation: 1)
        #expect(sender.undelivered == 1000)
        try sender.endEchoed(1000)
        #expect(sender.acknowledged == 1000 && sender.isComplete)
    }

    @Test func anEndEchoForBytesNeverHandedOutIsRefused() throws {
        var sender = sender(holding: 1000)
        sender.end()
        writeNext(&sender, generation: 1, limit: 400)
        #expect(throws: StreamProtocolError.self) { try sender.endEchoed(1000) }
        #expect(sender.acknowledged == 0 && !sender.endEchoReceived)
    }

    @Test func theProducersReadGrowsWhileItFillsAndShrinksToWhatItGot() {
        var sender = sender(holding: 0, capacity: 4 << 20)
        #expect(sender.readAhead == ResumableSender.minimumReadAhead)
        var regions = sender.reserve(upTo: sender.readAhead)
        sender.commit(sender.readAhead, offered: regions.reduce(0) { $0 + $1.count })
        #expect(sender.readAhead == 2 * ResumableSender.minimumReadAhead)
        regions = sender.reserve(upTo: sender.readAhead)
        sender.commit(1000, offered: regions.reduce(0) { $0 + $1.count })
        #expect(sender.readAhead == ResumableSender.minimumReadAhead, "never below the minimum")
        #expect(sender.offset == UInt64(ResumableSender.minimumReadAhead + 1000))
    }
}

// MARK: -

private func header(_ type: StreamFrameType, _ value: UInt64, length: Int = 0) -> StreamFramePrefix {
    StreamFramePrefix(type: type, bodyLength: length, value: value)
}

/// A receiver on connection 1 that has just taken the header of a DATA frame of `length` bytes
/// at offset 0 (its body not read yet).
private func receiverInsideData(length: Int) throws -> ResumableReceiver {
    var receiver = ResumableReceiver(ackEvery: 1 << 20)
    _ = receiver.reading(on: 1)
    receiver.readHeader(StreamFramePrefix.size)
    _ = try receiver.take(header(.data, 0, length: length))
    return receiver
}

/// Reads a whole DATA frame on `generation` (its header, then its body in one piece) and returns
/// what the body's read delivered.
@discardableResult
private func receive(_ receiver: inout ResumableReceiver, at offset: UInt64, _ length: Int, generation: UInt64 = 1) throws
    -> ResumableReceiver.Delivery
{
    _ = receiver.reading(on: generation)
    receiver.readHeader(StreamFramePrefix.size)
    guard case .body(length, _) = try receiver.take(header(.data, offset, length: length)) else {
        Issue.record("a body of \(length) bytes")
        return ResumableReceiver.Delivery(skipped: 0, delivered: 0, armAckTimer: false, wakePump: false)
    }
    return receiver.readBody(length, headerBytes: 0)
}

@Suite("ResumableReceiver")
struct ResumableReceiverTests {
    @Test func aReplaysOverlapIsSkipped() throws {
        var receiver = ResumableReceiver(ackEvery: 1 << 20)
        try receive(&receiver, at: 0, 1000)
        #expect(receiver.received == 1000)
        // The next connection's sender replays from 600 (it never saw our ACK of 1000).
        #expect(receiver.reading(on: 2) == ResumableReceiver.Cursor(generation: 2))
        receiver.readHeader(StreamFramePrefix.size)
        #expect(try receiver.take(header(.data, 600, length: 1000)) == .body(length: 1000, skip: 400))
        let first = receiver.readBody(300, headerBytes: 0)
        #expect(first.skipped == 300 && first.delivered == 0)
        let second = receiver.readBody(700, headerBytes: 0)
        #expect(second.skipped == 100 && second.delivered == 600)
        #expect(receiver.received == 1600)
        // A frame entirely overlapped delivers nothing.
        receiver.readHeader(StreamFramePrefix.size)
        #expect(try receiver.take(header(.data, 0, length: 500)) == .body(length: 500, skip: 500))
        #expect(receiver.readBody(500, headerBytes: 0).delivered == 0)
        #expect(receiver.received == 1600)
    }

    @Test func aDataGapIsRefused() throws {
        var receiver = ResumableReceiver(ackEvery: 1 << 20)
        try receive(&receiver, at: 0, 1000)
        receiver.readHeader(StreamFramePrefix.size)
        #expect(throws: StreamProtocolError.dataGap(expected: 1000, got: 1001)) {
            try receiver.take(header(.data, 1001, length: 10))
        }
        #expect(receiver.received == 1000 && receiver.cursor.remaining == 0)
    }

    @Test func dataAfterTheEndIsRefused() throws {
        var receiver = ResumableReceiver(ackEvery: 1 << 20)
        try receive(&receiver, at: 0, 1000)
        receiver.readHeader(StreamFramePrefix.size)
        #expect(try receiver.take(header(.end, 1000)) == .ended)
        receiver.readHeader(StreamFramePrefix.size)
        #expect(throws: StreamProtocolError.self) { try receiver.take(header(.data, 1000, length: 1)) }
        #expect(throws: StreamProtocolError.self) { try receiver.take(header(.data, 999, length: 2)) }
        // A replay that stays within the end is only an overlap.
        #expect(try receiver.take(header(.data, 500, length: 500)) == .body(length: 500, skip: 500))
        #expect(receiver.received == 1000 && receiver.isFinished)
    }

    @Test func endIsTakenOnlyAtTheReceivedOffset() throws {
        var receiver = ResumableReceiver(ackEvery: 1 << 20)
        try receive(&receiver, at: 0, 1000)
        for wrong: UInt64 in [0, 999, 1001] {
            receiver.readHeader(StreamFramePrefix.size)
            #expect(throws: StreamProtocolError.self) { try receiver.take(header(.end, wrong)) }
            #expect(receiver.inboundFinal == nil && !receiver.isFinished)
        }
        receiver.readHeader(StreamFramePrefix.size)
        #expect(try receiver.take(header(.end, 1000)) == .ended)
        #expect(receiver.inboundFinal == 1000 && receiver.isFinished)
    }

    /// A GAP is a sender's word, and may name any offset: one past 2^63 was counted as a
    /// `Range.count` (an Int) and trapped — the host agent, every VM's streams with it, ended by
    /// one frame from anyone holding a stream's secret. Then DATA past the last offset wrapped
    /// (or trapped) the received offset. Neither traps now; the DATA is refused.
    @Test func aGapToTheFarthestOffsetsIsCountedAndDataPastTheLastIsRefused() throws {
        var receiver = ResumableReceiver(ackEvery: 1 << 20)
        try receive(&receiver, at: 0, 1000)
        let far: UInt64 = (1 << 63) + 1
        receiver.readHeader(StreamFramePrefix.size)
        #expect(try receiver.take(header(.gap, far)) == .skipped)
        #expect(receiver.received == far)
        #expect(receiver.lost.bytes == far - 1000)
        receiver.readHeader(StreamFramePrefix.size)
        #expect(try receiver.take(header(.gap, .max)) == .skipped)
        #expect(receiver.lost.bytes == UInt64.max - 1000, "both gaps, merged")
        #expect(receiver.lost.ranges == [1000..<UInt64.max])
        receiver.readHeader(StreamFramePrefix.size)
        #expect(throws: StreamProtocolError.self) { try receiver.take(header(.data, .max, length: 1)) }
        #expect(receiver.continueWith(header(.data, .max, length: 1)) == nil)
        #expect(receiver.received == .max)
        receiver.readHeader(StreamFramePrefix.size)
        #expect(try receiver.take(header(.end, .max)) == .ended)
        var record = GapRecord()
        record.add(0..<UInt64.max)
        record.add(5..<UInt64.max)
        #expect(record.bytes == .max && record.ranges == [0..<UInt64.max])
    }

    @Test func controlFramesASenderMaySendAndOnesItMayNot() throws {
        var receiver = ResumableReceiver(ackEvery: 1 << 20)
        #expect(try receiver.take(header(.ack, 0)) == .nothing)
        #expect(throws: StreamProtocolError.offsetFromTheFuture(reported: 5, limit: 0)) { try receiver.take(header(.ack, 5)) }
        #expect(throws: StreamProtocolError.unexpectedFrame(expected: .data, got: .hello)) {
            try receiver.take(header(.hello, 0, length: 40))
        }
        #expect(try receiver.take(header(.error, 1, length: 12)) == .refusal)
        #expect(receiver.received == 0 && receiver.inboundFinal == nil)
    }

    @Test func aHelloSayingItHoldsOurDataIsRefused() throws {
        let receiver = ResumableReceiver(ackEvery: 1024)
        try receiver.acceptHello(peerReceived: 0)
        #expect(throws: StreamProtocolError.offsetFromTheFuture(reported: 1, limit: 0)) {
            try receiver.acceptHello(peerReceived: 1)
        }
    }

    @Test func acknowledgesEveryNBytesOrWhenDue() throws {
        var receiver = ResumableReceiver(ackEvery: 1000)
        #expect(receiver.nextFrame(generation: 1, ourHelloReceived: 0) == .idle)
        let first = try receive(&receiver, at: 0, 999)
        #expect(first.armAckTimer && !first.wakePump, "the first unacknowledged bytes start the ack timer")
        #expect(receiver.nextFrame(generation: 1, ourHelloReceived: 0) == .idle, "999 bytes: not yet")
        let second = try receive(&receiver, at: 999, 1)
        #expect(!second.armAckTimer && second.wakePump, "the timer runs already; ackEvery bytes wake the pump")
        #expect(receiver.nextFrame(generation: 1, ourHelloReceived: 0) == .ack(1000))
        receiver.wroteAck(1000, generation: 1)
        #expect(receiver.nextFrame(generation: 1, ourHelloReceived: 0) == .idle)

        try receive(&receiver, at: 1000, 10)
        #expect(receiver.nextFrame(generation: 1, ourHelloReceived: 0) == .idle, "10 bytes: not due")
        receiver.ackTimerFired()
        #expect(receiver.nextFrame(generation: 1, ourHelloReceived: 0) == .ack(1010), "the timer made it due")
        receiver.wroteAck(1010, generation: 1)
        #expect(try receive(&receiver, at: 1010, 10).armAckTimer, "the timer is armed again after it fired")
    }

    @Test func aNewConnectionCountsOurHelloAsAnAcknowledgement() throws {
        var receiver = ResumableReceiver(ackEvery: 100)
        try receive(&receiver, at: 0, 500)
        #expect(receiver.nextFrame(generation: 2, ourHelloReceived: 500) == .idle, "our hello told the sender")
        #expect(receiver.nextFrame(generation: 3, ourHelloReceived: nil) == .ack(500), "unknown: acknowledge again")
    }

    @Test func theEndIsEchoedOncePerConnection() throws {
        var receiver = ResumableReceiver(ackEvery: 1 << 20)
        try receive(&receiver, at: 0, 100)
        receiver.readHeader(StreamFramePrefix.size)
        #expect(try receiver.take(header(.end, 100)) == .ended)
        #expect(receiver.nextFrame(generation: 1, ourHelloReceived: 0) == .ack(100), "everything is acknowledged at the end")
        receiver.wroteAck(100, generation: 1)
        #expect(receiver.nextFrame(generation: 1, ourHelloReceived: 0) == .endEcho(final: 100))
        #expect(!receiver.endEchoSent && !receiver.echoedEnd(on: 1))
        receiver.wroteEndEcho(generation: 1)
        #expect(receiver.endEchoSent && receiver.echoedEnd(on: 1))
        #expect(receiver.nextFrame(generation: 1, ourHelloReceived: 0) == .idle)
        // The echo may have been lost with its connection: the next one echoes again.
        #expect(receiver.nextFrame(generation: 2, ourHelloReceived: 100) == .endEcho(final: 100))
        #expect(!receiver.echoedEnd(on: 2))
        receiver.wroteEndEcho(generation: 2)
        #expect(receiver.nextFrame(generation: 2, ourHelloReceived: 100) == .idle)
    }

    @Test func aHeaderReadWithABodyGoesOnOnlyIntoTheDataThatFollows() throws {
        var receiver = try receiverInsideData(length: 100)
        // The body's read took 10 bytes of the next header: not whole yet.
        _ = receiver.readBody(100, headerBytes: 10)
        #expect(!receiver.hasWholeHeader && receiver.hasBufferedFrame(on: 1) == false)
        receiver.readHeader(StreamFramePrefix.size - 10)
        #expect(receiver.hasWholeHeader && receiver.hasBufferedFrame(on: 1))
        #expect(receiver.continueWith(header(.end, 100)) == nil, "END is left for take")
        #expect(receiver.continueWith(header(.data, 90, length: 50)) == nil, "an overlap is left for take")
        #expect(receiver.continueWith(header(.data, 100, length: 50)) == 50)
        #expect(receiver.cursor == ResumableReceiver.Cursor(generation: 1, remaining: 50, skip: 0, headerFilled: 0))
        #expect(receiver.continueWith(header(.data, 100, length: 50)) == nil, "only after the body")
    }

    @Test func aNewConnectionStartsAtAFrameBoundary() throws {
        var receiver = try receiverInsideData(length: 1000)
        _ = receiver.readBody(400, headerBytes: 0)
        #expect(receiver.hasBufferedFrame(on: 1))
        #expect(!receiver.hasBufferedFrame(on: 2))
        #expect(receiver.reading(on: 2) == ResumableReceiver.Cursor(generation: 2), "the rest of the body died with connection 1")
        #expect(receiver.received == 400)
    }
}
