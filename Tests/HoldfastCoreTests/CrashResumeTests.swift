import HoldfastProtocol
import HoldfastTestSupport
import NIOConcurrencyHelpers
import Testing

@testable import HoldfastCore

// A relay that crashed and the one that takes over (issue 16): the checkpoint it leaves, the
// hello flag and GAP frame the protocol uses to say which bytes the crash took, and a stream
// that resumes with every other byte exactly once.

/// Memory standing in for the broker's shared mappings, which live as long as the process: a
/// stream's tasks end after its test returns and may still write a checkpoint or give a ring
/// block back (its table entry), so this memory is never freed — freeing it corrupted the heap
/// once in a full run ("corrupted double-linked list"). A few hundred KiB per test process.
private func sharedMemoryForTests(_ count: Int) -> UnsafeMutableRawPointer {
    let memory = UnsafeMutableRawPointer.allocate(byteCount: count, alignment: 4096)
    memory.initializeMemory(as: UInt8.self, repeating: 0, count: count)
    return memory
}

/// A slot's worth of 8-byte aligned memory standing in for a slot of the shared checkpoint
/// memfd (never freed: `sharedMemoryForTests`).
private final class SlotMemory: @unchecked Sendable {
    let bytes = UnsafeMutableRawBufferPointer(start: sharedMemoryForTests(StreamCheckpoint.slotSize), count: StreamCheckpoint.slotSize)
    var checkpoint: StreamCheckpoint { StreamCheckpoint(slot: bytes.baseAddress!) }
}

private func filled(_ sender: inout ResumableSender, _ count: Int) {
    var left = count
    while left > 0 {
        let regions = sender.reserve(upTo: left)
        let offered = regions.reduce(0) { $0 + $1.count }
        for region in regions { region.initializeMemory(as: UInt8.self, repeating: 7) }
        sender.commit(offered, offered: offered)
        left -= offered
    }
}

@Suite("Checkpoints")
struct StreamCheckpointTests {
    @Test func aSlotNeverStartedOrClearedRecoversNothing() {
        let memory = SlotMemory()
        #expect(memory.checkpoint.recovered == nil)
        memory.checkpoint.start(at: 0, resumed: false)
        #expect(memory.checkpoint.recovered != nil)
        memory.checkpoint.clear()
        #expect(memory.checkpoint.recovered == nil)
    }

    @Test func aSettledTakeIsExactAndAnInterruptedOneIsBounded() throws {
        let memory = SlotMemory()
        let checkpoint = memory.checkpoint
        checkpoint.start(at: 0, resumed: false)
        checkpoint.beginTake(at: 0, upTo: 65536)
        checkpoint.took(upTo: 1000)
        checkpoint.acknowledged(400)
        var recovered = try #require(checkpoint.recovered)
        #expect(recovered.taken == 1000 && recovered.uncertain == 0 && recovered.acknowledged == 400)
        #expect(recovered.outputResumesAt == 1000 && recovered.inputResumesAt == 1000)

        // Killed inside the next read: up to 4096 bytes may have left the pipe.
        checkpoint.beginTake(at: 1000, upTo: 4096)
        recovered = try #require(checkpoint.recovered)
        #expect(recovered.taken == 1000 && recovered.uncertain == 4096)
        #expect(recovered.outputResumesAt == 5096, "an output resumes after every byte that may have left the pipe")
        #expect(recovered.inputResumesAt == 1000, "an input resumes at the first byte not known to be in the pipe")
    }

    @Test func lossIsCarriedAcrossIncarnationsAndCountedOnce() throws {
        let memory = SlotMemory()
        memory.checkpoint.start(at: 0, resumed: false)
        memory.checkpoint.lost(total: 27, to: 207)
        memory.checkpoint.start(at: 207, resumed: true)
        let recovered = try #require(memory.checkpoint.recovered)
        #expect(recovered.lost == 27 && recovered.lostTo == 207)
        memory.checkpoint.start(at: 0, resumed: false)
        #expect(try #require(memory.checkpoint.recovered).lost == 0, "a new stream in the slot starts clean")
    }

    @Test func possibleRepeatsAreCarriedAcrossIncarnationsAndAdded() throws {
        let memory = SlotMemory()
        memory.checkpoint.start(at: 0, resumed: false)
        var successor = memory.checkpoint
        successor.takenOver = .init(repeated: 100)
        successor.start(at: 500, resumed: true)
        var next = memory.checkpoint
        next.takenOver = .init(repeated: 40)
        next.start(at: 900, resumed: true)
        #expect(memory.checkpoint.repeated == 140)
        #expect(try #require(memory.checkpoint.recovered).repeated == 140)
        next.start(at: 0, resumed: false)
        #expect(memory.checkpoint.repeated == 0, "a new stream in the slot starts clean (what was taken over counts only for a resume)")
    }

