import HoldfastProtocol

// MARK: - Reading acknowledgements (send side)

extension ResumableStream.Engine {
    /// Reads what the receiver sends back: ACK and the END echo. Anything else, or an ACK for
    /// bytes never sent on this connection, drops the connection (not the stream).
    func readAcknowledgements(_ slot: ConnSlot<Session>) async {
        let reader = BufferedFrameReader()
        var trafficNoted: UInt64?
        while let lease = await slot.current() {
            reader.reset(for: lease.generation)
            do {
                let prefix = try await reader.next(from: lease.connection)
                // A frame came back: this connection carried something (once per connection).
                if trafficNoted != lease.generation {
                    trafficNoted = lease.generation
                    slot.noteTraffic(generation: lease.generation)
                }
                switch prefix.type {
                case .ack:
                    try acknowledge(prefix.value, generation: lease.generation)
                case .end:
                    try endEchoed(prefix.value)
                case .error:
                    let body = try await reader.body(of: prefix, from: lease.connection)
                    throw StreamProtocolError.refusedByPeer(StreamRefusal.decode(prefix: prefix, body: body))
                case .data, .hello, .gap:
                    throw StreamProtocolError.unexpectedFrame(expected: .ack, got: prefix.type)
                }
            } catch {
                dropConnection(lease.generation, slot: slot, after: error)
            }
        }
    }

    private func acknowledge(_ offset: UInt64, generation: UInt64) throws {
        let wake = try state.withLockedValue { s -> [CheckedContinuation<Void, Never>] in
            guard try s.sender.acknowledge(offset, generation: generation) else { return [] }
            checkpoint?.acknowledged(offset)
            return s.takeProgressWaiters()
        }
        for continuation in wake { continuation.resume() }
    }

    private func endEchoed(_ offset: UInt64) throws {
        let wake = try state.withLockedValue { s -> [CheckedContinuation<Void, Never>] in
            try s.sender.endEchoed(offset)
            // The echo says every byte arrived, with or without an ACK before it: the checkpoint
            // says so too. It did not: a broker killed after an echo that came alone left its
            // successor believing the last bytes unacknowledged — it sent them again, to a host
            // that may have closed the stream at its END, until the drain timeout, and then
            // reported them undelivered.
            checkpoint?.acknowledged(s.sender.acknowledged)
            return s.takeProgressWaiters()
        }
        for continuation in wake { continuation.resume() }
    }
}

// MARK: - Receiving data (receive side)

extension ResumableStream.Engine {
    /// Whether `receive` can make progress without the connection becoming readable first: a
    /// body under way, or a whole header already read with the last body (an END, say).
    func hasBufferedFrame(for generation: UInt64) -> Bool {
        state.withLockedValue { $0.receiver.hasBufferedFrame(on: generation) }
    }

