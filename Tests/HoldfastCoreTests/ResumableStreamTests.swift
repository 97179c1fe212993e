#if canImport(Glibc)
import Glibc
#endif
import HoldfastProtocol
import HoldfastTestSupport
import NIOConcurrencyHelpers
import Testing

@testable import HoldfastCore

extension ResumableStream {
    func sendBytes(_ data: [UInt8]) async throws(StreamClosed) {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, data.count), alignment: 1)
        defer { buffer.deallocate() }
        buffer.copyBytes(from: data)
        try await send(UnsafeRawBufferPointer(rebasing: buffer[..<data.count]))
    }

    /// Receives until the stream ends; bounded by `limit` bytes.
    func receiveAll(limit: Int = 1 << 30) async -> [UInt8] {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 1)
        defer { buffer.deallocate() }
        var result: [UInt8] = []
        while result.count < limit {
            await waitReceivable()
            let count = await receive(into: buffer)
            if count == 0 { break }
            result += buffer[..<count]
        }
        return result
    }
}

@Suite("ReplayRing", .timeLimit(.minutes(5)))
struct ReplayRingTests {
    @Test func growsOnDemandAndHoldsNothingWhenIdle() {
        let pool = BufferPool(bufferSize: 1024, retained: 0)
        let ring = ReplayRing(capacity: 4096, pool: pool)
        #expect(ring.blockCount == 0)
        let data = [UInt8](repeating: 7, count: 1500)
        #expect(data.withUnsafeBytes { ring.append($0) } == 1500)
        #expect(ring.blockCount == 2)
        ring.acknowledge(upTo: 1024)
        #expect(ring.blockCount == 1, "a fully acknowledged block goes back at once")
        ring.acknowledge(upTo: 1500)
        #expect(ring.blockCount == 0, "an idle stream holds no block, not even a partial tail")
        #expect(ring.count == 0 && ring.end == 1500)
    }

    @Test func capStopsTheProducer() {
        let ring = ReplayRing(capacity: 3000, pool: BufferPool(bufferSize: 1024))
        let data = [UInt8](repeating: 1, count: 5000)
        #expect(data.withUnsafeBytes { ring.append($0) } == 3000)
        #expect(ring.isFull)
        #expect(ring.reserve().count == 0)
        ring.acknowledge(upTo: 1000)
        #expect(data.withUnsafeBytes { ring.append($0) } == 1000)
    }

    @Test func bytesFromAnOffsetStopAtTheBlockEnd() {
        let ring = ReplayRing(capacity: 10_000, pool: BufferPool(bufferSize: 1000))
        let data = (0..<2500).map { UInt8(truncatingIfNeeded: $0) }
        data.withUnsafeBytes { _ = ring.append($0) }
        let first = ring.bytes(from: 900, limit: 10_000)
        #expect(Array(first) == Array(data[900..<1000]))
        let second = ring.bytes(from: 1000, limit: 300)
        #expect(Array(second) == Array(data[1000..<1300]))
        #expect(Array(ring.bytes(from: 2400, limit: 1000)) == Array(data[2400..<2500]))
    }

    @Test func aPinnedBlockSurvivesAnAcknowledgement() {
        let pool = BufferPool(bufferSize: 1000, retained: 0)
        let ring = ReplayRing(capacity: 10_000, pool: pool)
        let data = [UInt8](repeating: 9, count: 2000)
        data.withUnsafeBytes { _ = ring.append($0) }
        ring.pin(1000)  // a sender is writing block 2
        ring.acknowledge(upTo: 2000)  // an (early, hostile) ack of everything
        #expect(ring.blockCount == 1, "the pinned block stays until the write is done")
        ring.unpin()
        #expect(ring.blockCount == 0)
    }

    /// One readv fills several blocks: a reservation spans blocks in stream order, a commit
    /// that does not reach the last ones gives them back at once, and the sender reads the bytes
    /// back as regions across the blocks.
    @Test func aReservationSpansBlocksAndACommitReturnsWhatItDidNotFill() {
        let ring = ReplayRing(capacity: 10_000, pool: BufferPool(bufferSize: 1000, retained: 0))
        [UInt8](repeating: 1, count: 300).withUnsafeBytes { _ = ring.append($0) }
        let regions = ring.reserve(upTo: 2500)
        #expect(regions.map(\.count) == [700, 1000, 800])
        #expect(ring.blockCount == 3)
        var next: UInt8 = 0
        for region in regions {
            for index in region.indices {
                region[index] = next
                next &+= 1
            }
        }
        ring.commit(1200)  // the read filled the first region and half the second
        #expect(ring.blockCount == 2, "the block the commit did not reach went back")
        #expect(ring.end == 1500)
        let read = ring.regions(from: 250, limit: 5000)
        #expect(read.map(\.count) == [750, 500])
        #expect(Array(read[0][50...]) + Array(read[1]) == (0..<1200).map { UInt8(truncatingIfNeeded: $0) })
        #expect(ring.regions(from: 1400, limit: 50).map(\.count) == [50])
        #expect(ring.reserve(upTo: 20_000).reduce(0) { $0 + $1.count } == 10_000 - 1500, "never beyond capacity")
        ring.commit(0)
        ring.acknowledge(upTo: 1500)
        #expect(ring.blockCount == 0)
    }