    /// A successor killed right after its stream started (before anything else it writes)
    /// leaves what its predecessor's interrupted take left unknown in the slot: an output's
    /// hole, an input's possible repeat. Before, `start` stored the new state (nothing pending)
    /// first and the hole after: killed in between, the next one found neither, and sent the
    /// unknown bytes as data.
    @Test func whatAnInterruptedTakeLeftUnknownSurvivesTheSuccessorsOwnCrash() throws {
        let memory = SlotMemory()
        memory.checkpoint.start(at: 0, resumed: false)
        memory.checkpoint.took(upTo: 1000)
        memory.checkpoint.beginTake(at: 1000, upTo: 4096)  // killed inside this read
        let found = try #require(memory.checkpoint.recovered)
        #expect(found.uncertain == 4096)
        var successor = memory.checkpoint
        successor.takenOver = .init(hole: 1000..<5096)
        successor.start(at: found.outputResumesAt, resumed: true)
        // Killed now: the next one still knows the hole.
        let next = try #require(memory.checkpoint.recovered)
        #expect(next.uncertain == 0 && next.taken == 5096)
        #expect(next.hole == 1000..<5096, "the unknown bytes are never sent as data")
        let ring = RestoredRing(blocks: [], start: 0, end: 5096)
        #expect(next.outputHole(in: ring) == 1000..<5096)
        // An input the same way: the possible repeat is counted once the stream started.
        let input = SlotMemory()
        input.checkpoint.start(at: 0, resumed: false)
        input.checkpoint.beginTake(at: 200, upTo: 64)
        var taker = input.checkpoint
        taker.takenOver = .init(repeated: 64)
        taker.start(at: try #require(input.checkpoint.recovered).inputResumesAt, resumed: true)
        #expect(try #require(input.checkpoint.recovered).repeated == 64)
    }

    @Test func aResumeCountsTheRestartAndStartsWhereItWasTold() throws {
        let memory = SlotMemory()
        memory.checkpoint.start(at: 0, resumed: false)
        memory.checkpoint.took(upTo: 300)
        memory.checkpoint.start(at: 300, resumed: true)
        memory.checkpoint.start(at: 300, resumed: true)
        let recovered = try #require(memory.checkpoint.recovered)
        #expect(recovered.restarts == 2 && recovered.start == 300 && recovered.taken == 300)
    }
}

extension StreamCheckpointTests {
    /// A take through a window records the window's level first: the level found after the
    /// crash says exactly how many bytes the interrupted syscall moved, in either direction.
    @Test func aTakeThroughAWindowIsSettledByTheLevelFoundAfterTheCrash() throws {
        let memory = SlotMemory()
        let checkpoint = memory.checkpoint
        checkpoint.start(at: 5000, resumed: false)
        // Output: the window held 30,000 bytes; the read out of it asked for 20,000.
        checkpoint.beginTake(at: 5000, upTo: 20_000, windowLevel: 30_000)
        let output = try #require(checkpoint.recovered)
        #expect(output.windowLevel == 30_000 && output.uncertain == 20_000 && output.taken == 5000)
        for (now, taken) in [(30_000, 5000), (22_000, 13_000), (10_000, 25_000)] {
            let settled = output.settled(direction: .send, windowLevelNow: now)
            #expect(settled.taken == UInt64(taken) && settled.uncertain == 0 && settled.outputResumesAt == UInt64(taken))
        }
        // A level the read could not have left (more than before, or more taken than asked)
        // settles nothing: the take stays uncertain and is reported.
        for now in [31_000, 9_999] {
            #expect(output.settled(direction: .send, windowLevelNow: now) == output)
        }
        // Input: the stage held 100 bytes; the write into it offered 4,000.
        checkpoint.took(upTo: 5000)
        checkpoint.beginTake(at: 5000, upTo: 4000, windowLevel: 100)
        let input = try #require(checkpoint.recovered)
        #expect(input.settled(direction: .receive, windowLevelNow: 100).inputResumesAt == 5000)
        #expect(input.settled(direction: .receive, windowLevelNow: 2600).inputResumesAt == 7500)
        #expect(input.settled(direction: .receive, windowLevelNow: 4100).inputResumesAt == 9000)
        #expect(input.settled(direction: .receive, windowLevelNow: 50) == input)
        // A take without a window has nothing to settle it.
        checkpoint.took(upTo: 5000)
        checkpoint.beginTake(at: 5000, upTo: 4000)
        let unwindowed = try #require(checkpoint.recovered)
        #expect(unwindowed.windowLevel == nil)
        #expect(unwindowed.settled(direction: .send, windowLevelNow: 0) == unwindowed)
        // A settled state records no window: the level is not read.
        checkpoint.took(upTo: 6000)
        #expect(try #require(checkpoint.recovered).windowLevel == nil)
    }
}

@Suite("Gaps")
struct GapProtocolTests {
    @Test func gapRecordsMergeAndCountEachOffsetOnce() {
        var record = GapRecord()
        record.add(10..<20)
        record.add(15..<30)
        record.add(30..<31)
        record.add(100..<100)
        record.add(50..<60)
        #expect(record.ranges == [10..<31, 50..<60])
        #expect(record.bytes == 31)
        record.add(10..<31)
        #expect(record.bytes == 31, "a range told again (its GAP frame lost with a connection) is not counted twice")
    }

    @Test func aRestartedSenderTellsThePeerItsGapThenSendsOn() throws {
        // The checkpoint said the crashed relay took 5,000 bytes; the host holds 3,000.
        let ring = ReplayRing(capacity: 16 * 1024, pool: BufferPool(bufferSize: 1024, retained: 0), start: 5000)
        var sender = ResumableSender(ring: ring, restarted: true)
        filled(&sender, 100)
        #expect(try sender.acceptHello(peerReceived: 3000) == false)
        #expect(sender.lost.ranges == [3000..<5000] && sender.lost.bytes == 2000)
        guard case .gap(let to) = sender.nextFrame(generation: 1, peerReceived: 3000, limit: 1 << 20) else {
            Issue.record("the GAP goes first")
            return
        }
        #expect(to == 5000)
        // Until it is written, it stays due.
        guard case .gap = sender.nextFrame(generation: 1, peerReceived: 3000, limit: 1 << 20) else {
            Issue.record("an unwritten GAP is still due")
            return
        }
        sender.wroteGap(to: 5000, generation: 1)
        guard case .data(_, let offset, let count) = sender.nextFrame(generation: 1, peerReceived: 3000, limit: 1 << 20) else {
            Issue.record("data follows the GAP")
            return
        }
        #expect(offset == 5000 && count == 100)
        // A peer claiming bytes the restarted relay never had is still refused.
        #expect(throws: StreamProtocolError.self) { try sender.acceptHello(peerReceived: 6000) }
    }

