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

/// A process in the guest can dial the host's stream listener (vsock is not namespaced) and read
/// docs/PROTOCOL.md: it knows the tokens (`ID-stdout`). It still cannot speak for a stream: every
/// hello must carry a proof under the stream's secret, which only the host and the broker hold.
/// Each attack below runs against a real daemon while a victim process streams both ways; the
/// attack is refused, and the victim's bytes arrive exactly, its stream never stalled.
@Suite("Attacks on resumable streams from inside the guest", .timeLimit(.minutes(5)))
struct StreamAttackTests {
    /// A victim: `cat` whose stdin the host types into, line by line, for the whole test, and
    /// whose stdout comes back. `attack` runs while it streams.
    func withVictim(
        _ attack: @escaping @Sendable (DaemonFixture, ResumableStream<AsyncFD>, ResumableStream<AsyncFD>) async throws -> Void
    ) async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let typed = try daemon.streams.open(token: bytes("victim-stdin"), direction: .send)
        let echoedStream = try daemon.streams.open(token: bytes("victim-stdout"), direction: .receive)
        let echoed = collect(echoedStream)
        _ = try await daemon.launch(ProcessSpec(
            id: "victim", argv: ["cat"], stdin: daemon.spec("victim-stdin"), stdout: daemon.spec("victim-stdout")))
        try await eventually("the victim's streams connected") { typed.slot.phase == .connected && echoedStream.slot.phase == .connected }
        let lines = expectedLines(300, prefix: "secret line")
        let typing = Task {
            for line in String(decoding: lines, as: UTF8.self).split(separator: "\n") {
                try await typed.send(bytes(line + "\n"))
                try await Task.sleep(for: .milliseconds(3))
            }
            return await typed.finish()
        }
        try await attack(daemon, typed, echoedStream)
        #expect(try await typing.value == 0, "every typed byte acknowledged by the victim's side")
        let report = try await daemon.wait("victim")
        #expect(report.exitCode == 0 && report.undelivered == 0)
        #expect(await echoed.value == lines, "the victim's output: every line, once, in order, nothing injected")
        #expect(try await daemon.stop() == .exited(0))
    }

    /// Dials the host's stream listener as a process in the guest would and says `hello`;
    /// returns the refusal (nil if the host answered with a hello) and anything else it got.
    func dialAndSay(_ daemon: DaemonFixture, _ hello: StreamHello, then frames: [UInt8] = []) async throws -> (refusal: StreamRefusal?, more: [UInt8]) {
        let socket = try await Dialer.connect(to: .unix(path: daemon.directory.file("streams.sock")))
        defer { socket.close() }
        try await FrameIO.write(hello.encoded + frames, to: socket)
        let (prefix, body) = try await withTimeout("the host's answer", .seconds(30)) { try await FrameIO.readFrame(socket) }
        // The host closes a connection it refused (and a hello it answered, we close).
        let more: [UInt8] = prefix.type != .error ? [] : try await withTimeout("the host to close", .seconds(30)) {
            var more: [UInt8] = []
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 8)
            defer { buffer.deallocate() }
            while let count = try? await socket.read(into: buffer), count > 0 { more += buffer[..<count] }
            return more
        }
        return (prefix.type == .error ? StreamRefusal.decode(prefix: prefix, body: body) : nil, more)
    }

    static let refusedLikeAnUnknownToken = StreamRefusal(code: .unknownToken, message: "unknown stream")

    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the broker drops to another user"))
    func stealingAVictimsStdinGetsNothing() async throws {
        try await withVictim { daemon, typed, _ in
            try await Task.sleep(for: .milliseconds(100))
            for attempt: UInt64 in [1, 1 << 40, .max] {
                let thief = StreamHello(role: .guest, token: bytes("victim-stdin"), receivedOffset: 0, attempt: attempt, nonce: StreamAuthentication.nonce())
                let (refusal, more) = try await dialAndSay(daemon, thief)
                #expect(refusal == Self.refusedLikeAnUnknownToken, "refused, saying nothing about the stream")
                #expect(more.isEmpty, "not one byte of the victim's stdin")
            }
            #expect(typed.statistics.refusedConnections == 3)
        }
    }

    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the broker drops to another user"))
    func injectingIntoAVictimsStdoutIsRefusedAndNothingArrives() async throws {
        try await withVictim { daemon, _, echoed in
            let forged = StreamHello(role: .guest, token: bytes("victim-stdout"), receivedOffset: 0, attempt: .max, nonce: StreamAuthentication.nonce())
            let injection = StreamFramePrefix(type: .data, bodyLength: 14, value: 0).encoded + bytes("forged output\n")
            let (refusal, _) = try await dialAndSay(daemon, forged, then: injection)
            #expect(refusal == Self.refusedLikeAnUnknownToken)
            // A guessed proof (all zeros, or random bytes) is no better.
            var guessed = forged
            guessed.proof = (0..<32).map { _ in UInt8.random(in: 0...255) }
            #expect(try await dialAndSay(daemon, guessed, then: injection).refusal == Self.refusedLikeAnUnknownToken)
            #expect(echoed.statistics.refusedConnections == 2)
        }
    }

    /// One hello with attempt 2^64−1 used to lock the stream out for good: the host then refused
    /// every real reconnect as stale. Now the attempt is recorded only for a verified hello.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the broker drops to another user"))
    func aHugeAttemptWithoutTheSecretLocksNothingOut() async throws {
        try await withVictim { daemon, typed, echoed in
            for token in ["victim-stdin", "victim-stdout"] {
                let lockout = StreamHello(role: .guest, token: bytes(token), receivedOffset: 0, attempt: .max, nonce: StreamAuthentication.nonce())
                #expect(try await dialAndSay(daemon, lockout).refusal == Self.refusedLikeAnUnknownToken)
            }
            // A migration: the victim's streams must be able to come back.
            daemon.streams.dropAllConnections()
            try await eventually("the victim's streams back") { typed.slot.phase == .connected && echoed.slot.phase == .connected }
        }
    }

    /// Someone who once saw a real hello (or holds an old one) replays it: its attempt is not
    /// newer than the one the host accepted, so it is refused, and the live connection stays.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the broker drops to another user"))
    func aReplayedHelloIsRefusedAndTheLiveConnectionStays() async throws {
        try await withVictim { daemon, typed, _ in
            // What a recording would hold: a hello signed with the stream's secret, from an
            // earlier attempt than the broker's current connection.
            let recorded = StreamAuthentication.sign(
                StreamHello(role: .guest, token: bytes("victim-stdin"), receivedOffset: 0, attempt: 1, nonce: StreamAuthentication.nonce()),
                secret: typed.secret)
            let (refusal, more) = try await dialAndSay(daemon, recorded)
            #expect(refusal?.code == .staleAttempt)
            #expect(more.isEmpty)
            #expect(typed.slot.phase == .connected, "the broker's connection was not displaced")
        }
    }

    /// A (verified) peer that claims to hold bytes never sent: refused, nothing acknowledged.
    /// Unverified, the same claim gets the unknown-token refusal and tells nothing of the length.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the broker drops to another user"))
    func anOffsetBeyondWhatWasSentIsRefused() async throws {
        try await withVictim { daemon, typed, _ in
            try await Task.sleep(for: .milliseconds(200))
            let unverified = StreamHello(role: .guest, token: bytes("victim-stdin"), receivedOffset: 1 << 30, attempt: .max, nonce: StreamAuthentication.nonce())
            #expect(try await dialAndSay(daemon, unverified).refusal == Self.refusedLikeAnUnknownToken)
            let buggy = StreamAuthentication.sign(
                StreamHello(role: .guest, token: bytes("victim-stdin"), receivedOffset: 1 << 30, attempt: .max - 1, nonce: StreamAuthentication.nonce()),
                secret: typed.secret)
            #expect(try await dialAndSay(daemon, buggy).refusal?.code == .offsetFromTheFuture)
            #expect(typed.statistics.acknowledged < 1 << 30, "nothing acknowledged by the claim")
            // A refused hello left the attempt where it was: the broker's next dial still counts.
            daemon.streams.dropAllConnections()
            try await eventually("the victim's stdin back") { typed.slot.phase == .connected }
        }
    }

    /// A second stream with a live token is refused wherever it would be made: at the host
    /// (`StreamServer.open`) and in the broker (a create or an adopt naming it), so no two
    /// streams' bytes are ever spliced together.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the broker drops to another user"))
    func aTokenInUseCannotBeTakenByAnotherProcess() async throws {
        try await withVictim { daemon, _, _ in
            #expect(throws: StreamServerError.tokenInUse("victim-stdout")) {
                _ = try daemon.streams.open(token: bytes("victim-stdout"), direction: .receive)
            }
            // A create that names the victim's token (with any secret) is refused by the broker
            // before anything is relayed; the process it started is ended.
            var reuse = daemon.spec("victim-stdout")
            reuse.secret = .random()
            await #expect(throws: HoldfastError.self) {
                _ = try await daemon.launch(ProcessSpec(id: "copycat", argv: ["sh", "-c", "echo spliced"], stdout: reuse))
            }
            let listed = try await daemon.status().processes.map(\.id)
            #expect(!listed.contains("copycat"), "\(listed)")
        }
    }
}