    /// A burst's blocks stay in the pool while the burst needs them (no mapping, page faults
    /// and unmapping per block); what stayed unused between two trims goes back.
    @Test func aPoolKeepsWhatABurstUsesAndGivesBackWhatStayedUnused() {
        let pool = BufferPool(bufferSize: 1024, retained: 2, trimInterval: .seconds(3600))
        let burst = (0..<10).map { _ in pool.take() }
        for buffer in burst { pool.recycle(buffer) }
        #expect(pool.freeCount == 10, "kept beyond the baseline while the burst is recent")
        pool.trim()
        #expect(pool.freeCount == 10, "all ten were in use during this interval")
        let again = (0..<4).map { _ in pool.take() }  // the burst goes on, smaller
        for buffer in again { pool.recycle(buffer) }
        pool.trim()
        #expect(pool.freeCount == 6, "four were used in this interval, six were not: four go back, the baseline stays")
        pool.trim()
        #expect(pool.freeCount == 2, "a quiet interval leaves the baseline")
        pool.trim()
        #expect(pool.freeCount == 2)
    }

    @Test func aReservedTailSurvivesAnAcknowledgement() {
        let ring = ReplayRing(capacity: 10_000, pool: BufferPool(bufferSize: 1000, retained: 0))
        [UInt8](repeating: 1, count: 10).withUnsafeBytes { _ = ring.append($0) }
        let space = ring.reserve()  // a producer is reading a pipe into it
        ring.acknowledge(upTo: 10)
        #expect(ring.blockCount == 1)
        space[0] = 42
        ring.commit(1)
        #expect(ring.bytes(from: 10, limit: 1).first == 42)
    }
}

@Suite("Resumable streams in memory", .timeLimit(.minutes(5)))
struct ResumableMemoryTests {
    @Test func transfersAndEndsCleanly() async throws {
        let pair = ResumablePair(guestDirection: .send)
        defer { pair.close() }
        pair.start()
        let receiver = Task { await pair.host.receiveAll() }
        try await pair.guest.sendBytes(bytes("hello, host"))
        let undelivered = await pair.guest.finish()
        #expect(undelivered == 0)
        #expect(await receiver.value == bytes("hello, host"))
        #expect(pair.host.statistics.ended)
    }