    @Test func aSenderRefusesAGapUnlessOneSideRestarted() throws {
        var sender = ResumableSender(ring: ReplayRing(capacity: 16 * 1024, pool: BufferPool(bufferSize: 1024, retained: 0)))
        filled(&sender, 3000)
        _ = sender.nextFrame(generation: 1, peerReceived: 0, limit: 1 << 20)
        sender.wroteData(from: 0, written: 3000, generation: 1, connectionFailed: false)
        #expect(try sender.acknowledge(2000, generation: 1))
        #expect(throws: StreamProtocolError.offsetAlreadyDiscarded(reported: 1000, oldest: 2000)) {
            try sender.acceptHello(peerReceived: 1000)
        }
        #expect(sender.lost.bytes == 0)
        // The host's stdin after the guest's broker crashed: the new relay holds less than the
        // old one acknowledged, and says it restarted.
        #expect(try sender.acceptHello(peerReceived: 1000, peerRestarted: true) == false)
        #expect(sender.lost.ranges == [1000..<2000])
        guard case .gap(let to) = sender.nextFrame(generation: 2, peerReceived: 1000, limit: 1 << 20) else {
            Issue.record("the GAP goes first")
            return
        }
        #expect(to == 2000)
    }

    @Test func aReceiverSkipsAGapRecordsItAndAcknowledgesPastIt() throws {
        var receiver = ResumableReceiver(ackEvery: 1 << 20)
        _ = try receiver.take(StreamFramePrefix(type: .data, bodyLength: 100, value: 0))
        _ = receiver.readBody(100, headerBytes: 0)
        #expect(try receiver.take(StreamFramePrefix(type: .gap, bodyLength: 0, value: 400)) == .skipped)
        #expect(receiver.received == 400 && receiver.lost.ranges == [100..<400])
        #expect(receiver.nextFrame(generation: 1, ourHelloReceived: 0) == .ack(400))
        // A repeat of it (its connection died before our ACK) changes nothing.
        #expect(try receiver.take(StreamFramePrefix(type: .gap, bodyLength: 0, value: 400)) == .nothing)
        #expect(receiver.lost.bytes == 300)
        // Data goes on at the GAP's offset.
        #expect(try receiver.take(StreamFramePrefix(type: .data, bodyLength: 10, value: 400)) == .body(length: 10, skip: 0))
    }

    @Test func aGapBeyondTheEndIsAProtocolError() throws {
        var receiver = ResumableReceiver(ackEvery: 1 << 20)
        #expect(try receiver.take(StreamFramePrefix(type: .end, bodyLength: 0, value: 0)) == .ended)
        #expect(throws: StreamProtocolError.self) { try receiver.take(StreamFramePrefix(type: .gap, bodyLength: 0, value: 10)) }
    }

    @Test func aReceiverThatAcknowledgesDeliveredBytesHoldsBackUntilTheyAre() throws {
        var receiver = ResumableReceiver(ackEvery: 100, start: 0, acknowledgeDelivered: true)
        _ = try receiver.take(StreamFramePrefix(type: .data, bodyLength: 1000, value: 0))
        _ = receiver.readBody(1000, headerBytes: 0)
        #expect(receiver.received == 1000)
        #expect(receiver.nextFrame(generation: 1, ourHelloReceived: 0) == .idle, "nothing reached the process yet")
        #expect(receiver.acknowledgeable == 0, "and a hello says so: the sender keeps every byte")
        receiver.delivered(600)
        #expect(receiver.nextFrame(generation: 1, ourHelloReceived: 0) == .ack(600))
        receiver.wroteAck(600, generation: 1)
        receiver.delivered(400)
        #expect(receiver.nextFrame(generation: 1, ourHelloReceived: 0) == .ack(1000))
    }

    @Test func helloCarriesTheRestartedFlagUnderItsProof() throws {
        let secret = StreamSecret.random()
        let hello = StreamAuthentication.sign(
            StreamHello(role: .guest, token: Array("t".utf8), receivedOffset: 5, nonce: StreamAuthentication.nonce(), restarted: true),
            secret: secret)
        let encoded = hello.encoded
        let prefix = try encoded.withUnsafeBytes { raw throws(StreamProtocolError) in try StreamFramePrefix.decode(raw) }
        let decoded = try StreamHello.decode(prefix: prefix, body: Array(encoded[16...]))
        #expect(decoded.restarted)
        #expect(StreamAuthentication.verify(decoded, secret: secret, challenge: nil))
        // The flag is covered by the proof: flipping it breaks the hello.
        var flipped = decoded
        flipped.restarted = false
        #expect(!StreamAuthentication.verify(flipped, secret: secret, challenge: nil))
        // Unknown flags are refused.
        var body = Array(encoded[16...])
        body[7] = 0x80
        #expect(throws: StreamProtocolError.self) { try StreamHello.decode(prefix: prefix, body: body) }
    }
}

