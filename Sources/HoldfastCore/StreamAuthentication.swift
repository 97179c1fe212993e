import Crypto
import HoldfastProtocol

/// Proofs in stream hellos (docs/PROTOCOL.md, "Authentication"): HMAC-SHA256 under the stream's
/// secret of what the hello says, so that only the host and the broker — the two holders of the
/// secret — can open a connection for a stream.
///
/// - The guest's proof covers its hello: received offset, role, attempt, token and its fresh
///   nonce. A replay of a recorded guest hello carries an attempt the host has already seen
///   (`staleAttempt`); a hello with a guessed token or made-up attempt does not verify.
/// - The host's proof covers its hello and the guest's nonce of this connection, so a recorded
///   host answer is worth nothing on the next connection.
///
/// Checking is constant-time (swift-crypto's `isValidAuthenticationCode`).
public enum StreamAuthentication {
    /// Domain separation from any other use of the secret.
    static let label = Array("holdfast stream hello v2".utf8)

    /// What the proof of `hello` covers; `challenge` is the guest's nonce when `hello` is the host's.
    static func message(_ hello: StreamHello, challenge: [UInt8]?) -> [UInt8] {
        var message = label
        message += (0..<8).map { UInt8(truncatingIfNeeded: hello.receivedOffset >> (56 - 8 * $0)) }
        message += hello.authenticatedBody
        if let challenge { message += challenge }
        return message
    }

    /// Returns `hello` with its proof filled in.
    public static func sign(_ hello: StreamHello, secret: StreamSecret, challenge: [UInt8]? = nil) -> StreamHello {
        var signed = hello
        let key = SymmetricKey(data: secret.bytes)
        signed.proof = Array(HMAC<SHA256>.authenticationCode(for: message(hello, challenge: challenge), using: key))
        return signed
    }

    /// True when `hello`'s proof was made with `secret` (and, for a host hello, over `challenge`).
    public static func verify(_ hello: StreamHello, secret: StreamSecret, challenge: [UInt8]? = nil) -> Bool {
        HMAC<SHA256>.isValidAuthenticationCode(
            hello.proof, authenticating: message(hello, challenge: challenge), using: SymmetricKey(data: secret.bytes))
    }

    /// Spends about the time of a `verify`, for hellos that name no stream here: an unknown token
    /// and a wrong proof take the same path.
    public static func verifyNothing(_ hello: StreamHello) {
        _ = verify(hello, secret: decoy)
    }

    private static let decoy = StreamSecret.random()

    /// A fresh nonce from the system's random source.
    public static func nonce() -> [UInt8] {
        var generator = SystemRandomNumberGenerator()
        var bytes: [UInt8] = []
        while bytes.count < StreamHello.nonceLength {
            let word = generator.next()
            for shift in stride(from: 0, to: 64, by: 8) { bytes.append(UInt8(truncatingIfNeeded: word >> UInt64(shift))) }
        }
        return Array(bytes.prefix(StreamHello.nonceLength))
    }
}
