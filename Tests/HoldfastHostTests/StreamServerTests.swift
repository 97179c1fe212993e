import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

@Suite("StreamServer: refusals leave everything else intact", .timeLimit(.minutes(5)))
struct StreamServerTests {
    func server(_ directory: TemporaryDirectory, timeout: Duration = .seconds(5)) throws -> StreamServer<AsyncFD> {
        let server = try StreamServer(listeningOn: .unix(path: directory.file("s.sock")), handshakeTimeout: timeout)
        server.start()
        return server
    }

    func expectRefusal(_ connection: AsyncFD, _ code: StreamErrorCode) async throws {
        let (prefix, body) = try await FrameIO.readFrame(connection)
        #expect(prefix.type == .error)
        #expect(StreamRefusal.decode(prefix: prefix, body: body).code == code)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 16, alignment: 1)
        defer { buffer.deallocate() }
        #expect(try await connection.read(into: buffer) == 0, "and the connection is closed")
    }

    @Test func unknownTokenIsRefused() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let server = try server(directory)
        defer { server.close() }
        let connection = try await Dialer.connect(to: server.address)
        try await FrameIO.write(StreamHello(role: .guest, token: bytes("nobody"), receivedOffset: 0, attempt: 1).encoded, to: connection)
        try await expectRefusal(connection, .unknownToken)
        connection.close()
    }

    @Test func garbageIsRefusedAndTheRealStreamStillFlows() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let server = try server(directory)
        defer { server.close() }
        let host = try server.open(token: bytes("real"), direction: .receive)
        let garbage = try await Dialer.connect(to: server.address)
        try await FrameIO.write(Array("GET / HTTP/1.1\r\nHost: x\r\n\r\n".utf8), to: garbage)
        try await expectRefusal(garbage, .protocolViolation)
        garbage.close()
        let guest = GuestStreams.resumable(to: server.address, token: bytes("real"), secret: host.secret, direction: .send)
        guest.slot.disconnect()
        let receiver = Task { () -> [UInt8] in
            var all: [UInt8] = []
            for await chunk in host.chunks() { all += chunk }  // the async-sequence view
            return all
        }
        try await FrameIO.write(bytes("after the garbage"), to: GuestSender(stream: guest))
        #expect(await guest.finish() == 0)
        #expect(await receiver.value == bytes("after the garbage"))
    }

    @Test func aSilentPeerIsDroppedAfterTheHandshakeTimeout() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let server = try server(directory, timeout: .milliseconds(200))
        defer { server.close() }
        let silent = try await Dialer.connect(to: server.address)
        let started = ContinuousClock.now
        // It gets at most an ERROR frame, then end-of-file; never a hang.
        let outcome = try await withTimeout("the server to drop the silent peer", .seconds(5)) {
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64, alignment: 1)
            defer { buffer.deallocate() }
            var total = 0
            while let count = try? await silent.read(into: buffer), count > 0 { total += count }
            return total
        }
        #expect(ContinuousClock.now - started >= .milliseconds(150))
        #expect(outcome >= 0)
        // The server counts the handshake as over just after it closes the connection.
        try await eventually("no handshake left in progress", timeout: .seconds(2)) { server.statistics.handshaking == 0 }
        silent.close()
    }

    @Test func aStaleAttemptCannotDisplaceANewerConnection() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let server = try server(directory)
        defer { server.close() }
        let host = try server.open(token: bytes("t"), direction: .receive)
        let newer = try await Dialer.connect(to: server.address)
        try await FrameIO.write(
            StreamAuthentication.sign(StreamHello(role: .guest, token: bytes("t"), receivedOffset: 0, attempt: 20), secret: host.secret).encoded,
            to: newer)
        let (prefix, _) = try await FrameIO.readFrame(newer)
        #expect(prefix.type == .hello)
        let older = try await Dialer.connect(to: server.address)
        try await FrameIO.write(
            StreamAuthentication.sign(StreamHello(role: .guest, token: bytes("t"), receivedOffset: 0, attempt: 10), secret: host.secret).encoded,
            to: older)
        try await expectRefusal(older, .staleAttempt)
        // The server answers a hello before it installs the connection: on a loaded run the
        // check came first (a fresh clone's full suite, once: the slot still empty). Connected,
        // then, and still connected after the refusal.
        try await eventually("the newer connection installed", timeout: .seconds(20)) { host.slot.phase == .connected }
        #expect(host.slot.phase == .connected)
        older.close()
        newer.close()
    }

    /// A host stream that gave up (its drain timeout) or was closed, its token still registered,
    /// must refuse the guest as a stream it no longer has. Accepting the handshake and then
    /// dropping the connection made the guest's every dial a success that ended at once: it
    /// redialled without a pause, for as long as the process lived (12,432 reconnects of one
    /// stdin in a soak, two processes' worth of CPU spinning).
    @Test(arguments: [false, true])
    func aStreamTheHostGaveUpOnIsRefusedNotAcceptedAndDropped(closedByTheApplication: Bool) async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let server = try server(directory)
        defer { server.close() }
        var configuration = ResumableConfiguration()
        configuration.drainTimeout = .milliseconds(200)
        let host = try server.open(token: bytes("stdin"), direction: .send, configuration: configuration)
        try await FrameIO.write(bytes("never read"), to: GuestSender(stream: host))
        if closedByTheApplication {
            host.close()
        } else {
            #expect(await host.finish() == 10, "nobody connected within the drain timeout: the stream gives up on its 10 bytes")
        }
        #expect(server.stream(for: bytes("stdin")) != nil, "the application has not forgotten the token")

        // A hello that proves the secret is refused as an unknown stream.
        let connection = try await Dialer.connect(to: server.address)
        try await FrameIO.write(
            StreamAuthentication.sign(StreamHello(role: .guest, token: bytes("stdin"), receivedOffset: 0, attempt: 1), secret: host.secret).encoded,
            to: connection)
        try await expectRefusal(connection, .unknownToken)
        connection.close()

        // The guest's own stream dials as its policy paces it, and never counts a connection.
        let guest = GuestStreams.resumable(to: server.address, token: bytes("stdin"), secret: host.secret, direction: .receive)
        defer { guest.close() }
        guest.slot.disconnect()  // starts its first redial cycle, as a broker's adoption does
        let reader = Task { for await _ in guest.chunks() {} }  // a relay reads all along
        defer { reader.cancel() }
        try await Task.sleep(for: .seconds(1))
        let statistics = guest.slot.statistics
        #expect(statistics.connects == 0, "\(guest.debugSummary)")
        #expect(statistics.dialAttempts <= 15, "one dial per 100 ms at most: \(statistics.dialAttempts) in 1 s")
    }
}

/// Lets FrameIO.write feed an OutboundStream in tests.
struct GuestSender: ByteWriter {
    let stream: ResumableStream<AsyncFD>
    func write(_ bytes: UnsafeRawBufferPointer) async throws(WriteFailure) {
        do {
            try await stream.send(bytes)
        } catch {
            throw WriteFailure(accepted: bytes.count - error.unsent, cause: error)
        }
    }
}