@Suite("A relay's crash, in memory", .timeLimit(.minutes(5)))
struct CrashResumeStreamTests {
    /// stdout: the first relay is killed with bytes in its ring the host never got; its
    /// successor resumes at the checkpoint. The host gets every byte the source gave, in order,
    /// except exactly the range both sides report lost — and nothing twice.
    @Test func anOutputResumesAfterItsRelayDiesAndReportsExactlyWhatTheCrashTook() async throws {
        let memory = SlotMemory()
        let link = NIOLockedValueBox<MemoryPipe?>(nil)
        let pair = ResumablePair(guestDirection: .send, beforeAccept: { pipe in link.withLockedValue { $0 = pipe } }, checkpoint: memory.checkpoint)
        defer { pair.close() }
        pair.start()
        let source = MemorySource()
        let sent = (0..<300_000).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ $0 >> 11) }
        let receiver = Task { await pair.host.receiveAll() }
        func pull(_ count: Int, _ stream: ResumablePair.Stream) async throws {
            var moved = 0
            while moved < count {
                guard case .moved(let got) = try await stream.pull(from: source, pool: .shared) else { continue }
                moved += got
            }
        }
        // The first relay: 100,000 bytes reach the host...
        source.append(Array(sent[..<100_000]))
        try await pull(100_000, pair.guest)
        try await eventually("the host has the first 100,000 bytes") { pair.host.statistics.offset == 100_000 }
        // ...the next 100,000 are taken from the pipe into its ring but never reach the host,
        // and the relay is killed: its ring dies with it.
        link.withLockedValue { $0 }?.holdDelivery()
        source.append(Array(sent[100_000..<200_000]))
        try await pull(100_000, pair.guest)
        // (Killed first, then its link cut: a relay that lived on would redial and replay.)
        pair.guest.close()
        pair.cutCurrentLink()
        let recovered = try #require(memory.checkpoint.recovered)
        #expect(recovered.taken == 200_000 && recovered.uncertain == 0)

        let successor = pair.restartGuest(resumeAt: recovered.outputResumesAt, checkpoint: memory.checkpoint)
        defer { successor.close() }
        source.append(Array(sent[200_000...]))
        source.finish()
        while try await successor.pull(from: source, pool: .shared) != .endOfFile {}
        #expect(await successor.finish() == 0)
        let received = await receiver.value

        #expect(pair.host.statistics.lost.ranges == [100_000..<200_000], "the host was told exactly what the crash took")
        #expect(successor.statistics.lost.ranges == [100_000..<200_000], "and the relay that took over reports the same")
        #expect(received.count == 200_000)
        #expect(received.elementsEqual(sent[..<100_000] + sent[200_000...]), "every other byte once, in order")
        #expect(try #require(memory.checkpoint.recovered).restarts == 1)
        #expect(try #require(memory.checkpoint.recovered).lost == 100_000, "the checkpoint carries the loss to the next incarnation")

        // A third incarnation: its predecessor's loss is counted in its figures, once.
        let third = pair.restartGuest(resumeAt: try #require(memory.checkpoint.recovered).outputResumesAt, checkpoint: memory.checkpoint)
        defer { third.close() }
        #expect(third.statistics.lostBytesInAll == 100_000)
    }

    /// stdout with its ring in memory that outlives the relay (the broker's shared ring): the
    /// successor restores what the ring held and the host gets every byte, once — no gap.
    @Test func anOutputWhoseRingOutlivesItsRelayLosesNothing() async throws {
        let memory = SlotMemory()
        let blockSize = 4096
        let blockCount = SharedRingStorage.blockCount(capacity: 64 * 1024, blockSize: blockSize)
        let regionSize = SharedRingStorage.regionSize(blockSize: blockSize, blockCount: blockCount)
        let region = sharedMemoryForTests(regionSize)
        let released = NIOLockedValueBox(0)
        func storage() -> SharedRingStorage {
            SharedRingStorage(region: region, blockSize: blockSize, blockCount: blockCount) { _ in released.withLockedValue { $0 += 1 } }
        }
        let first = storage()
        first.start(restoringUpTo: nil)
        let link = NIOLockedValueBox<MemoryPipe?>(nil)
        let configuration = ResumableConfiguration(ringCapacity: 64 * 1024)
        let pair = ResumablePair(
            guestDirection: .send, configuration: configuration, beforeAccept: { pipe in link.withLockedValue { $0 = pipe } },
            checkpoint: memory.checkpoint, guestStorage: first)
        defer { pair.close() }
        pair.start()
        let source = MemorySource()
        let sent = (0..<150_000).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ $0 >> 9) }
        let receiver = Task { await pair.host.receiveAll() }
        func pull(_ count: Int, _ stream: ResumablePair.Stream) async throws {
            var moved = 0
            while moved < count {
                guard case .moved(let got) = try await stream.pull(from: source, pool: .shared) else { continue }
                moved += got
            }
        }
        source.append(Array(sent[..<40_000]))
        try await pull(40_000, pair.guest)
        try await eventually("the host acknowledged the first 40,000 bytes") { pair.guest.statistics.acknowledged == 40_000 }
        // 50,000 more go into the ring and never reach the host; the relay dies.
        link.withLockedValue { $0 }?.holdDelivery()
        source.append(Array(sent[40_000..<90_000]))
        try await pull(50_000, pair.guest)
        pair.guest.close()
        pair.cutCurrentLink()
        let recovered = try #require(memory.checkpoint.recovered)
        #expect(recovered.taken == 90_000 && recovered.uncertain == 0)

        // The successor's storage over the same memory reads back what the ring held.
        let successorStorage = storage()
        let restored = try #require(successorStorage.start(restoringUpTo: recovered.taken))
        #expect(restored.end == 90_000)
        #expect(restored.start <= 40_000, "the ring still holds every byte the host lacks")
        let successor = pair.restartGuest(
            resumeAt: recovered.outputResumesAt, restoring: restored, storage: successorStorage, checkpoint: memory.checkpoint)
        defer { successor.close() }
        source.append(Array(sent[90_000...]))
        source.finish()
        while try await successor.pull(from: source, pool: .shared) != .endOfFile {}
        #expect(await successor.finish() == 0)
        let received = await receiver.value
        #expect(pair.host.statistics.lost.bytes == 0 && successor.statistics.lost.bytes == 0, "nothing lost")
        #expect(received.count == sent.count)
        #expect(received.elementsEqual(sent), "every byte once, in order")
    }

    /// A SIGKILL inside the read from the pipe: the read took 7,000 bytes into the shared ring,
    /// but the checkpoint only says it was under way. The successor restores the ring, sends
    /// every byte before the read, and tells the host the read's offsets as a gap: the only
    /// bytes lost are the ones that read took.
    @Test func aCrashInsideAReadCostsOnlyWhatThatReadTook() async throws {
        let crash = try await ReadCrash()
        defer { crash.close() }
        let (pair, memory, crashed, source, sent) = (crash.pair, crash.memory, crash.crashed, crash.source, crash.sent)
        pair.guest.close()
        pair.cutCurrentLink()

        let recovered = try #require(crashed.checkpoint.recovered)
        #expect(recovered.taken == 90_000 && recovered.uncertain > 7000)
        memory.bytes.copyMemory(from: UnsafeRawBufferPointer(crashed.bytes))
        let successorStorage = crash.storage(crash.snapshot)
        let restored = try #require(successorStorage.start(restoringUpTo: recovered.outputResumesAt))
        #expect(restored.start <= 40_000 && restored.end == recovered.outputResumesAt)
        let hole = recovered.taken..<recovered.outputResumesAt
        let successor = pair.restartGuest(
            resumeAt: recovered.outputResumesAt, restoring: restored, hole: hole, storage: successorStorage, checkpoint: memory.checkpoint)
        defer { successor.close() }
        source.finish()
        while try await successor.pull(from: source, pool: .shared) != .endOfFile {}
        #expect(await successor.finish() == 0)
        let received = await crash.receiver.value
        #expect(pair.host.statistics.lost.ranges == [hole], "the host is told the read's offsets, nothing else")
        #expect(successor.statistics.lost.ranges == [hole])
        let expected = sent[..<90_000] + sent[97_000...]
        #expect(received.count == expected.count)
        #expect(received.elementsEqual(expected), "every byte but the 7,000 the interrupted read took, once, in order")
    }

    /// The same crash inside a read, from a source with a window (a pipe the supervisor holds):
    /// the checkpoint recorded the window's level before the read, so the successor learns
    /// from the level it finds that the read took 7,000 bytes — they are in the restored ring —
    /// and resumes after them. Nothing is lost and no gap is reported.
    @Test func aCrashInsideAReadFromAWindowLosesNothing() async throws {
        let crash = try await ReadCrash(windowed: true)
        defer { crash.close() }
        let (pair, memory, crashed, sent) = (crash.pair, crash.memory, crash.crashed, crash.sent)
        let window = try #require(crash.window)
        pair.guest.close()
        pair.cutCurrentLink()

        let interrupted = try #require(crashed.checkpoint.recovered)
        #expect(interrupted.taken == 90_000 && interrupted.uncertain > 7000 && interrupted.windowLevel != nil)
        let recovered = interrupted.settled(direction: .send, windowLevelNow: window.level)
        #expect(recovered.taken == 97_000 && recovered.uncertain == 0, "the level says the read took exactly 7,000")
        memory.bytes.copyMemory(from: UnsafeRawBufferPointer(crashed.bytes))
        let successorStorage = crash.storage(crash.snapshot)
        let restored = try #require(successorStorage.start(restoringUpTo: recovered.outputResumesAt))
        #expect(restored.end == 97_000 && recovered.outputHole(in: restored) == nil)
        let successor = pair.restartGuest(
            resumeAt: recovered.outputResumesAt, restoring: restored, hole: nil, storage: successorStorage, checkpoint: memory.checkpoint)
        defer { successor.close() }
        crash.source.finish()
        while try await successor.pull(from: window, pool: .shared) != .endOfFile {}
        #expect(await successor.finish() == 0)
        let received = await crash.receiver.value
        #expect(pair.host.statistics.lost.bytes == 0 && successor.statistics.lost.bytes == 0, "no gap")
        #expect(received.count == sent.count)
        #expect(received.elementsEqual(sent), "every byte once, in order, the 7,000 the read took among them")
    }

    /// The same crash inside a read, then its successor killed too before it could tell the
    /// host the gap (it never connected). Its checkpoint then says "everything up to the hole's
    /// end was taken", and the ring memory holds the hole's unknown bytes: the next successor
    /// must still send a GAP over them, never those bytes as data, and count them once.
    @Test func aSuccessorKilledBeforeItsGapWentOutLeavesTheHoleToTheNext() async throws {
        // While set, every connection is cut as soon as its hello arrives: the guest never connects.
        let refuse = NIOLockedValueBox(false)
        let crash = try await ReadCrash(refuse: refuse)
        defer { crash.close() }
        let (pair, memory, crashed, source, sent) = (crash.pair, crash.memory, crash.crashed, crash.source, crash.sent)
        let secondSnapshot = sharedMemoryForTests(crash.regionSize)
        refuse.withLockedValue { $0 = true }
        pair.guest.close()
        pair.cutCurrentLink()

        // The first successor starts with the hole, and dies before any connection.
        let recovered = try #require(crashed.checkpoint.recovered)
        memory.bytes.copyMemory(from: UnsafeRawBufferPointer(crashed.bytes))
        let secondStorage = crash.storage(crash.snapshot)
        let restored = try #require(secondStorage.start(restoringUpTo: recovered.outputResumesAt))
        let hole = try #require(recovered.outputHole(in: restored))
        let dialsBefore = pair.dialCount
        let second = pair.restartGuest(
            resumeAt: recovered.outputResumesAt, restoring: restored, hole: hole, storage: secondStorage, checkpoint: memory.checkpoint)
        try await eventually("the first successor tried and was refused") { pair.dialCount >= dialsBefore + 2 }
        // Killed: what its slot and ring memory hold at that instant is what the next finds.
        crashed.bytes.copyMemory(from: UnsafeRawBufferPointer(memory.bytes))
        secondSnapshot.copyMemory(from: crash.snapshot, byteCount: crash.regionSize)
        second.close()
        #expect(pair.host.statistics.lost.bytes == 0, "the host never heard of the gap")

        let again = try #require(crashed.checkpoint.recovered)
        #expect(again.uncertain == 0 && again.taken == hole.upperBound, "the slot says the hole's bytes were taken")
        #expect(again.hole == hole, "and that they are unknown")
        memory.bytes.copyMemory(from: UnsafeRawBufferPointer(crashed.bytes))
        let thirdStorage = crash.storage(secondSnapshot)
        let restoredAgain = try #require(thirdStorage.start(restoringUpTo: again.outputResumesAt))
        #expect(again.outputHole(in: restoredAgain) == hole)
        refuse.withLockedValue { $0 = false }
        let third = pair.restartGuest(
            resumeAt: again.outputResumesAt, restoring: restoredAgain, hole: again.outputHole(in: restoredAgain), storage: thirdStorage,
            checkpoint: memory.checkpoint)
        defer { third.close() }
        source.finish()
        while try await third.pull(from: source, pool: .shared) != .endOfFile {}
        #expect(await third.finish() == 0)
        let received = await crash.receiver.value
        #expect(pair.host.statistics.lost.ranges == [hole], "the host is told the hole's offsets, nothing else")
        #expect(third.statistics.lostBytesInAll == UInt64(hole.count), "counted once over three incarnations")
        let expected = sent[..<90_000] + sent[97_000...]
        #expect(received.count == expected.count)
        #expect(received.elementsEqual(expected), "no unknown byte sent as data: every byte but the 7,000 the read took, once, in order")
    }

    /// stdin: the guest relay acknowledges only bytes it delivered, so when it dies with bytes
    /// received but not delivered, the host still holds them and its successor gets them: no gap.
    @Test func anInputThatAcknowledgesDeliveredBytesLosesNothingWhenItsRelayDies() async throws {
        let memory = SlotMemory()
        let pair = ResumablePair(guestDirection: .receive, checkpoint: memory.checkpoint)
        defer { pair.close() }
        pair.start()
        let sent = (0..<100_000).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 1) }
        try await pair.host.sendBytes(Array(sent[..<60_000]))
        // The relay receives all 60,000 but delivers only 25,000 before it dies.
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 60_000, alignment: 1)
        defer { buffer.deallocate() }
        var received = 0
        while received < 60_000 {
            await pair.guest.waitReceivable()
            received += await pair.guest.receive(into: UnsafeMutableRawBufferPointer(rebasing: buffer[received...]))
        }
        pair.guest.willDeliver(25_000, stageLevel: nil)
        pair.guest.delivered(25_000)
        var delivered = Array(buffer[..<25_000])
        pair.guest.willDeliver(35_000, stageLevel: nil)  // killed inside this write: it may or may not have gone in
        pair.guest.close()
        pair.cutCurrentLink()
        let recovered = try #require(memory.checkpoint.recovered)
        #expect(recovered.taken == 25_000 && recovered.uncertain == 35_000)

        let successor = pair.restartGuest(resumeAt: recovered.inputResumesAt, checkpoint: memory.checkpoint)
        defer { successor.close() }
        try await pair.host.sendBytes(Array(sent[60_000...]))
        let finished = Task { await pair.host.finish() }
        // The successor's relay: receives, then delivers (and says so).
        while true {
            await successor.waitReceivable()
            let count = await successor.receive(into: buffer)
            if count == 0 { break }
            successor.willDeliver(count, stageLevel: nil)
            delivered += Array(buffer[..<count])
            successor.delivered(count)
        }
        #expect(await finished.value == 0)
        #expect(pair.host.statistics.lost.bytes == 0 && successor.statistics.lost.bytes == 0, "the host still held what was not delivered")
        #expect(delivered.count == sent.count)
        #expect(delivered.elementsEqual(sent), "every byte once, in order (the interrupted write is the one window, and it was not taken here)")
    }
}

