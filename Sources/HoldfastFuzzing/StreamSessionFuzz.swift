import HoldfastCore
import HoldfastProtocol

/// The `stream` target's session mode: one connection of a real `ResumableStream`, its peer
/// played by the fuzz input.
///
/// Mode byte: bit 0 picks the end under test (0 host, 1 guest), bit 1 its direction (0 it
/// receives, 1 it sends; a sending end has 96 KiB queued first, so acknowledgements and replay
/// offsets have something to refer to). The next 16 bytes are the peer hello's attempt and
/// received offset, which the harness signs with the stream's secret (for a guest end, over
/// its nonce, as a host would); everything after is what the peer sends once the hello is done.
enum StreamSessionFuzz {
    static let token = Array("fuzz".utf8)
    static let secret = try! StreamSecret(bytes: [UInt8](repeating: 0x5A, count: 32))
    /// Small, so that a ring fills and a drain ends within the bound below.
    static let configuration = ResumableConfiguration(
        ringCapacity: 128 * 1024, ackEvery: 4096, ackDelay: .milliseconds(1), maxFrame: 16 * 1024, drainTimeout: .milliseconds(5))

    static func run(mode: UInt8, _ input: [UInt8]) async {
        let role: StreamRole = mode & 1 == 0 ? .host : .guest
        let direction: StreamDirection = mode & 2 == 0 ? .receive : .send
        var fields = Array(input.prefix(16))
        fields += [UInt8](repeating: 0, count: 16 - fields.count)
        let attempt = fields[0..<8].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        let offset = fields[8..<16].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        let script = Array(input.dropFirst(16))

        let stream: ResumableStream<ScriptedConnection>
        switch role {
        case .host:
            stream = ResumableStream(token: token, secret: secret, role: .host, direction: direction, configuration: configuration)
        case .guest:
            stream = ResumableStream(
                token: token, secret: secret, role: .guest, direction: direction, configuration: configuration,
                policy: RedialPolicy(attempts: 2, interval: .zero, connectTimeout: .milliseconds(50)),
                dial: { ScriptedConnection(script, answering: { guestHello in
                    StreamAuthentication.sign(
                        StreamHello(role: .host, token: token, receivedOffset: offset, attempt: attempt, nonce: guestHello.nonce),
                        secret: secret, challenge: guestHello.nonce
                    ).encoded
                }) })
        }
        let producer = Task {
            guard direction == .send else { return }
            let chunk = UnsafeMutableRawBufferPointer.allocate(byteCount: 32 * 1024, alignment: 8)
            defer { chunk.deallocate() }
            chunk.initializeMemory(as: UInt8.self, repeating: 0x61)
            for _ in 0..<3 { try? await stream.send(UnsafeRawBufferPointer(chunk)) }
        }
        switch role {
        case .host:
            let hello = StreamAuthentication.sign(
                StreamHello(role: .guest, token: token, receivedOffset: offset, attempt: attempt, nonce: [UInt8](repeating: 7, count: 16)),
                secret: secret)
            try? await stream.accept(ScriptedConnection(script), hello: hello)
        case .guest:
            stream.slot.disconnect()  // the first dial
        }
        let consumer = Task {
            guard direction == .receive else { return }
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 8192, alignment: 8)
            defer { buffer.deallocate() }
            while await stream.receive(into: buffer) > 0 {}
        }
        // The script is in memory: a few milliseconds play all of it; then the stream ends.
        try? await Task.sleep(for: .milliseconds(3))
        if direction == .send {
            // END, the drain (5 ms without progress), or the close below: whichever first.
            let finishing = Task { await stream.finish() }
            try? await Task.sleep(for: .milliseconds(20))
            stream.close()
            _ = await finishing.value
        }
        stream.close()
        producer.cancel()
        _ = await producer.value
        _ = await consumer.value
    }
}