    /// Reads frames from the current connection until it has data for the caller: DATA goes
    /// straight into `buffer`; END ends the stream (returns 0 from then on). A dead
    /// connection only makes it wait for the next one.
    func receive(into buffer: UnsafeMutableRawBufferPointer, slot: ConnSlot<Session>) async -> Int {
        while true {
            if inboundFinished { return 0 }
            guard let lease = await slot.current() else { return 0 }
            do {
                if let count = try await receiveOnce(into: buffer, from: lease, slot: slot) { return count }
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
    private func receiveOnce(
        into buffer: UnsafeMutableRawBufferPointer, from lease: ConnSlot<Session>.Lease, slot: ConnSlot<Session>
    ) async throws -> Int? {
        let cursor = state.withLockedValue { $0.receiver.reading(on: lease.generation) }
        let size = StreamFramePrefix.size
        if cursor.remaining > 0 {
            return try await receiveBodies(into: buffer, from: lease, remaining: cursor.remaining, headerFilled: cursor.headerFilled)
        }
        if cursor.headerFilled < size {
            let count = try await Self.read(lease.connection, into: [inboundHeader.slice(cursor.headerFilled, size - cursor.headerFilled)])
            if count == 0 { throw StreamProtocolError.truncated }
            state.withLockedValue { $0.receiver.readHeader(count) }
            if cursor.headerFilled + count < size { return nil }
        }
        let (prefix, inbound, pump, firstFrame) = try state.withLockedValue { s in
            let prefix = try StreamFramePrefix.decode(UnsafeRawBufferPointer(inboundHeader.bytes))
            let inbound = try s.receiver.take(prefix)
            // The connection's first frame: it carried something (the slot paces a row of
            // connections that carry nothing).
            let firstFrame = s.trafficNotedOn != lease.generation
            s.trafficNotedOn = lease.generation
            // The end arrived: the pump acknowledges and echoes it.
            return (prefix, inbound, inbound == .ended || inbound == .skipped ? s.ringDoorbell() : nil, firstFrame)
        }
        if firstFrame { slot.noteTraffic(generation: lease.generation) }
        switch inbound {
        case .body, .nothing:
            return nil
        case .skipped:
            noteLoss(state.withLockedValue { $0.receiver.lost })
            pump?.resume()
            return nil
        case .ended:
            pump?.resume()
            return 0
        case .refusal:
            let body = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, prefix.bodyLength), alignment: 1)
            defer { body.deallocate() }
            try await FrameIO.readExactly(lease.connection, into: UnsafeMutableRawBufferPointer(rebasing: body[..<prefix.bodyLength]))
            throw StreamProtocolError.refusedByPeer(StreamRefusal.decode(prefix: prefix, body: Array(body[..<prefix.bodyLength])))
        }
    }

    /// The body path of `receiveOnce`: the rest of the current DATA frame straight into
    /// `buffer`, and — while the next frame's header came with it, is the DATA that follows
    /// at once, and the buffer has room — the bodies of the frames after it too, as far as
    /// they have arrived (no wait): many small frames cost one pass, not one each. Anything
    /// else (a control frame, a replay overlap, a header that does not decode) is left for
    /// the frame path. Returns bytes delivered, or nil when none were (a replay's overlap).
    private func receiveBodies(
        into buffer: UnsafeMutableRawBufferPointer, from lease: ConnSlot<Session>.Lease, remaining: Int, headerFilled: Int
    ) async throws -> Int? {
        let size = StreamFramePrefix.size
        var remaining = remaining
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
            let (delivery, pump, next) = state.withLockedValue { s -> (ResumableReceiver.Delivery, CheckedContinuation<Void, Never>?, Int?) in
                let delivery = s.receiver.readBody(count, headerBytes: total - count)
                let pump = delivery.wakePump ? s.ringDoorbell() : nil
                // Go on into the next frame only if the buffer has room and it is the DATA that
                // follows at once.
                guard filled + delivery.delivered < buffer.count, s.receiver.hasWholeHeader,
                    let prefix = try? StreamFramePrefix.decode(UnsafeRawBufferPointer(inboundHeader.bytes))
                else { return (delivery, pump, nil) }
                return (delivery, pump, s.receiver.continueWith(prefix))
            }
            if delivery.skipped > 0, delivery.delivered > 0 {
                // Bytes we already had (a replay overlapping what we received): drop them.
                room.copyMemory(from: UnsafeRawBufferPointer(rebasing: room[delivery.skipped..<count]))
            }
            filled += delivery.delivered
            if delivery.armAckTimer { armAckTimer() }
            pump?.resume()
            guard let next else { break }
            remaining = next
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

    /// Makes an acknowledgement due `ackDelay` after the first unacknowledged byte. A sleep of
    /// its own, not the `TimeoutWheel`: the wheel's tick (50 ms) is coarser than the delay
    /// (10 ms), and this sleep is never cancelled, so it leaves no timer queued behind it (the
    /// wheel's reason to exist).
    private func armAckTimer() {
        Task(executorPreference: executor) { [self] in
            try? await Task.sleep(for: configuration.ackDelay)
            let pump = state.withLockedValue { s -> CheckedContinuation<Void, Never>? in
                s.receiver.ackTimerFired()
                return s.ringDoorbell()
            }
            pump?.resume()
        }
    }
}

// MARK: - The END echo (receive side)

extension ResumableStream.Engine {
    /// The pump wrote the END echo on connection `generation`: wakes whoever waits for it.
    func endEchoWritten(generation: UInt64) {
        let waiters = state.withLockedValue { s -> [CheckedContinuation<Void, Never>] in
            s.receiver.wroteEndEcho(generation: generation)
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
                if s.receiver.endEchoSent || s.closed { return true }
                s.echoWaiters.append(continuation)
                return false
            }
            if resumeNow { continuation.resume() }
        }
        return state.withLockedValue { $0.receiver.endEchoSent }
    }

    /// Receive side, after END: true once a connection on which our END echo went out
    /// ended cleanly, at a frame boundary; false if the stream is closed first. Any other
    /// end of a connection is a drop like any other: the slot redials and the pump echoes
    /// END again on the next connection (it does once per connection).
    func waitEndDelivered(_ slot: ConnSlot<Session>) async -> Bool {
        let final = state.withLockedValue { $0.receiver.inboundFinal }
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
            if state.withLockedValue({ $0.receiver.echoedEnd(on: generation) }) { return true }
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
}
