import HoldfastCore
import HoldfastProtocol
import HoldfastTestSupport
import Testing

/// The bridge's mutual authentication over an in-memory connection: who proves what, what a
/// peer without the key, with another key, or replaying a recorded handshake gets.
@Suite("Bridge authentication: the handshake", .timeLimit(.minutes(5)))
struct BridgeHandshakeTests {
    static let key = try! BridgeKey(bytes: Array(0..<32))

    /// Reads whatever `end` receives until the other end closes (bounded).
    func drain(_ end: MemoryPipe.End) async throws -> [UInt8] {
        try await withTimeout("end of stream") { try await readAll(end) }
    }

    /// Known answers (docs/PROTOCOL.md has the same vector): key 00..1f, guest nonce 20..3f,
    /// host nonce 40..5f; computed independently with Python's hmac module.
    @Test func proofsMatchTheDocumentedVector() throws {
        let guestNonce = Array(UInt8(0x20)..<0x40)
        let hostNonce = Array(UInt8(0x40)..<0x60)
        #expect(hex(BridgeHandshake.hostProof(key: Self.key, guestNonce: guestNonce, hostNonce: hostNonce))
            == "0e7dd8ce48faa74078c41cf7556d00490dcc819ded68f3a272cbfe1a9b126894")
        #expect(hex(BridgeHandshake.guestProof(key: Self.key, hostNonce: hostNonce, guestNonce: guestNonce))
            == "2b68339f79025118befb9f9e9968aef63c14432ee71e61faeba5638b7662efc1")
    }

    /// The voucher's known answer (docs/PROTOCOL.md has it too): key 00..1f, random half
    /// 20..2f; the first 16 bytes of the HMAC computed independently with Python's hmac module.
    @Test func theVoucherMatchesTheDocumentedVector() {
        let vouched = Array(UInt8(0x20)..<0x30) + unhex("cf13d88da06fbe48df56dd3c0d2dd599")
        #expect(BridgeHandshake.nonceIsVouched(vouched, key: Self.key))
        for index in vouched.indices {
            var changed = vouched
            changed[index] ^= 0x01
            #expect(!BridgeHandshake.nonceIsVouched(changed, key: Self.key), "byte \(index) changed")
        }
        #expect(!BridgeHandshake.nonceIsVouched(vouched, key: BridgeKey.generate()), "another key")
        #expect(!BridgeHandshake.nonceIsVouched(Array(vouched.prefix(31)), key: Self.key))
    }

    /// A guest's nonce vouches for it under its key only, and is new every time (its random
    /// half is): the handshake's replay protection is what it was. A random nonce (a guest that
    /// predates vouchers) does not vouch, and still authenticates.
    @Test func aGuestNonceVouchesUnderItsKeyOnlyAndIsNewEveryTime() async throws {
        let nonces = (0..<100).map { _ in BridgeHandshake.makeGuestNonce(key: Self.key) }
        #expect(Set(nonces).count == 100 && Set(nonces.map { $0.prefix(16) }).count == 100)
        #expect(nonces.allSatisfy { $0.count == 32 && BridgeHandshake.nonceIsVouched($0, key: Self.key) })
        #expect(!nonces.contains { BridgeHandshake.nonceIsVouched($0, key: BridgeKey.generate()) })
        #expect(!(0..<100).contains { _ in BridgeHandshake.nonceIsVouched(BridgeHandshake.makeNonce(), key: Self.key) })
        let (guest, host) = MemoryPipe().ends
        let outcome = hostSide(host)
        try await BridgeHandshake.authenticateHost(on: guest, key: Self.key, guestNonce: BridgeHandshake.makeNonce())
        #expect(await outcome.value == nil, "an old guest's random nonce authenticates as before")
    }

    @Test func bothEndsWithTheKeyAuthenticateAndTheNextBytesAreTheHello() async throws {
        let (guest, host) = MemoryPipe().ends
        let outcome = hostSide(host)
        try await BridgeHandshake.authenticateHost(on: guest, key: Self.key)
        #expect(await outcome.value == nil)
        try await FrameIO.write(bytes("hello"), to: guest)
        #expect(try await readExactly(host, 5) == bytes("hello"), "nothing of the handshake is left unread")
    }

    @Test func everyConnectionHasFreshNonces() {
        let nonces = (0..<100).map { _ in BridgeHandshake.makeNonce() }
        #expect(Set(nonces).count == 100)
        #expect(nonces.allSatisfy { $0.count == 32 })
    }

    /// The host's side as a task, reporting how it ended.
    func hostSide(_ host: MemoryPipe.End, key: BridgeKey = key) -> Task<BridgeHandshake.Failure?, Never> {
        Task {
            do throws(BridgeHandshake.Failure) {
                try await BridgeHandshake.authenticateGuest(on: host, key: key)
                return nil
            } catch {
                host.close()  // as BridgeServer does
                return error
            }
        }
    }

    /// A guest without the key: the host's proof does not verify, and the guest sends nothing
    /// after its challenge (no proof, no hello).
    @Test func aGuestWithAnotherKeyRefusesTheHostAndSendsNothingMore() async throws {
        let (guest, host) = MemoryPipe().ends
        let outcome = hostSide(host)
        await #expect(throws: BridgeHandshake.Failure.wrongProof) {
            try await BridgeHandshake.authenticateHost(on: guest, key: BridgeKey.generate())
        }
        guest.close()
        #expect(await outcome.value == .connectionLost, "the host never got a proof")
    }

    /// A guest with a wrong proof (it skips checking the host, as an attacker would): refused,
    /// and told no more than the refused verdict.
    @Test func aWrongGuestProofIsRefusedWithTheVerdictOnly() async throws {
        let (guest, host) = MemoryPipe().ends
        let outcome = hostSide(host)
        let guestNonce = BridgeHandshake.makeNonce()
        try await FrameIO.write(BridgeHandshakeWire.Challenge(guestNonce: guestNonce).encoded, to: guest)
        let answer = try BridgeHandshakeWire.Answer.decode(try await readExactly(guest, BridgeHandshakeWire.answerSize))
        let forged = BridgeHandshake.guestProof(key: BridgeKey.generate(), hostNonce: answer.hostNonce, guestNonce: guestNonce)
        try await FrameIO.write(forged + bytes("a hello"), to: guest)
        #expect(await outcome.value == .wrongProof)
        #expect(try await drain(guest) == BridgeHandshakeWire.Verdict.refused.encoded)
    }

    /// A guest handshake recorded off the wire (challenge, then proof), replayed on a new
    /// connection: the host's nonce is new, so the recorded proof does not match it.
    @Test func aReplayedGuestHandshakeIsRefused() async throws {
        let guestNonce = BridgeHandshake.makeNonce()
        let challenge = BridgeHandshakeWire.Challenge(guestNonce: guestNonce).encoded
        let (recordedGuest, recordedHost) = MemoryPipe().ends
        let recording = hostSide(recordedHost)
        try await FrameIO.write(challenge, to: recordedGuest)
        let answer = try BridgeHandshakeWire.Answer.decode(try await readExactly(recordedGuest, BridgeHandshakeWire.answerSize))
        let proof = BridgeHandshake.guestProof(key: Self.key, hostNonce: answer.hostNonce, guestNonce: guestNonce)
        try await FrameIO.write(proof, to: recordedGuest)
        #expect(await recording.value == nil, "the recorded handshake itself was good")

        let (replayer, host) = MemoryPipe().ends
        let outcome = hostSide(host)
        try await FrameIO.write(challenge, to: replayer)
        let fresh = try BridgeHandshakeWire.Answer.decode(try await readExactly(replayer, BridgeHandshakeWire.answerSize))
        #expect(fresh.hostNonce != answer.hostNonce)
        try await FrameIO.write(proof, to: replayer)
        #expect(await outcome.value == .wrongProof)
        #expect(try await drain(replayer) == BridgeHandshakeWire.Verdict.refused.encoded)
    }

    /// An impostor host replaying a recorded host answer to the guest: the guest's nonce is new,
    /// so the recorded proof does not match; the guest sends nothing after its challenge.
    @Test func aReplayedHostAnswerIsRefusedByTheGuest() async throws {
        let (recordedGuest, recordedHost) = MemoryPipe().ends
        let recording = hostSide(recordedHost)
        let oldNonce = BridgeHandshake.makeNonce()
        try await FrameIO.write(BridgeHandshakeWire.Challenge(guestNonce: oldNonce).encoded, to: recordedGuest)
        let recordedAnswer = try await readExactly(recordedGuest, BridgeHandshakeWire.answerSize)
        recordedGuest.close()
        _ = await recording.value

        let (guest, impostor) = MemoryPipe().ends
        let replay = Task {
            let challenge = try await readExactly(impostor, BridgeHandshakeWire.challengeSize)
            try await FrameIO.write(recordedAnswer, to: impostor)
            let after = try await readAll(impostor)
            return (challenge, after)
        }
        await #expect(throws: BridgeHandshake.Failure.wrongProof) {
            try await BridgeHandshake.authenticateHost(on: guest, key: Self.key)
        }
        guest.close()
        let (challenge, after) = try await replay.value
        #expect(Array(challenge.suffix(32)) != oldNonce, "the guest's nonce is fresh")
        #expect(after.isEmpty, "the guest sent the impostor nothing after its challenge")
    }

    /// A peer that does not speak the handshake (a guest configured with authentication none
    /// sends its hello at once): refused at its first bytes.
    @Test func aHelloInsteadOfAChallengeIsRefused() async throws {
        let (guest, host) = MemoryPipe().ends
        let outcome = hostSide(host)
        let hello = ControlFrame(
            type: BridgeMessageType.hello.rawValue, id: 0,
            body: ControlJSON.encode(BridgeHello(bootID: "b", processes: [], exits: [])))
        try await FrameIO.write(hello.encoded, to: guest)
        #expect(await outcome.value == .malformed(.notAHandshake))
        #expect(try await drain(guest) == BridgeHandshakeWire.Verdict.refused.encoded)
    }

    @Test func anotherVersionOrMethodIsRefused() async throws {
        for (byte, value, expected) in [
            (4, UInt8(2), BridgeHandshake.Failure.malformed(.unsupportedVersion(2))),
            (5, UInt8(9), BridgeHandshake.Failure.malformed(.unsupportedMethod(9))),
        ] {
            let (guest, host) = MemoryPipe().ends
            let outcome = hostSide(host)
            var challenge = BridgeHandshakeWire.Challenge(guestNonce: BridgeHandshake.makeNonce()).encoded
            challenge[byte] = value
            try await FrameIO.write(challenge, to: guest)
            #expect(await outcome.value == expected)
        }
    }

    /// The guest learns that the host refused it (a key that differs from the host's).
    @Test func aGuestRefusedByTheHostIsToldSo() async throws {
        let (guest, impostor) = MemoryPipe().ends
        let guestKey = BridgeKey.generate()
        // A host that holds the guest's key for its own proof but refuses the guest anyway.
        let host = Task {
            let challenge = try BridgeHandshakeWire.Challenge.decode(try await readExactly(impostor, BridgeHandshakeWire.challengeSize))
            let hostNonce = BridgeHandshake.makeNonce()
            let proof = BridgeHandshake.hostProof(key: guestKey, guestNonce: challenge.guestNonce, hostNonce: hostNonce)
            try await FrameIO.write(BridgeHandshakeWire.Answer(hostNonce: hostNonce, hostProof: proof).encoded, to: impostor)
            _ = try await readExactly(impostor, BridgeHandshakeWire.proofSize)
            try await FrameIO.write(BridgeHandshakeWire.Verdict.refused.encoded, to: impostor)
        }
        await #expect(throws: BridgeHandshake.Failure.refused) {
            try await BridgeHandshake.authenticateHost(on: guest, key: guestKey)
        }
        try await host.value
    }

    /// What either side reads is bounded and exact: a peer that stops half way is a lost
    /// connection, never a hang past the caller's timeout, never a crash.
    @Test func aHandshakeCutShortIsALostConnection() async throws {
        for length in [0, 7, 39] {
            let (guest, host) = MemoryPipe().ends
            let outcome = hostSide(host)
            try await FrameIO.write(Array(BridgeHandshakeWire.Challenge(guestNonce: BridgeHandshake.makeNonce()).encoded.prefix(length)), to: guest)
            guest.close()
            #expect(await outcome.value == .connectionLost)
        }
    }

    private func hex(_ bytes: [UInt8]) -> String {
        bytes.map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
    }

    private func unhex(_ text: String) -> [UInt8] {
        let digits = Array(text.utf8)
        return stride(from: 0, to: digits.count, by: 2).map { UInt8(String(decoding: digits[$0..<$0 + 2], as: UTF8.self), radix: 16)! }
    }
}