/// A source whose next read takes `count` bytes and then "dies": `snapshot` runs after the bytes
/// were copied and before the read returns, where a SIGKILL inside readv would leave memory.
/// A relay whose ring is in shared memory sends 90,000 bytes (the host acknowledged the first
/// 40,000, then stopped hearing), then dies inside a read that took 7,000 more: `crashed` and
/// `snapshot` hold its slot and its ring memory as they were at that instant.
private final class ReadCrash: @unchecked Sendable {
    static let blockSize = 4096
    let blockCount = SharedRingStorage.blockCount(capacity: 128 * 1024, blockSize: ReadCrash.blockSize)
    let regionSize: Int
    let region: UnsafeMutableRawPointer
    let snapshot: UnsafeMutableRawPointer
    let memory = SlotMemory()
    let crashed = SlotMemory()
    let pair: ResumablePair
    let sent = (0..<150_000).map { UInt8(truncatingIfNeeded: $0 &* 17 &+ $0 >> 10) }
    let source: MemorySource
    /// `windowed`: the relay reads `source` through this window.
    let window: MemoryWindow?
    let receiver: Task<[UInt8], Never>

    /// - Parameters:
    ///   - refuse: while it says so, every connection is cut as its hello arrives.
    ///   - windowed: the relay reads through a window, and the crash is inside a read from it.
    init(refuse: NIOLockedValueBox<Bool> = NIOLockedValueBox(false), windowed: Bool = false) async throws {
        regionSize = SharedRingStorage.regionSize(blockSize: Self.blockSize, blockCount: blockCount)
        region = sharedMemoryForTests(regionSize)
        snapshot = sharedMemoryForTests(regionSize)
        let first = SharedRingStorage(region: region, blockSize: Self.blockSize, blockCount: blockCount) { _ in }
        first.start(restoringUpTo: nil)
        let link = NIOLockedValueBox<MemoryPipe?>(nil)
        pair = ResumablePair(
            guestDirection: .send, configuration: ResumableConfiguration(ringCapacity: 128 * 1024),
            beforeAccept: { pipe in
                link.withLockedValue { $0 = pipe }
                if refuse.withLockedValue({ $0 }) { pipe.cut() }
            }, checkpoint: memory.checkpoint, guestStorage: first)
        pair.start()
        source = MemorySource(Array(sent[..<40_000]))
        window = windowed ? MemoryWindow(source) : nil
        let reader: any ByteReader = window ?? source
        let host = pair.host
        receiver = Task { await host.receiveAll() }
        while pair.guest.statistics.offset < 40_000 { _ = try await pair.guest.pull(from: reader, pool: .shared) }
        try await eventually("the host acknowledged 40,000 bytes") { self.pair.guest.statistics.acknowledged == 40_000 }
        link.withLockedValue { $0 }?.holdDelivery()
        source.append(Array(sent[40_000..<90_000]))
        while pair.guest.statistics.offset < 90_000 { _ = try await pair.guest.pull(from: reader, pool: .shared) }
        // The next read takes 7,000 bytes and the relay dies inside it: what the memory holds
        // at that instant is what a successor finds.
        source.append(Array(sent[90_000...]))
        let crash = { [crashed, memory, snapshot, region, regionSize] in
            crashed.bytes.copyMemory(from: UnsafeRawBufferPointer(memory.bytes))
            snapshot.copyMemory(from: region, byteCount: regionSize)
        }
        if let window {
            window.killInsideNextRead(taking: 7000, snapshot: crash)
            _ = try await pair.guest.pull(from: window, pool: .shared)
        } else {
            _ = try await pair.guest.pull(from: KilledInsideRead(source, taking: 7000, snapshot: crash), pool: .shared)
        }
    }

