import Crypto
import HoldfastProtocol

/// The bridge's mutual authentication (docs/PROTOCOL.md, "Bridge authentication"): before the
/// hello, each end proves it holds the bridge key with an HMAC-SHA256 over both ends' fresh
/// nonces. The host's nonce is new on every connection, so a recorded guest handshake replayed
/// to the host fails, and the guest's is too, so a recorded host answer replayed to the guest
/// fails. Proofs are compared in constant time (swift-crypto's `isValidAuthenticationCode`).
///
/// Neither end says anything but these fixed-size messages until the peer has proved itself:
/// the guest sends its hello only after the host's proof checked out (with its own proof, not
/// waiting for the verdict: one round trip fewer on every reconnect), and the host reads the
/// hello only after the guest's proof checked out.
public enum BridgeHandshake {
    /// Why a handshake failed. The descriptions are for the log of the side that saw it; the
    /// peer learns no more than "refused" (or a closed connection).
    public enum Failure: Error, Sendable, Equatable, CustomStringConvertible {
        /// The peer's first bytes are not the handshake (or a version or method we do not know).
        case malformed(BridgeHandshakeWire.Malformed)
        /// The peer's proof does not match ours: it does not hold the key, or it replays a
        /// recorded handshake.
        case wrongProof
        /// (Guest) the host did not accept our proof.
        case refused
        /// The connection ended or failed during the handshake.
        case connectionLost

        public var description: String {
            switch self {
            case .malformed(let problem): "\(problem)"
            case .wrongProof: "the peer's proof is wrong: it does not hold the bridge key, or it replays an old handshake"
            case .refused: "the host refused our proof: the bridge key differs from the host's"
            case .connectionLost: "the connection ended during the authentication handshake"
            }
        }
    }

    /// 32 bytes from the kernel's random source (`getrandom(2)`, through the standard library's
    /// system generator).
    public static func makeNonce() -> [UInt8] {
        var generator = SystemRandomNumberGenerator()
        return (0..<BridgeHandshakeWire.nonceSize).map { _ in UInt8.random(in: .min ... .max, using: &generator) }
    }

    /// A guest nonce that vouches for its connection (`BridgeHandshakeWire`): 16 random bytes
    /// and the first 16 of their HMAC under the key. Still new every time (the random half is),
    /// so nothing of the handshake's replay protection changes; but a host can tell from the
    /// challenge alone, before it answers, that the dialler holds the key — which a flood of
    /// connections from a guest process without it cannot fake.
    public static func makeGuestNonce(key: BridgeKey) -> [UInt8] {
        var generator = SystemRandomNumberGenerator()
        let random = (0..<BridgeHandshakeWire.voucherSize).map { _ in UInt8.random(in: .min ... .max, using: &generator) }
        return random + voucher(key: key, random)
    }

    /// Whether `nonce` carries the key's voucher (compared in constant time). A guest that
    /// predates vouchers sends a random nonce, which fails this but still authenticates.
    public static func nonceIsVouched(_ nonce: [UInt8], key: BridgeKey) -> Bool {
        let half = BridgeHandshakeWire.voucherSize
        guard nonce.count == BridgeHandshakeWire.nonceSize else { return false }
        let expected = voucher(key: key, Array(nonce[..<half]))
        var difference: UInt8 = 0
        for index in 0..<half { difference |= expected[index] ^ nonce[half + index] }
        return difference == 0
    }

    static func voucher(key: BridgeKey, _ random: [UInt8]) -> [UInt8] {
        Array(mac(key, BridgeHandshakeWire.voucherLabel + random).prefix(BridgeHandshakeWire.voucherSize))
    }

    public static func hostProof(key: BridgeKey, guestNonce: [UInt8], hostNonce: [UInt8]) -> [UInt8] {
        mac(key, BridgeHandshakeWire.hostLabel + guestNonce + hostNonce)
    }

    public static func guestProof(key: BridgeKey, hostNonce: [UInt8], guestNonce: [UInt8]) -> [UInt8] {
        mac(key, BridgeHandshakeWire.guestLabel + hostNonce + guestNonce)
    }

    /// The guest's side, right after it dialled, for a guest with nothing to send before the
    /// verdict: `proveToHost`, then `receiveVerdict`.
    public static func authenticateHost(
        on connection: some ByteConnection, key: BridgeKey, guestNonce: [UInt8]? = nil
    ) async throws(Failure) {
        try await proveToHost(on: connection, key: key, guestNonce: guestNonce)
        try await receiveVerdict(on: connection)
    }

