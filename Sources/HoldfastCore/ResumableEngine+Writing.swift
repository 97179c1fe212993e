import HoldfastProtocol

// MARK: - The pump: everything this end writes

extension ResumableStream.Engine {
    /// One task per stream writes every frame the machines ask for: data from the ring
    /// (replaying from the peer's received offset after each reconnect) and END on the send
    /// side, acknowledgements and the END echo on the receive side. Parks on a doorbell when
    /// there is nothing to write: no timers tick on an idle stream.
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

    /// The frame the machine of this end's direction asks for next on `lease`.
    private func nextWork(_ s: inout State, on lease: ConnSlot<Session>.Lease) -> ResumableWork {
        // The session's hello offsets, if this lease is the session recorded last (without a
        // record — a session replaced at once — the machines take the safe choice).
        let start = s.sessionStart?.id == ObjectIdentifier(lease.connection) ? s.sessionStart : nil
        switch direction {
        case .send:
            let limit = min(Self.maximumBatch, configuration.maxFrame * Self.maxFramesPerWrite)
            switch s.sender.nextFrame(generation: lease.generation, peerReceived: start?.peer, limit: limit) {
            case .data(let regions, let offset, let count): return .data(regions, offset: offset, count: count)
            case .end(let final): return .end(final)
            case .gap(let to): return .gap(to)
            case .idle: return .idle
            }
        case .receive:
            switch s.receiver.nextFrame(generation: lease.generation, ourHelloReceived: start?.ours) {
            case .ack(let offset): return .ack(offset)
            case .endEcho(let final): return .endEcho(final)
            case .idle: return .idle
            }
        }
    }

    /// Writes every frame that is due on `lease`, then gives the sending token back. Returns
    /// whether anything was due. Caller holds the token.
    private func sendDue(on lease: ConnSlot<Session>.Lease, slot: ConnSlot<Session>) async -> Bool {
        let prefix = headers.slice(0, StreamFramePrefix.size)
        let generation = lease.generation
        var didWork = false
        while true {
            var wake: CheckedContinuation<Void, Never>?
            let work: ResumableWork = state.withLockedValue { s in
                s.doorbell = false
                let work = nextWork(&s, on: lease)
                // Nothing due: give the token back.
                if case .idle = work { wake = releaseSendingToken(&s) }
                return work
            }
            let failed: Bool
            switch work {
            case .idle:
                wake?.resume()
                return didWork
            case .data(let regions, let offset, let count):
                let (vectors, frames) = frameVectors(regions, offset: offset)
                let written: Int
                do {
                    try await lease.connection.write(vectors: vectors)
                    written = count
                    failed = false
                } catch {
                    written = Self.bodyBytes(accepted: error.accepted, frames: frames)
                    failed = true
                }
                state.withLockedValue {
                    $0.sender.wroteData(from: offset, written: written, generation: generation, connectionFailed: failed)
                }
            case .end(let final):
                failed = !(await writeControl(.end, value: final, on: lease.connection, prefix: prefix))
                if !failed { state.withLockedValue { $0.sender.wroteEnd(generation: generation) } }
            case .gap(let to):
                failed = !(await writeControl(.gap, value: to, on: lease.connection, prefix: prefix))
                if !failed { state.withLockedValue { $0.sender.wroteGap(to: to, generation: generation) } }
            case .ack(let offset):
                failed = !(await writeControl(.ack, value: offset, on: lease.connection, prefix: prefix))
                if !failed { state.withLockedValue { $0.receiver.wroteAck(offset, generation: generation) } }
            case .endEcho(let final):
                failed = !(await writeControl(.end, value: final, on: lease.connection, prefix: prefix))
                if !failed {
                    if checkpoint != nil { Failpoint.pass(Failpoint.brokerEndEchoed, process: "stdin") }
                    endEchoWritten(generation: generation)
                }
            }
            didWork = true
            if failed {
                state.withLockedValue { releaseSendingToken(&$0) }?.resume()
                slot.disconnect(ifCurrent: generation, reason: .writeFailed)
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
    static func bodyBytes(accepted: Int, frames: [Int]) -> Int {
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
}

/// What the pump writes next: a machine's frame, in the terms of the wire.
enum ResumableWork {
    /// Send side: the ring's bytes from `offset`, as DATA frames in one sendmsg.
    case data([UnsafeRawBufferPointer], offset: UInt64, count: Int)
    /// Send side: END.
    case end(UInt64)
    /// Send side: GAP (data goes on at the offset).
    case gap(UInt64)
    /// Receive side: ACK.
    case ack(UInt64)
    /// Receive side: the END echo (an END frame).
    case endEcho(UInt64)
    case idle
}