    /// A ring storage over `memory` (a copy of the ring area at some instant).
    func storage(_ memory: UnsafeMutableRawPointer) -> SharedRingStorage {
        SharedRingStorage(region: memory, blockSize: Self.blockSize, blockCount: blockCount) { _ in }
    }

    func close() {
        pair.close()
    }
}

/// A source that reports a largest read, and records what each read asked for.
private final class SmallReadSource: ByteReader, @unchecked Sendable {
    let inner: MemorySource
    let asked = NIOLockedValueBox<[Int]>([])
    var largestRead: Int? { 1000 }
    init(_ inner: MemorySource) { self.inner = inner }
    func waitReadable() async throws { try await inner.waitReadable() }
    func read(into buffer: UnsafeMutableRawBufferPointer) async throws -> Int { try await inner.read(into: buffer) }
    func readNow(into buffer: UnsafeMutableRawBufferPointer) throws -> Int? {
        asked.withLockedValue { $0.append(buffer.count) }
        return inner.readNow(into: buffer)
    }
    func readNow(into buffers: [UnsafeMutableRawBufferPointer]) throws -> Int? {
        asked.withLockedValue { $0.append(buffers.reduce(0) { $0 + $1.count }) }
        return try inner.readNow(into: buffers)
    }
}

@Suite("A relay reads no more than its source says one read can give")
struct LargestReadTests {
    /// What a pull asks for is what a crash inside it reports as a gap: never more than the
    /// source's largest read (a terminal's: 4 KiB).
    @Test func aPullAsksForNoMoreThanTheSourcesLargestRead() async throws {
        let pair = ResumablePair(guestDirection: .send)
        defer { pair.close() }
        pair.start()
        let sent = (0..<50_000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        let source = SmallReadSource(MemorySource(sent))
        let receiver = Task { await pair.host.receiveAll() }
        source.inner.finish()
        while try await pair.guest.pull(from: source, pool: .shared) != .endOfFile {}
        #expect(await pair.guest.finish() == 0)
        #expect(await receiver.value == sent)
        let asked = source.asked.withLockedValue { $0 }
        #expect(!asked.isEmpty && asked.allSatisfy { $0 <= 1000 }, "asked \(asked.max() ?? 0) at most")
    }
}

private final class KilledInsideRead: ByteReader, @unchecked Sendable {
    let inner: MemorySource
    let count: Int
    let snapshot: () -> Void
    init(_ inner: MemorySource, taking count: Int, snapshot: @escaping () -> Void) {
        self.inner = inner
        self.count = count
        self.snapshot = snapshot
    }
    func waitReadable() async throws { try await inner.waitReadable() }
    func read(into buffer: UnsafeMutableRawBufferPointer) async throws -> Int { try await inner.read(into: buffer) }
    func readNow(into buffer: UnsafeMutableRawBufferPointer) throws -> Int? { try readNow(into: [buffer]) }
    func readNow(into buffers: [UnsafeMutableRawBufferPointer]) throws -> Int? {
        var left = count
        var taken = 0
        for buffer in buffers where left > 0 {
            let part = UnsafeMutableRawBufferPointer(rebasing: buffer[..<min(buffer.count, left)])
            guard let got = inner.readNow(into: part) else { break }
            taken += got
            left -= got
        }
        snapshot()
        return taken
    }
}

/// A source with a window, in memory (what `WindowedSource` does with two pipes): `fillWindow`
/// moves bytes from `inner` into the window when it is empty, reads take from the window. A
/// read can be made to die inside: it takes some bytes out of the window, then the crash is
/// recorded (`snapshot`) before it returns.
private final class MemoryWindow: ByteReader, @unchecked Sendable {
    let inner: MemorySource
    private let window = NIOLockedValueBox<[UInt8]>([])
    private let kill = NIOLockedValueBox<(count: Int, snapshot: () -> Void)?>(nil)