    /// Frames of shrinking and growing sizes arriving together — each group held back until the
    /// receiver drained the one before, so a group starts at a header read and its frames are
    /// read across one another's boundaries in a pass (a body with the next header, the next
    /// body as far as it came) — with END in the last group: every byte arrives once, in order,
    /// and the end with them.
    @Test func framesOfVaryingSizesArrivingTogetherArriveExactlyOnce() async throws {
        let holder = NIOLockedValueBox<MemoryPipe?>(nil)
        let pair = ResumablePair(guestDirection: .send, beforeAccept: { link in
            holder.withLockedValue { if $0 == nil { $0 = link } }
        })
        defer { pair.close() }
        pair.start()
        try await eventually("connected") { pair.guest.slot.phase == .connected && pair.host.slot.phase == .connected }
        let link = try #require(holder.withLockedValue { $0 })
        let received = NIOLockedValueBox<[UInt8]>([])
        let receiver = Task {
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 1)
            defer { buffer.deallocate() }
            while true {
                await pair.host.waitReceivable()
                let count = await pair.host.receive(into: buffer)
                if count == 0 { return }
                received.withLockedValue { $0 += buffer[..<count] }
            }
        }
        var pattern = PatternBytes(seed: 19)
        var sent: [UInt8] = []
        var finisher: Task<UInt64, Never>?
        let groups = [[3000], [10, 700, 1, 2500], [2500], [64, 5, 40_000, 17], [40_000], [3, 9000, 2]]
        for (index, group) in groups.enumerated() {
            link.holdDelivery()
            var written = link.bytesTransferred
            // Each send is written as a frame of its own before the next: the sizes are the frames'.
            for size in group {
                let chunk = pattern.next(size)
                try await pair.guest.sendBytes(chunk)
                sent += chunk
                written += StreamFramePrefix.size + size
                let expected = written
                try await eventually("a frame of \(size) bytes written") { link.bytesTransferred >= expected }
            }
            if index == groups.count - 1 {
                let endWritten = written + StreamFramePrefix.size
                finisher = Task { await pair.guest.finish() }
                try await eventually("END written") { link.bytesTransferred >= endWritten }
            }
            link.releaseDelivery()
            let total = sent.count
            try await eventually("group \(index) received") { received.withLockedValue { $0.count } >= total }
        }
        await receiver.value
        #expect(received.withLockedValue { $0 } == sent)
        #expect(await finisher?.value == 0, "the sender learnt every byte arrived")
        #expect(pair.host.statistics.ended)
        #expect(pair.dialCount == 1)
    }

    @Test func reconnectReplaysExactlyWhatWasLost() async throws {
        // Hold everything the first link carries, then cut it: nothing written on it arrives, so
        // all of it must be replayed on the second link — once.
        let holder = NIOLockedValueBox<MemoryPipe?>(nil)
        let pair = ResumablePair(guestDirection: .send, beforeAccept: { link in
            holder.withLockedValue { if $0 == nil { $0 = link } }
        })
        defer { pair.close() }
        pair.start()
        try await eventually("first connection") { pair.guest.slot.phase == .connected && pair.host.slot.phase == .connected }
        holder.withLockedValue { $0 }?.holdDelivery()
        try await pair.guest.sendBytes(bytes("in flight when the link died"))
        // Two 37-byte hellos, then the 16-byte prefix and 28 bytes of data went into the held link.
        try await eventually("bytes written into the held link") {
            (holder.withLockedValue { $0 }?.bytesTransferred ?? 0) >= 2 * 37 + 16 + 28
        }
        // And the sender has seen that write complete: cut before that, its bytes count as a
        // first send on the next link rather than a replay (a loaded full suite cut there once:
        // the bytes arrived exactly, `replayedBytes` was 0).
        try await eventually("the sender saw its write go out") { pair.guest.statistics.sentBytes >= 28 }
        pair.cutCurrentLink()
        let receiver = Task { await pair.host.receiveAll() }
        try await pair.guest.sendBytes(bytes(" + after"))
        #expect(await pair.guest.finish() == 0)
        #expect(await receiver.value == bytes("in flight when the link died + after"))
        #expect(pair.dialCount >= 2)
        #expect(pair.guest.statistics.replayedBytes >= 28)
    }

    @Test func stdinDirectionWorksToo() async throws {
        let pair = ResumablePair(guestDirection: .receive)
        defer { pair.close() }
        pair.start()
        let receiver = Task { await pair.guest.receiveAll() }
        try await pair.host.sendBytes(bytes("typed by the host"))
        #expect(await pair.host.finish() == 0)
        #expect(await receiver.value == bytes("typed by the host"))
        #expect(await pair.guest.waitEndEchoed(timeout: .seconds(5)))
    }

    /// The host ends stdin; the guest echoes the END, and the link dies before the host has
    /// read the echo (a migration at that moment). Found by the soak: the guest closed its
    /// stream as soon as the echo was written, so the host waited out its drain timeout for a
    /// reconnect that never came and reported the last bytes — which had arrived — as lost. The
    /// guest must stay, redial, echo again, and close only when the host closes after the echo.
    @Test func anEndEchoLostWithItsLinkIsEchoedAgain() async throws {
        let links = NIOLockedValueBox<[MemoryPipe]>([])
        let pair = ResumablePair(
            guestDirection: .receive, configuration: ResumableConfiguration(drainTimeout: .seconds(120)),
            beforeAccept: { link in links.withLockedValue { $0.append(link) } })
        defer { pair.close() }
        pair.start()
        try await eventually("the first connection") { pair.guest.slot.phase == .connected && pair.host.slot.phase == .connected }
        let first = try #require(links.withLockedValue { $0.first })
        first.holdDelivery(toSide: 1)  // the host stops hearing the guest on this link
        try await pair.host.sendBytes(bytes("typed by the host"))
        let finished = Task { await pair.host.finish() }
        #expect(await pair.guest.receiveAll() == bytes("typed by the host"))
        #expect(await pair.guest.waitEndEchoed(timeout: .seconds(5)), "the echo went out, into the held link")
        let seen = Task { await pair.guest.closeAfterEndDelivered(timeout: .seconds(20)) }
        try await Task.sleep(for: .milliseconds(50))
        #expect(!pair.guest.isClosed, "an echo written is not an echo received")
        first.cut()  // the migration: the ACK and the echo are lost with the link
        // From the echo sent again: without it the host would wait out its 120 s drain timeout.
        let undelivered = try await withTimeout("the END echoed again", .seconds(60)) { await finished.value }
        #expect(undelivered == 0, "the host learns that every byte arrived")
        #expect(await seen.value, "the guest saw the host close after the second echo")
        #expect(pair.guest.isClosed)
        #expect(pair.dialCount >= 2)
    }

    /// Without a drop, the guest closes as soon as the host, done, closes the connection.
    @Test func anEndEchoThatArrivesEndsTheGuestAtOnce() async throws {
        let pair = ResumablePair(guestDirection: .receive)
        defer { pair.close() }
        pair.start()
        try await pair.host.sendBytes(bytes("typed by the host"))
        let finished = Task { await pair.host.finish() }
        #expect(await pair.guest.receiveAll() == bytes("typed by the host"))
        #expect(await pair.guest.closeAfterEndDelivered(timeout: .seconds(60)), "the host's close was seen, not the timeout")
        #expect(await finished.value == 0)
        #expect(pair.dialCount == 1)
    }

    /// The host types and ends stdin before the guest's stream has ever connected (a fast
    /// `holdfast host run` with piped input): the bytes and the END wait in the ring.
    @Test func stdinSentAndEndedBeforeTheGuestConnectsArrives() async throws {
        let pair = ResumablePair(guestDirection: .receive)
        defer { pair.close() }
        try await pair.host.sendBytes(bytes("typed before anyone listened"))
        let finished = Task { await pair.host.finish() }
        try await Task.sleep(for: .milliseconds(50))
        pair.start()
        let received = try await withTimeout("stdin") { await pair.guest.receiveAll() }
        #expect(received == bytes("typed before anyone listened"))
        #expect(await finished.value == 0)
    }

    @Test func aFullRingStopsTheProducerUntilAcknowledged() async throws {
        let configuration = ResumableConfiguration(ringCapacity: 256 * 1024)
        let pair = ResumablePair(guestDirection: .send, configuration: configuration)
        defer { pair.close() }
        let sent = NIOLockedValueBox(0)
        let producer = Task {
            for _ in 0..<8 {
                try await pair.guest.sendBytes([UInt8](repeating: 1, count: 64 * 1024))
                sent.withLockedValue { $0 += 64 * 1024 }
            }
        }
        // Not connected yet: the ring takes 256 KiB, then the producer parks.
        try await eventually("the ring to fill") { sent.withLockedValue { $0 } == 256 * 1024 }
        try await Task.sleep(for: .milliseconds(50))
        #expect(sent.withLockedValue { $0 } == 256 * 1024, "back-pressure: the producer is parked")
        #expect(pair.guest.statistics.ringBytes == 256 * 1024)
        pair.start()
        let received = await pair.host.receiveAll(limit: 512 * 1024)
        try await producer.value
        #expect(received.count == 512 * 1024)
    }

    @Test func wrongTokenIsRefusedAndTheStreamStaysIntact() async throws {
        let host = ResumableStream<MemoryPipe.End>(token: bytes("right"), secret: .random(), role: .host, direction: .receive)
        defer { host.close() }
        let link = MemoryPipe()
        let (guestEnd, hostEnd) = link.ends
        let refused = Task { () -> StreamProtocolError? in
            do throws(StreamProtocolError) {
                try await host.accept(hostEnd, hello: StreamHello(role: .guest, token: bytes("wrong"), receivedOffset: 0))
                return nil
            } catch {
                return error
            }
        }
        #expect(await refused.value == .wrongToken)
        let (prefix, body) = try await FrameIO.readFrame(guestEnd)
        #expect(prefix.type == .error)
        #expect(StreamRefusal.decode(prefix: prefix, body: body).code == .unknownToken)
        #expect(host.slot.phase == .empty, "still parked, waiting for the real guest")
        #expect(host.statistics.refusedConnections == 1)
    }

    @Test func offsetsAreCheckedAgainstWhatWasSentAndOnlyAfterTheProof() async throws {
        // The host holds its acknowledgements back, so the guest has sent more than it knows
        // arrived.
        let quiet = ResumableConfiguration(ackEvery: 1 << 20, ackDelay: .seconds(600))
        let pair = ResumablePair(guestDirection: .send, configuration: quiet)
        defer { pair.close() }
        let guest = pair.guest
        try await guest.sendBytes(bytes("12345"))
        // In the ring but never sent: no peer can hold it.
        #expect(guest.engineValidate(StreamHello(role: .host, token: guest.token, receivedOffset: 3)) == .offsetFromTheFuture(reported: 3, limit: 0))
        pair.start()
        #expect(await pair.host.receiveAll(limit: 5) == bytes("12345"))
        #expect(guest.statistics.acknowledged == 0)
        // Without the secret: refused like an unknown token, and nothing changes.
        #expect(guest.engineValidate(StreamHello(role: .host, token: guest.token, receivedOffset: 3), signed: false) == .unauthenticated)
        #expect(guest.engineValidate(StreamHello(role: .host, token: guest.token, receivedOffset: 9), signed: false) == .unauthenticated)
        #expect(guest.statistics.acknowledged == 0, "a hello that does not verify acknowledges nothing")
        #expect(guest.engineValidate(StreamHello(role: .host, token: guest.token, receivedOffset: 6)) == .offsetFromTheFuture(reported: 6, limit: 5))
        #expect(guest.engineValidate(StreamHello(role: .host, token: guest.token, receivedOffset: 3)) == nil)
        #expect(guest.statistics.acknowledged == 3, "a valid hello acknowledges what the peer holds")
        #expect(guest.engineValidate(StreamHello(role: .host, token: guest.token, receivedOffset: 2)) == .offsetAlreadyDiscarded(reported: 2, oldest: 3))
        #expect(guest.engineValidate(StreamHello(role: .guest, token: guest.token, receivedOffset: 3)) != nil, "same role")
    }

    @Test func garbageHelloIsRefusedAndTheStreamCarriesOn() async throws {
        // The host answers the first dial with garbage: the guest refuses that connection, keeps
        // its data, and delivers everything on the next.
        let first = NIOLockedValueBox(true)
        let pair = ResumablePair(guestDirection: .send, beforeAccept: { link in
            if first.withLockedValue({ let was = $0; $0 = false; return was }) {
                let (_, hostEnd) = link.ends
                try? await FrameIO.write(Array("HTTP/1.1 400 Bad Request\r\n\r\n".utf8), to: hostEnd)
                try? await Task.sleep(for: .milliseconds(20))
                link.cut()
            }
        })
        defer { pair.close() }
        try await pair.guest.sendBytes(bytes("survives garbage"))
        pair.start()
        let receiver = Task { await pair.host.receiveAll() }
        let undelivered = await pair.guest.finish()
        #expect(undelivered == 0)
        // A guest that gave up (a starved machine) must fail the test, not hang it: closing the
        // pair ends the host's receive.
        if undelivered != 0 { pair.close() }
        #expect(await receiver.value == bytes("survives garbage"))
        #expect(pair.dialCount >= 2)
    }

    @Test func exitDrainReportsUndeliveredBytesAfterTheDrainTimeout() async throws {
        let configuration = ResumableConfiguration(drainTimeout: .milliseconds(100))
        let guest = ResumableStream<MemoryPipe.End>(
            token: bytes("t"), secret: .random(), role: .guest, direction: .send, configuration: configuration)
        try await guest.sendBytes([UInt8](repeating: 0, count: 5000))
        // No host ever comes: finish must still return, reporting every byte undelivered.
        let undelivered = try await withTimeout("finish") { await guest.finish() }
        #expect(undelivered == 5000)
        #expect(guest.slot.phase == .abandoned)
    }

    @Test func exitDrainWaitsForTheHostToAcknowledgeEveryByte() async throws {
        // A drain timeout far beyond the host's lateness: on a starved machine "50 ms late" can
        // be seconds.
        let pair = ResumablePair(guestDirection: .send, configuration: ResumableConfiguration(drainTimeout: .seconds(60)))
        defer { pair.close() }
        try await pair.guest.sendBytes([UInt8](repeating: 3, count: 100_000))
        let finish = Task { await pair.guest.finish() }
        try await Task.sleep(for: .milliseconds(50))
        pair.start()  // the host turns up late, within the drain timeout
        let received = await pair.host.receiveAll()
        #expect(await finish.value == 0)
        #expect(received.count == 100_000)
        #expect(pair.guest.statistics.acknowledged == 100_000)
    }

    @Test func processExitWithAFullRingAndNoHostReleasesTheRelayAndCountsEverything() async throws {
        let configuration = ResumableConfiguration(ringCapacity: 64 * 1024, drainTimeout: .milliseconds(100))
        let guest = ResumableStream<MemoryPipe.End>(token: bytes("t"), secret: .random(), role: .guest, direction: .send, configuration: configuration)
        let source = MemorySource([UInt8](repeating: 1, count: 100 * 1024))
        let relay = Task { await Relay.output(from: source, to: guest) }
        try await eventually("the ring to fill") { guest.statistics.ringBytes == 64 * 1024 }
        source.finish()  // the process wrote 100 KiB and exited; 36 KiB are still in its pipe
        guest.processExited()
        let report = try await withTimeout("the relay to be released") { await relay.value }
        #expect(report.ending == .abandoned)
        #expect(report.undelivered == 100 * 1024, "64 KiB never acknowledged + 36 KiB left in the pipe")
        #expect(guest.slot.phase == .abandoned)
    }

    /// An output held open past its process's exit by a quiet orphan (`nohup ./heartbeat &`,
    /// a line a minute) is not given up while it owes nothing: the drain timeout bounds a host
    /// that stops taking bytes, and there were none to take. Before, the drain watch abandoned
    /// the stream one timeout after the exit with the host connected: the orphan's next line
    /// was dropped (counted undelivered) and its next write died of SIGPIPE.
    @Test func aQuietOrphansOutputIsNotGivenUpWhileItOwesNothing() async throws {
        let pair = ResumablePair(guestDirection: .send, configuration: ResumableConfiguration(drainTimeout: .milliseconds(200)))
        defer { pair.close() }
        pair.start()
        let source = MemorySource(Array(repeating: 1, count: 10))
        let relay = Task { await Relay.output(from: source, to: pair.guest) }
        let received = Task { await pair.host.receiveAll() }
        try await eventually("the first line acknowledged") { pair.guest.statistics.acknowledged == 10 }
        pair.guest.processExited()
        // Quiet for three drain timeouts, the host connected all along.
        try await Task.sleep(for: .milliseconds(600))
        #expect(pair.guest.slot.phase != .abandoned, "not given up while nothing was owed")
        source.append(Array(repeating: 2, count: 10))
        source.finish()
        let report = try await withTimeout("the relay's end") { await relay.value }
        #expect(report.undelivered == 0, "\(report)")
        // A stream given up never ends at the host: closing the pair ends its receive.
        if report.undelivered != 0 { pair.close() }
        #expect(await received.value == Array(repeating: 1, count: 10) + Array(repeating: 2, count: 10))
    }

    /// The same quiet output, once its host drops the stream (host serve's own drain bound, a
    /// host agent gone): given up after the drain timeout, as before — not kept, with its
    /// slots and fds, for as long as the orphan lives.
    @Test func aQuietOrphansOutputIsGivenUpOnceItsHostDropsIt() async throws {
        let pair = ResumablePair(
            guestDirection: .send, configuration: ResumableConfiguration(drainTimeout: .milliseconds(200)),
            policy: RedialPolicy(attempts: 1_000_000, interval: .milliseconds(5), connectTimeout: .seconds(5)))
        defer { pair.close() }
        pair.start()
        let source = MemorySource(Array(repeating: 1, count: 10))
        let relay = Task { await Relay.output(from: source, to: pair.guest) }
        defer { relay.cancel() }
        let host = pair.host
        let receiving = Task { await host.receiveAll() }
        defer { receiving.cancel() }
        try await eventually("the line acknowledged") { pair.guest.statistics.acknowledged == 10 }
        pair.guest.processExited()
        try await Task.sleep(for: .milliseconds(400))
        #expect(pair.guest.slot.phase != .abandoned, "kept while its host is connected")
        pair.host.close()
        try await eventually("given up once the host dropped it") { pair.guest.slot.phase == .abandoned }
        source.finish()
    }

    /// A relay cancelled while it waits for its source (a handoff `release`, a live upgrade's
    /// quiesce, a stop: its owner closes the stream next) sends no END: the process has not
    /// ended, and another relay resumes the stream. Before, the cancelled wait was taken for the
    /// source's end and the stream finished — END on the wire unless the owner's close came
    /// first. Nothing is closed here, so the END would go out.
    @Test func aRelayCancelledWhileItsSourceIsQuietSendsNoEnd() async throws {
        let pair = ResumablePair(guestDirection: .send)
        defer { pair.close() }
        pair.start()
        let source = MemorySource(Array(repeating: 7, count: 1000))
        let relay = Task { await Relay.output(from: source, to: pair.guest) }
        let received = Task { await pair.host.receiveAll(limit: 2000) }
        try await eventually("the bytes acknowledged") { pair.guest.statistics.acknowledged == 1000 }
        try await eventually("the relay waiting for more") { source.remaining == 0 && source.waiters > 0 }
        relay.cancel()
        let report = await relay.value
        #expect(report.ending == .cancelled, "\(report)")
        #expect(!pair.guest.producerEnded, "not finished")
        // Were END sent, the host's receive would end with the 1,000 bytes.
        try await Task.sleep(for: .milliseconds(300))
        #expect(!pair.host.statistics.ended, "no END reached the host")
        received.cancel()
    }

    /// A stream with only its END left stops redialling a peer that says "unknown stream" again
    /// and again for a second (it had the END and closed, or dropped the stream) — a run of such
    /// answers, nothing else between. Counted from the first answer ever, one answer after a
    /// pause in which the peer could not be reached (a host agent restarting, registering its
    /// streams again) closed the stream at once. Now that answer begins a new run.
    @Test func oneUnknownStreamAnswerAfterAPauseDoesNotEndTheStream() async throws {
        struct NoListener: Error {}
        let refusing = NIOLockedValueBox(true)
        let dials = NIOLockedValueBox((refused: 0, failed: 0))
        let guest = ResumableStream<MemoryPipe.End>(
            token: bytes("t"), secret: .random(), role: .guest, direction: .send,
            policy: RedialPolicy(attempts: 1_000_000, interval: .milliseconds(50), connectTimeout: .seconds(2)),
            dial: {
                guard refusing.withLockedValue({ $0 }) else {
                    dials.withLockedValue { $0.failed += 1 }
                    throw NoListener()
                }
                // Two answers, then the peer unreachable: switched here, so that no third answer
                // of the first run can come, however slow the test's own task is.
                let refused = dials.withLockedValue { $0.refused += 1; return $0.refused }
                if refused == 2 { refusing.withLockedValue { $0 = false } }
                let (guestEnd, hostEnd) = MemoryPipe().ends
                Task {
                    _ = try? await Handshake.readHello(from: hostEnd)
                    await Handshake.refuse(hostEnd, .wrongToken)  // "unknown stream"
                }
                return guestEnd
            })
        defer { guest.close() }
        let finished = Task { await guest.finish() }  // no byte: only the END is left
        guest.slot.disconnect()
        try await eventually("two answers") { dials.withLockedValue { $0.refused } >= 2 }
        try await eventually("the peer unreachable for over a second") { dials.withLockedValue { $0.failed } >= 25 }
        let before = dials.withLockedValue { $0.refused }
        refusing.withLockedValue { $0 = true }
        _ = try await withTimeout("the stream let go", .seconds(10)) { await finished.value }
        let after = dials.withLockedValue { $0.refused } - before
        #expect(after >= 3, "a new run of answers after the pause, not its first one: \(after)")
    }

    @Test func idleStreamHoldsNoRingMemory() async throws {
        let pair = ResumablePair(guestDirection: .send)
        defer { pair.close() }
        pair.start()
        let receiver = Task { await pair.host.receiveAll(limit: 300_000) }
        for _ in 0..<3 { try await pair.guest.sendBytes([UInt8](repeating: 5, count: 100_000)) }
        _ = await receiver.value
        try await eventually("everything acknowledged") { pair.guest.statistics.acknowledged == 300_000 }
        // The last write may still hold its block pinned for a moment after the ack arrived.
        try await eventually("the ring to be empty") { pair.guest.statistics.ringBlocks == 0 }
    }
}

