/// The resumable stream protocol's frames (docs/PROTOCOL.md, "Resumable streams").
///
/// Every frame starts with the same 16-byte prefix, big-endian:
///
///     0  u8   type
///     1  u8   flags     (0)
///     2  u16  reserved  (0)
///     4  u32  body length (bytes after the prefix)
///     8  u64  value     (an offset; for ERROR the code)
///    16  ...  body
///
/// A fixed prefix means a reader always asks for exactly 16 bytes first, then the body, and a
/// data frame's bytes can be read straight into the caller's buffer.
public enum StreamFrameType: UInt8, Sendable, CaseIterable {
    /// First frame each way after a connect: who I am, and how much of your data I have.
    case hello = 1
    /// `value` is the stream offset of the body's first byte.
    case data = 2
    /// Cumulative acknowledgement: every byte before `value` was received.
    case ack = 3
    /// Explicit end-of-stream: the sender's stream ends at offset `value`.
    case end = 4
    /// A refusal (`value` is the code; the body a UTF-8 message); the connection closes after it.
    case error = 5
    /// From a sender: the bytes from the receiver's offset up to `value` no longer exist (they
    /// were lost with a crashed relay, docs/PROTOCOL.md "Gaps"); data goes on at `value`. Only
    /// on a connection where one side said in its hello that it restarted.
    case gap = 6
}

public struct StreamFramePrefix: Sendable, Equatable {
    public static let size = 16
    /// Largest body accepted per type: anything bigger is a protocol error, not an allocation.
    public static let maxDataBody = 1 << 20
    public static let maxHelloBody = 512
    public static let maxErrorBody = 1024

    public var type: StreamFrameType
    public var bodyLength: Int
    public var value: UInt64

    public init(type: StreamFrameType, bodyLength: Int, value: UInt64) {
        self.type = type
        self.bodyLength = bodyLength
        self.value = value
    }

    /// Writes the prefix into the first 16 bytes of `buffer`.
    public func encode(into buffer: UnsafeMutableRawBufferPointer) {
        precondition(buffer.count >= Self.size)
        buffer[0] = type.rawValue
        buffer[1] = 0
        buffer[2] = 0
        buffer[3] = 0
        buffer.storeBytes(of: UInt32(bodyLength).bigEndian, toByteOffset: 4, as: UInt32.self)
        buffer.storeBytes(of: value.bigEndian, toByteOffset: 8, as: UInt64.self)
    }

    public var encoded: [UInt8] {
        var bytes = [UInt8](repeating: 0, count: Self.size)
        bytes.withUnsafeMutableBytes { encode(into: $0) }
        return bytes
    }

    /// Decodes and validates a prefix: known type, zero flags and reserved bits, a body length
    /// within the type's limit.
    public static func decode(_ bytes: UnsafeRawBufferPointer) throws(StreamProtocolError) -> StreamFramePrefix {
        guard bytes.count >= size else { throw .truncated }
        guard let type = StreamFrameType(rawValue: bytes[0]) else { throw .unknownFrameType(bytes[0]) }
        guard bytes[1] == 0, bytes[2] == 0, bytes[3] == 0 else { throw .malformed("non-zero flags or reserved bits") }
        let length = Int(UInt32(bigEndian: bytes.loadUnaligned(fromByteOffset: 4, as: UInt32.self)))
        let value = UInt64(bigEndian: bytes.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
        let limit: Int
        switch type {
        case .data: limit = maxDataBody
        case .hello: limit = maxHelloBody
        case .error: limit = maxErrorBody
        case .ack, .end, .gap: limit = 0
        }
        guard length <= limit else { throw .oversized(type: type, length: length, limit: limit) }
        if type == .data, length == 0 { throw .malformed("empty data frame") }
        return StreamFramePrefix(type: type, bodyLength: length, value: value)
    }
}

/// Which end of a stream a hello comes from.
public enum StreamRole: UInt8, Sendable {
    case guest = 0
    case host = 1
}

/// The hello each side sends first on every connection.
///
/// Body: magic "HFST", version u16, role u8, flags u8 (bit 0: restarted), attempt u64, token length u16,
/// token bytes, nonce (16 bytes), proof (32 bytes). The prefix's value is the sender's
/// *received offset*: how many bytes of the peer's data it holds. Each side then replays from
/// the offset the other reported.
///
/// `attempt` orders the dialer's connections: it grows with every dial, so when two connections
/// of one stream race through a slow accepting side, the older can never displace the newer.
///
/// `proof` is an HMAC-SHA256 under the stream's secret of everything else the hello says (and,
/// from the host, of the guest's nonce): only the host and the broker can make one
/// (`StreamAuthentication` in HoldfastCore; docs/PROTOCOL.md, "Authentication").
public struct StreamHello: Sendable, Equatable {
    public static let magic: [UInt8] = Array("HFST".utf8)
    /// 2: hellos carry a nonce and a proof. A version-1 hello is refused (`unsupportedVersion`).
    public static let version: UInt16 = 2
    public static let maxTokenLength = 256
    public static let nonceLength = 16
    public static let proofLength = 32
    static let restartedFlag: UInt8 = 1