    /// The guest's first part: sends the challenge, checks the host's proof, sends ours.
    /// Returns once the host has proved it holds the key: the guest may send its hello at once
    /// (the host reads it only if our proof checks out), then must read the verdict. On any
    /// failure nothing more has been sent (after a wrong host proof, not even ours); the caller
    /// closes. The nonce vouches for the connection (`makeGuestNonce`) unless one is given.
    public static func proveToHost(
        on connection: some ByteConnection, key: BridgeKey, guestNonce: [UInt8]? = nil
    ) async throws(Failure) {
        let guestNonce = guestNonce ?? makeGuestNonce(key: key)
        try await send(BridgeHandshakeWire.Challenge(guestNonce: guestNonce).encoded, on: connection)
        let answer: BridgeHandshakeWire.Answer
        let answerBytes = try await receive(BridgeHandshakeWire.answerSize, on: connection)
        do {
            answer = try BridgeHandshakeWire.Answer.decode(answerBytes)
        } catch {
            throw .malformed(error)
        }
        guard verify(answer.hostProof, key: key, message: BridgeHandshakeWire.hostLabel + guestNonce + answer.hostNonce) else {
            throw .wrongProof
        }
        try await send(guestProof(key: key, hostNonce: answer.hostNonce, guestNonce: guestNonce), on: connection)
    }

    /// The guest's second part: the host's verdict on our proof.
    public static func receiveVerdict(on connection: some ByteConnection) async throws(Failure) {
        let verdict: BridgeHandshakeWire.Verdict
        let verdictBytes = try await receive(BridgeHandshakeWire.verdictSize, on: connection)
        do {
            verdict = try BridgeHandshakeWire.Verdict.decode(verdictBytes)
        } catch {
            throw .malformed(error)
        }
        guard verdict == .accepted else { throw .refused }
    }

    /// The host's side, right after it accepted a connection. Returns once the guest has proved
    /// it holds the key (and has been told so); the next bytes are its hello. On a wrong proof
    /// or a malformed challenge the refused verdict has been sent; the caller closes.
    /// `challenged` receives the guest's nonce as soon as it is read, before the answer (the
    /// server admits a connection whose nonce vouches for it apart from a flood).
    public static func authenticateGuest(
        on connection: some ByteConnection, key: BridgeKey, hostNonce: [UInt8] = makeNonce(),
        challenged: (@Sendable ([UInt8]) -> Void)? = nil
    ) async throws(Failure) {
        let challenge: BridgeHandshakeWire.Challenge
        let challengeBytes = try await receive(BridgeHandshakeWire.challengeSize, on: connection)
        do {
            challenge = try BridgeHandshakeWire.Challenge.decode(challengeBytes)
        } catch {
            try? await send(BridgeHandshakeWire.Verdict.refused.encoded, on: connection)
            throw .malformed(error)
        }
        let guestNonce = challenge.guestNonce
        challenged?(guestNonce)
        let answer = BridgeHandshakeWire.Answer(
            hostNonce: hostNonce, hostProof: hostProof(key: key, guestNonce: guestNonce, hostNonce: hostNonce))
        try await send(answer.encoded, on: connection)
        let proof = try await receive(BridgeHandshakeWire.proofSize, on: connection)
        guard verify(proof, key: key, message: BridgeHandshakeWire.guestLabel + hostNonce + guestNonce) else {
            try? await send(BridgeHandshakeWire.Verdict.refused.encoded, on: connection)
            throw .wrongProof
        }
        try await send(BridgeHandshakeWire.Verdict.accepted.encoded, on: connection)
    }

    // MARK: Internals

    private static func mac(_ key: BridgeKey, _ message: [UInt8]) -> [UInt8] {
        Array(HMAC<SHA256>.authenticationCode(for: message, using: SymmetricKey(data: key.bytes)))
    }

    /// Constant time in the proof's bytes: swift-crypto compares the whole code.
    private static func verify(_ proof: [UInt8], key: BridgeKey, message: [UInt8]) -> Bool {
        HMAC<SHA256>.isValidAuthenticationCode(proof, authenticating: message, using: SymmetricKey(data: key.bytes))
    }

    private static func send(_ bytes: [UInt8], on connection: some ByteConnection) async throws(Failure) {
        do {
            try await FrameIO.write(bytes, to: connection)
        } catch {
            throw .connectionLost
        }
    }

    private static func receive(_ count: Int, on connection: some ByteConnection) async throws(Failure) -> [UInt8] {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 1)
        defer { buffer.deallocate() }
        do {
            try await FrameIO.readExactly(connection, into: buffer)
        } catch {
            throw .connectionLost
        }
        return Array(buffer)
    }
}