extension ResumableStream {
    /// Test access to hello validation.
    /// Validates `hello` as this stream's peer would have signed it (or, `signed: false`, as
    /// someone without the secret).
    func engineValidate(_ hello: StreamHello, signed: Bool = true) -> StreamProtocolError? {
        let proved = signed ? StreamAuthentication.sign(hello, secret: secret) : hello
        return engineForTests.validate(proved, token: token, ourRole: role, secret: secret, challenge: nil)
    }
}

@Suite("Resumable streams under random faults", .timeLimit(.minutes(5)))
struct ResumableFaultTests {
    /// Both directions at once over links cut at random byte counts (mid-hello, mid-data,
    /// mid-ack, mid-END), with delayed hellos, until at least 10,000 connections were made.
    /// Every byte must arrive exactly once, in order: checked with SHA-256 and byte counts.
    @Test func tenThousandRandomReconnectsLoseAndRepeatNothing() async throws {
        // HOLDFAST_TEST_SEED replays a printed seed.
        let seed = getenv("HOLDFAST_TEST_SEED").flatMap { UInt64(String(cString: $0)) } ?? UInt64.random(in: 0..<UInt64.max)
        print("seed \(seed)")
        let random = NIOLockedValueBox(SeededRandom(seed: seed))
        let budget: @Sendable () -> Int? = { random.withLockedValue { Int.random(in: 0...8000, using: &$0) } }
        let delayHello: @Sendable (MemoryPipe) async -> Void = { _ in
            if random.withLockedValue({ Int.random(in: 0..<10, using: &$0) }) == 0 { await Task.yield() }
        }
        // The drain timeout (a host that never comes back) is not under test: its 30 s default
        // ran out once with two full suites on two cores, the last 64,824 bytes of stdin still
        // crossing links cut every ≤ 8,000 bytes. The watchdog below judges a stall instead.
        let configuration = ResumableConfiguration(
            ringCapacity: 256 * 1024, ackEvery: 2048, ackDelay: .milliseconds(1), maxFrame: 1024, drainTimeout: .seconds(300))
        let stdout = ResumablePair(guestDirection: .send, configuration: configuration, token: "stdout", budget: budget, beforeAccept: delayHello)
        let stdin = ResumablePair(guestDirection: .receive, configuration: configuration, token: "stdin", budget: budget, beforeAccept: delayHello)
        defer {
            stdout.close()
            stdin.close()
        }
        stdout.start()
        stdin.start()
        let cycles = 5000

        @Sendable func produce(_ stream: ResumablePair.Stream, _ pair: ResumablePair, seed: UInt64) async throws -> (UInt64, String) {
            var pattern = PatternBytes(seed: seed)
            var digest = StreamDigest()
            var chunkRandom = SeededRandom(seed: seed ^ 0xFF)
            while pair.dialCount < cycles {
                let chunk = pattern.next(Int.random(in: 1...20_000, using: &chunkRandom))
                digest.update(chunk)
                try await stream.sendBytes(chunk)
            }
            let undelivered = await stream.finish()
            #expect(undelivered == 0)
            return (digest.count, digest.hex())
        }

        @Sendable func consume(_ stream: ResumablePair.Stream) async -> (UInt64, String) {
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 16384, alignment: 1)
            defer { buffer.deallocate() }
            var digest = StreamDigest()
            while true {
                await stream.waitReceivable()
                let count = await stream.receive(into: buffer)
                if count == 0 { break }
                digest.update(UnsafeRawBufferPointer(rebasing: buffer[..<count]))
            }
            return (digest.count, digest.hex())
        }