    public var version: UInt16
    public var role: StreamRole
    public var attempt: UInt64
    public var token: [UInt8]
    public var receivedOffset: UInt64
    /// Fresh random bytes of this connection's sender.
    public var nonce: [UInt8]
    /// The sender's proof that it holds the stream's secret.
    public var proof: [UInt8]
    /// This end is a new incarnation of a relay that crashed: it resumed from its checkpoint, so
    /// a gap may follow (a GAP frame, either way). Flag bit 0 of the hello's fourth byte.
    public var restarted: Bool

    public init(
        role: StreamRole, token: [UInt8], receivedOffset: UInt64, attempt: UInt64 = 0, version: UInt16 = StreamHello.version,
        nonce: [UInt8] = [UInt8](repeating: 0, count: StreamHello.nonceLength),
        proof: [UInt8] = [UInt8](repeating: 0, count: StreamHello.proofLength), restarted: Bool = false
    ) {
        precondition(nonce.count == Self.nonceLength && proof.count == Self.proofLength, "a hello's nonce and proof have fixed sizes")
        self.version = version
        self.role = role
        self.attempt = attempt
        self.token = token
        self.receivedOffset = receivedOffset
        self.nonce = nonce
        self.proof = proof
        self.restarted = restarted
    }

    /// The body up to (not including) the proof: what the proof covers, with the prefix's value.
    public var authenticatedBody: [UInt8] {
        var body = Self.magic
        body += [UInt8(version >> 8), UInt8(version & 0xFF), role.rawValue, restarted ? Self.restartedFlag : 0]
        body += (0..<8).map { UInt8(truncatingIfNeeded: attempt >> (56 - 8 * $0)) }
        body += [UInt8(token.count >> 8), UInt8(token.count & 0xFF)]
        body += token
        body += nonce
        return body
    }

    /// The whole frame: prefix and body.
    public var encoded: [UInt8] {
        let body = authenticatedBody + proof
        return StreamFramePrefix(type: .hello, bodyLength: body.count, value: receivedOffset).encoded + body
    }

    public static func decode(prefix: StreamFramePrefix, body: [UInt8]) throws(StreamProtocolError) -> StreamHello {
        guard prefix.type == .hello else { throw .unexpectedFrame(expected: .hello, got: prefix.type) }
        guard body.count >= 4, Array(body[0..<4]) == magic else { throw .malformed("hello without the HFST magic") }
        guard body.count >= 6 else { throw .malformed("hello body of \(body.count) bytes is too short") }
        let version = UInt16(body[4]) << 8 | UInt16(body[5])
        guard version == Self.version else { throw .unsupportedVersion(version) }
        guard body.count >= 18 else { throw .malformed("hello body of \(body.count) bytes is too short") }
        guard let role = StreamRole(rawValue: body[6]) else { throw .malformed("hello with an unknown role") }
        guard body[7] & ~Self.restartedFlag == 0 else { throw .malformed("hello with unknown flags") }
        let attempt = body[8..<16].reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        let tokenLength = Int(body[16]) << 8 | Int(body[17])
        guard tokenLength <= maxTokenLength, body.count == 18 + tokenLength + nonceLength + proofLength else {
            throw .malformed("hello token length \(tokenLength) does not match its body")
        }
        let tokenEnd = 18 + tokenLength
        return StreamHello(
            role: role, token: Array(body[18..<tokenEnd]), receivedOffset: prefix.value, attempt: attempt, version: version,
            nonce: Array(body[tokenEnd..<(tokenEnd + nonceLength)]), proof: Array(body[(tokenEnd + nonceLength)...]),
            restarted: body[7] & Self.restartedFlag != 0)
    }
}

/// Codes carried by an ERROR frame.
public enum StreamErrorCode: UInt64, Sendable {
    case protocolViolation = 1
    case unknownToken = 2
    case offsetFromTheFuture = 3
    case offsetAlreadyDiscarded = 4
    case unsupportedVersion = 5
    case busy = 6
    case staleAttempt = 7
}

public struct StreamRefusal: Sendable, Equatable {
    public var code: StreamErrorCode
    public var message: String