    init(_ inner: MemorySource) { self.inner = inner }

    var level: Int { window.withLockedValue { $0.count } }

    func killInsideNextRead(taking count: Int, snapshot: @escaping () -> Void) {
        kill.withLockedValue { $0 = (count, snapshot) }
    }

    func waitReadable() async throws {
        if level > 0 { return }
        try await inner.waitReadable()
    }

    func fillWindow(upTo limit: Int) throws -> WindowFill {
        if level > 0 { return .holding(level) }
        var bytes = [UInt8](repeating: 0, count: limit)
        guard let got = bytes.withUnsafeMutableBytes({ inner.readNow(into: $0) }) else { return .nothing }
        if got == 0 { return .endOfFile }
        window.withLockedValue { $0 = Array(bytes[..<got]) }
        return .holding(got)
    }

    func readNow(into buffers: [UnsafeMutableRawBufferPointer]) throws -> Int? {
        if level == 0 {
            switch try fillWindow(upTo: buffers.reduce(0) { $0 + $1.count }) {
            case .nothing: return nil
            case .endOfFile: return 0
            case .holding, .unwindowed: break
            }
        }
        let killing = kill.withLockedValue { k in
            defer { k = nil }
            return k
        }
        var left = min(killing?.count ?? .max, level)
        var taken = 0
        for buffer in buffers where left > 0 {
            let count = min(buffer.count, left)
            window.withLockedValue { bytes in
                UnsafeMutableRawBufferPointer(rebasing: buffer[..<count]).copyBytes(from: bytes[..<count])
                bytes.removeFirst(count)
            }
            taken += count
            left -= count
        }
        killing?.snapshot()
        return taken
    }