        // A stall must fail with the state of every end, not hang the suite: a watchdog
        // prints it and closes the streams once no byte moved for 60 s (dials alone are no
        // progress: a stream refused on every redial still dials; 60 s, not less, because a
        // starved machine can hold a healthy pair back for seconds).
        let watchdog = Task {
            var last = ""
            var still = 0
            while !Task.isCancelled {
                try await Task.sleep(for: .seconds(1))
                let now = [stdout.guest, stdout.host, stdin.guest, stdin.host].map { "\($0.statistics.offset) \($0.statistics.acknowledged)" }.joined(separator: " ")
                still = now == last ? still + 1 : 0
                last = now
                if still >= 60 {
                    Issue.record("""
                        no progress for 60 s (seed \(seed), dials \(stdout.dialCount) \(stdin.dialCount)):
                        stdout guest \(stdout.guest.debugSummary)
                        stdout host  \(stdout.host.debugSummary)
                        stdin guest  \(stdin.guest.debugSummary)
                        stdin host   \(stdin.host.debugSummary)
                        statistics: \([stdout.guest, stdout.host, stdin.guest, stdin.host].map { "\($0.statistics)" }.joined(separator: "\n"))
                        """)
                    stdout.close()
                    stdin.close()
                    return
                }
            }
        }
        defer { watchdog.cancel() }
        let started = ContinuousClock.now
        async let outSent = produce(stdout.guest, stdout, seed: seed &+ 1)
        async let outReceived = consume(stdout.host)
        async let inSent = produce(stdin.host, stdin, seed: seed &+ 2)
        async let inReceived = consume(stdin.guest)
        let (sentOut, receivedOut, sentIn, receivedIn) = try await (outSent, outReceived, inSent, inReceived)
        let elapsed = ContinuousClock.now - started
        let dials = stdout.dialCount + stdin.dialCount
        print("\(dials) connections in \(elapsed): stdout \(sentOut.0) bytes, stdin \(sentIn.0) bytes; replayed \(stdout.guest.statistics.replayedBytes + stdin.host.statistics.replayedBytes) bytes")
        #expect(dials >= 10_000)
        #expect(receivedOut == sentOut, "stdout: bytes and sha256 equal")
        #expect(receivedIn == sentIn, "stdin: bytes and sha256 equal")
        #expect(stdout.guest.statistics.replayedBytes > 0, "the schedule did force replays")
    }
}
