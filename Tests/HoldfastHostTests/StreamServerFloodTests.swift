import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import NIOConcurrencyHelpers
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Every byte a host stream receives, up to its end.
private func everything(_ stream: some InboundStream) -> Task<[UInt8], Never> {
    Task {
        var all: [UInt8] = []
        for await chunk in stream.chunks() { all += chunk }
        return all
    }
}

@Suite("StreamServer under a flood of hostile connections", .timeLimit(.minutes(5)))
struct StreamServerFloodTests {
    /// Silent connections fill the handshakes (a guest process holding them, never saying hello;
    /// the handshake timeout longer than the test): a real stream's connection pushes out the
    /// oldest of them and delivers. The server closed the newcomer instead, so every redial of
    /// every stream was turned away while the flood held its place.
    @Test func aSilentFloodPushesOutItsOwnOldestNotARealStream() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let limit = 16
        let server = try StreamServer(listeningOn: .unix(path: directory.file("s.sock")), handshakeTimeout: .seconds(600), maxConcurrentHandshakes: limit)
        server.start()
        defer { server.close() }
        let host = try server.open(token: bytes("real"), direction: .receive)
        let received = everything(host)
        var silent: [AsyncFD] = []
        defer { for connection in silent { connection.close() } }
        for _ in 0..<(3 * limit) { silent.append(try await Dialer.connect(to: server.address)) }
        try await eventually("the oldest silent ones pushed out") { server.statistics.refused >= UInt64(2 * limit) }
        #expect(server.statistics.handshaking == limit)
        let guest = GuestStreams.resumable(to: server.address, token: bytes("real"), secret: host.secret, direction: .send)
        guest.slot.disconnect()  // starts its dialling
        let payload = bytes("the real stream's bytes\n")
        try await guest.send(payload)
        let undelivered = try await withTimeout("the real stream's finish", .seconds(20)) { await guest.finish() }
        #expect(undelivered == 0)
        #expect(try await withTimeout("the host's bytes", .seconds(20)) { await received.value } == payload)
        #expect(server.statistics.handshaking <= limit)
    }

    /// A guest process dialling the stream listener as fast as the host accepts (at most 200
    /// connections ahead of it, holding the newest 200), with room for 64 hellos at once: a
    /// real stream's connection, its hello sent with its connect as the broker does, is answered
    /// every time (five redials), never pushed out by the connections accepted after it. (Old
    /// code: reset, 5 of 5 runs. Looking at the hello only as the connection was accepted
    /// failed once in a loaded fresh clone, the test's hello a moment after its connect: the
    /// server now looks again before it pushes a connection out.)
    @Test func aFloodAsFastAsTheHostAcceptsNeverPushesOutARealHello() async throws {
        // In a test process of its own: the flood's thread and the accepts it drives load no
        // other test's pools and reactor, nor do theirs starve its real stream's hellos.
        guard try await isolated("aFloodAsFastAsTheHostAcceptsNeverPushesOutARealHello", timeout: .seconds(240)) else { return }
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let server = try StreamServer(listeningOn: .unix(path: directory.file("s.sock")), handshakeTimeout: .seconds(600), maxConcurrentHandshakes: 64)
        server.start()
        defer { server.close() }
        let host = try server.open(token: bytes("real"), direction: .receive)
        defer { host.close() }
        // Ended by `stop()` below; its own clock (10 minutes) is a backstop only. At 60 s it raced
        // a loaded run's five attempts, and "the flood still going" then waited for a flood over.
        let flooder = Flooder(path: directory.file("s.sock"), hold: 200, ahead: 200, seconds: 600) { Int(server.statistics.refused) }
        defer { flooder.stop() }
        try await eventually("the flood under way") { server.statistics.refused > 10_000 }
        for attempt in UInt64(1)...5 {
            let nonce = StreamAuthentication.nonce()
            let hello = StreamAuthentication.sign(
                StreamHello(role: .guest, token: bytes("real"), receivedOffset: 0, attempt: attempt, nonce: nonce), secret: host.secret)
            let (connection, _) = try connectSendingRedialling(directory.file("s.sock"), hello.encoded)
            defer { connection.close() }
            let answer = try await withTimeout("the host's hello, attempt \(attempt)", .seconds(30)) { try await Handshake.readHello(from: connection) }
            #expect(answer.role == .host && StreamAuthentication.verify(answer, secret: host.secret, challenge: nonce), "attempt \(attempt)")
        }
        let during = server.statistics.refused
        try await eventually("the flood still going after the last attempt") { server.statistics.refused > during + 1000 }
        #expect(flooder.stop() > 11_000)
        // The answers above are the property. That the hellos were told apart by the look before
        // the handshake read them is shown by at least one; not all five: a hello that lands
        // after its accept may be read by its own handshake before any push-out reaches it (CI
        // saw 4 of 5 once), and then it needed no look.
        let proven = server.provenEarly
        print("stream flood: \(proven) of 5 hellos proven before their handshake read them")
        #expect(proven >= 1, "the hellos were told apart before their handshakes read them")
    }

    /// Only a hello that proves it holds an open stream's secret waits apart: one signed with
    /// another secret, or for a token not open here, waits with the others (and is refused).
    @Test func onlyAHelloThatProvesItselfWaitsApart() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let server = try StreamServer(listeningOn: .unix(path: directory.file("s.sock")), handshakeTimeout: .seconds(600), maxConcurrentHandshakes: 64)
        defer { server.close() }
        let host = try server.open(token: bytes("real"), direction: .receive)
        defer { host.close() }
        func hello(_ token: String, _ secret: StreamSecret) -> [UInt8] {
            StreamAuthentication.sign(
                StreamHello(role: .guest, token: bytes(token), receivedOffset: 0, attempt: 1, nonce: StreamAuthentication.nonce()), secret: secret
            ).encoded
        }
        // All three wait in the backlog, hellos sent, before the server accepts anything.
        var connections: [AsyncFD] = []
        defer { for connection in connections { connection.close() } }
        for message in [hello("real", .random()), hello("nobody", host.secret), hello("real", host.secret)] {
            let connection = try await Dialer.connect(to: server.address)
            try await send(connection, message)
            connections.append(connection)
        }
        server.start()
        try await eventually("the two false ones refused") { server.statistics.refused == 2 }
        #expect(server.provenEarly == 1)
        let real = connections[2]
        let answer = try await withTimeout("the host's hello") { try await Handshake.readHello(from: real) }
        #expect(answer.role == .host)
    }

    /// 10,000 connection attempts in bursts of 500 — closed at once, garbage, a wrong token, a
    /// hello with an offset from the future, silent until cut off — while a real stream carries
    /// 8 MiB. The real stream delivers every byte (sha256), every hostile connection is refused
    /// or dropped, no handshake is left, and the process's fds are back at the baseline.
    @Test func tenThousandHostileConnectionsLeaveTheRealStreamAndNoFdsBehind() async throws {
        guard try await isolated("tenThousandHostileConnectionsLeaveTheRealStreamAndNoFdsBehind") else { return }
        _ = Reactor.shared
        _ = ForeignCloser.shared  // its queue (a pipe): made before the count, as refused fds go to it
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        // The concurrency runtime opens timer fds of its own as it needs them: not ours to count.
        func ours() -> [Int32: String] { descriptorTable().filter { $0.value != "anon_inode:[timerfd]" } }
        let before = ours()
        let residentBefore = ProcessFigures.residentKiB()
        do {
            let server = try StreamServer(
                listeningOn: .unix(path: directory.file("s.sock")), handshakeTimeout: .milliseconds(300), maxConcurrentHandshakes: 1024)
            server.start()
            defer { server.close() }
            let host = try server.open(token: bytes("real"), direction: .receive)
            let received = everything(host)
            let guest = GuestStreams.resumable(to: server.address, token: bytes("real"), secret: host.secret, direction: .send)
            guest.slot.disconnect()
            var random = SeededRandom(seed: 0x10_000)
            let payload = (0..<(8 << 20)).map { _ in UInt8.random(in: 0...255, using: &random) }
            let sender = Task {
                for start in stride(from: 0, to: payload.count, by: 64 * 1024) {
                    try await guest.send(Array(payload[start..<min(start + 64 * 1024, payload.count)]))
                }
                return await guest.finish()
            }

            let kinds = NIOLockedValueBox<[String: Int]>([:])
            for burst in 0..<20 {
                await withTaskGroup(of: Void.self) { group in
                    for index in 0..<500 {
                        group.addTask {
                            let kind = (burst * 500 + index) % 5
                            guard let connection = try? await Dialer.connect(to: server.address, timeout: .seconds(5)) else {
                                kinds.withLockedValue { $0["dial failed", default: 0] += 1 }
                                return
                            }
                            defer { connection.close() }
                            switch kind {
                            case 0:
                                kinds.withLockedValue { $0["closed at once", default: 0] += 1 }
                            case 1:
                                try? await send(connection, Array(repeating: 0xFF, count: 64))
                                kinds.withLockedValue { $0["garbage", default: 0] += 1 }
                            case 2:
                                try? await send(connection, StreamHello(role: .guest, token: bytes("nobody"), receivedOffset: 0, attempt: 1).encoded)
                                kinds.withLockedValue { $0["wrong token", default: 0] += 1 }
                            case 3:
                                try? await send(connection, StreamHello(role: .guest, token: bytes("real"), receivedOffset: 1 << 40, attempt: 1).encoded)
                                kinds.withLockedValue { $0["future offset", default: 0] += 1 }
                            default:
                                // Silent: wait to be cut off by the handshake timeout (or the cap).
                                _ = try? await readAll(connection, limit: 4096)
                                kinds.withLockedValue { $0["silent", default: 0] += 1 }
                            }
                            if kind != 4 { _ = try? await readAll(connection, limit: 4096) }
                        }
                    }
                }
            }
            #expect(try await sender.value == 0, "every byte of the real stream acknowledged")
            let got = await received.value
            #expect(got.count == payload.count)
            #expect(sha256Hex(got) == sha256Hex(payload))
            try await eventually("no handshake left") { server.statistics.handshaking == 0 }
            let stats = server.statistics
            print("flood: \(kinds.withLockedValue { $0 }); server accepted \(stats.accepted), refused \(stats.refused)")
            #expect(kinds.withLockedValue { $0.values.reduce(0, +) } == 10_000)
            #expect(stats.accepted >= 10_000)
            #expect(stats.refused >= 6_000, "garbage, wrong tokens, future offsets are refused")
            guest.close()
            server.close()
        }
        do {
            try await eventually("fds back at the baseline") { ours().count == before.count }
        } catch {
            Issue.record("fds \(before.count) → \(ours().count); new: \(descriptorsAdded(before, ours()))")
        }
        let residentAfter = ProcessFigures.residentKiB()
        print("flood: RSS \(residentBefore) KiB → \(residentAfter) KiB")
    }
}