    func readNow(into buffer: UnsafeMutableRawBufferPointer) throws -> Int? { try readNow(into: [buffer]) }

    func read(into buffer: UnsafeMutableRawBufferPointer) async throws -> Int {
        while true {
            try await waitReadable()
            if let count = try readNow(into: buffer) { return count }
        }
    }
}

extension CrashResumeStreamTests {
    /// A host that echoes END without an ACK before it (the protocol allows it: the echo says
    /// every byte arrived). The checkpoint must say the bytes were acknowledged, or a broker
    /// killed after the echo leaves its successor sending them again to a host that may have
    /// closed the stream at its END — until the drain timeout, then reported undelivered.
    /// Holdfast's own host always ACKs first; the link here drops every ACK toward the guest.
    @Test func anEndEchoWithoutAnAckMarksTheCheckpointAcknowledged() async throws {
        let memory = SlotMemory()
        let dropped = NIOLockedValueBox<MemoryPipe?>(nil)
        let pair = ResumablePair(
            guestDirection: .send,
            beforeAccept: { link in
                link.dropFrames(.ack, towardSide: 0)
                dropped.withLockedValue { $0 = link }
            }, checkpoint: memory.checkpoint)
        defer { pair.close() }
        pair.start()
        let source = MemorySource()
        let sent = (0..<10_000).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 5) }
        let receiver = Task { await pair.host.receiveAll() }
        source.append(sent)
        source.finish()
        while try await pair.guest.pull(from: source, pool: .shared) != .endOfFile {}
        #expect(await pair.guest.finish() == 0, "the echo alone tells the guest every byte arrived")
        #expect(await receiver.value == sent)
        #expect(try #require(dropped.withLockedValue { $0 }).droppedFrames > 0, "the host did send ACKs, and none reached the guest")
        let recovered = try #require(memory.checkpoint.recovered)
        #expect(recovered.taken == 10_000)
        #expect(recovered.acknowledged == 10_000, "a successor must not send acknowledged bytes again")
    }
}