    public init(code: StreamErrorCode, message: String) {
        self.code = code
        self.message = message
    }

    public var encoded: [UInt8] {
        let body = Array(message.utf8.prefix(StreamFramePrefix.maxErrorBody))
        return StreamFramePrefix(type: .error, bodyLength: body.count, value: code.rawValue).encoded + body
    }

    public static func decode(prefix: StreamFramePrefix, body: [UInt8]) -> StreamRefusal {
        StreamRefusal(
            code: StreamErrorCode(rawValue: prefix.value) ?? .protocolViolation,
            message: String(decoding: body, as: UTF8.self))
    }
}

/// Why a stream connection was refused or dropped. Never fatal to the stream itself: the
/// connection closes and the stream waits for the next one.
public enum StreamProtocolError: Error, Sendable, Equatable, CustomStringConvertible {
    case truncated
    case unknownFrameType(UInt8)
    case malformed(String)
    case oversized(type: StreamFrameType, length: Int, limit: Int)
    case unexpectedFrame(expected: StreamFrameType, got: StreamFrameType)
    case unsupportedVersion(UInt16)
    case wrongToken
    case offsetFromTheFuture(reported: UInt64, limit: UInt64)
    case offsetAlreadyDiscarded(reported: UInt64, oldest: UInt64)
    case dataGap(expected: UInt64, got: UInt64)
    case refusedByPeer(StreamRefusal)
    case handshakeTimedOut
    case staleAttempt(UInt64, newest: UInt64)
    /// A hello whose proof does not verify under the stream's secret. Refused on the wire exactly
    /// like an unknown token (`refusal`): the peer learns nothing about the stream.
    case unauthenticated

    public var description: String {
        switch self {
        case .truncated: return "connection ended inside a frame"
        case .unknownFrameType(let type): return "unknown frame type \(type)"
        case .malformed(let what): return "malformed frame: \(what)"
        case .oversized(let type, let length, let limit): return "\(type) frame of \(length) bytes exceeds the limit of \(limit)"
        case .unexpectedFrame(let expected, let got): return "expected a \(expected) frame, got \(got)"
        case .unsupportedVersion(let version): return "unsupported protocol version \(version)"
        case .wrongToken: return "wrong stream token"
        case .offsetFromTheFuture(let reported, let limit): return "offset \(reported) from the future (only \(limit) bytes were ever sent)"
        case .offsetAlreadyDiscarded(let reported, let oldest): return "offset \(reported) is older than the oldest replayable byte \(oldest)"
        case .dataGap(let expected, let got): return "data frame at offset \(got), expected \(expected)"
        case .refusedByPeer(let refusal): return "refused by peer (\(refusal.code)): \(refusal.message)"
        case .handshakeTimedOut: return "handshake timed out"
        case .staleAttempt(let attempt, let newest): return "connection attempt \(attempt) is older than attempt \(newest), already accepted"
        case .unauthenticated: return "the hello's proof does not verify under the stream's secret"
        }
    }

    /// What the peer is told: an unauthenticated hello gets word for word the refusal of an
    /// unknown token, and nothing about a stream's offsets is said to a peer that has not proved
    /// it holds the stream's secret (the checks that name offsets run only after the proof).
    public var refusal: StreamRefusal {
        switch self {
        case .wrongToken, .unauthenticated: return StreamRefusal(code: .unknownToken, message: "unknown stream")
        default: return StreamRefusal(code: code, message: description)
        }
    }

    /// The code to send to the peer for this error.
    public var code: StreamErrorCode {
        switch self {
        case .wrongToken, .unauthenticated: return .unknownToken
        case .offsetFromTheFuture: return .offsetFromTheFuture
        case .offsetAlreadyDiscarded: return .offsetAlreadyDiscarded
        case .unsupportedVersion: return .unsupportedVersion
        case .staleAttempt: return .staleAttempt
        default: return .protocolViolation
        }
    }
}
