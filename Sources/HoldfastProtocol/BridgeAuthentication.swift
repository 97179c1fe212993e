/// How the two ends of the bridge prove to each other that they hold the VM's bridge key
/// (docs/PROTOCOL.md, "Bridge authentication"): `bridge.authentication` in the daemon's
/// configuration, and the same choice on the host.
public enum BridgeAuthenticationMethod: String, Sendable, Codable, CaseIterable {
    /// Challenge–response with HMAC-SHA256 over fresh nonces, both ways, before the hello.
    case hmacSHA256 = "hmac-sha256"
    /// No handshake: whoever dials is taken as the guest, whoever listens as the host.
    case none
}

/// The bridge key shared by the host and the guest: at least 32 bytes, written to its file as
/// hexadecimal digits (`openssl rand -hex 32`). Its bytes never appear in a description, a
/// log line or an error message.
public struct BridgeKey: Sendable, Equatable, CustomStringConvertible, CustomReflectable {
    public static let minimumBytes = 32
    public static let maximumBytes = 128
    /// A key file bigger than this is refused before it is read.
    public static let maximumFileSize = 4096

    public let bytes: [UInt8]

    public init(bytes: [UInt8]) throws(BridgeKeyFormatError) {
        guard bytes.count >= Self.minimumBytes else { throw .tooShort(bytes: bytes.count) }
        guard bytes.count <= Self.maximumBytes else { throw .tooLong(bytes: bytes.count) }
        self.bytes = bytes
    }

    /// A key file's contents: hex digits (either case), optionally surrounded by whitespace (a
    /// trailing newline). Nothing else: a raw binary key is refused rather than guessed at.
    public init(fileContents: [UInt8]) throws(BridgeKeyFormatError) {
        func isSpace(_ byte: UInt8) -> Bool { byte == 0x20 || byte == 0x09 || byte == 0x0A || byte == 0x0D }
        var digits = fileContents[...]
        while let first = digits.first, isSpace(first) { digits = digits.dropFirst() }
        while let last = digits.last, isSpace(last) { digits = digits.dropLast() }
        guard !digits.isEmpty else { throw .empty }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(digits.count / 2)
        var high: UInt8?
        for (offset, byte) in digits.enumerated() {
            guard let value = Self.hexValue(byte) else { throw .notHex(offset: digits.startIndex + offset) }
            if let pending = high {
                bytes.append(pending << 4 | value)
                high = nil
            } else {
                high = value
            }
        }
        guard high == nil else { throw .oddDigitCount(digits.count) }
        try self.init(bytes: bytes)
    }

    /// A new random key (the kernel's random source), as `holdfast host serve` creates one.
    public static func generate() -> BridgeKey {
        var generator = SystemRandomNumberGenerator()
        return BridgeKey(unchecked: (0..<minimumBytes).map { _ in UInt8.random(in: .min ... .max, using: &generator) })
    }

    private init(unchecked bytes: [UInt8]) { self.bytes = bytes }

    /// The file form: lower-case hex digits and a newline.
    public var fileContents: [UInt8] {
        let digits = Array("0123456789abcdef".utf8)
        var text: [UInt8] = []
        text.reserveCapacity(bytes.count * 2 + 1)
        for byte in bytes {
            text.append(digits[Int(byte >> 4)])
            text.append(digits[Int(byte & 0x0F)])
        }
        text.append(0x0A)
        return text
    }

    public var description: String { "bridge key (\(bytes.count) bytes)" }
    public var customMirror: Mirror { Mirror(self, children: ["bytes": bytes.count], displayStyle: .struct) }

    static func hexValue(_ byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): byte - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): byte - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): byte - UInt8(ascii: "A") + 10
        default: nil
        }
    }
}

/// What is wrong with a key file's contents (never the contents themselves).
public enum BridgeKeyFormatError: Error, Sendable, Equatable, CustomStringConvertible {
    case empty
    case notHex(offset: Int)
    case oddDigitCount(Int)
    case tooShort(bytes: Int)
    case tooLong(bytes: Int)

    public var description: String {
        let format = "a key file holds \(BridgeKey.minimumBytes * 2) to \(BridgeKey.maximumBytes * 2) hex digits (e.g. from 'openssl rand -hex 32')"
        return switch self {
        case .empty: "it is empty; \(format)"
        case .notHex(let offset): "byte \(offset) is not a hex digit; \(format)"
        case .oddDigitCount(let count): "it has an odd number of hex digits (\(count)); \(format)"
        case .tooShort(let bytes): "the key is \(bytes) bytes, shorter than \(BridgeKey.minimumBytes); \(format)"
        case .tooLong(let bytes): "the key is \(bytes) bytes, longer than \(BridgeKey.maximumBytes); \(format)"
        }
    }
}

/// The handshake's messages, byte by byte (docs/PROTOCOL.md, "Bridge authentication"). The
/// guest dials and speaks first; every message has a fixed size, so a peer that speaks
/// something else is found out by its first bytes.
///
///     guest → host  challenge  40 bytes  "HFBA" 01 01 00 00, guest nonce (32)
///     host → guest  answer     72 bytes  "HFBA" 01 01 00 00, host nonce (32), host proof (32)
///     guest → host  proof      32 bytes  guest proof
///     host → guest  verdict     8 bytes  "HFBA" 01 00 00 00 (accepted) or "HFBA" 01 01 00 00 (refused)
///
/// host proof  = HMAC-SHA256(key, "holdfast-bridge v1 host"  ‖ guest nonce ‖ host nonce)
/// guest proof = HMAC-SHA256(key, "holdfast-bridge v1 guest" ‖ host nonce ‖ guest nonce)
///
/// Then control frames, the guest's hello first.
///
/// The guest nonce vouches for its connection at once: its first 16 bytes are random, its last
/// 16 the first 16 of HMAC-SHA256(key, "holdfast-bridge v1 voucher" ‖ those 16). A host that
/// holds the key can tell the guest's connection from a flood's by its first message, before
/// any round trip; to anything else the nonce is 32 bytes that are new every time.
public enum BridgeHandshakeWire {
    public static let magic: [UInt8] = Array("HFBA".utf8)
    public static let version: UInt8 = 1
    /// The method byte of HMAC-SHA256; the only one so far.
    public static let hmacSHA256: UInt8 = 1
    public static let nonceSize = 32
    public static let proofSize = 32
    public static let headerSize = 8
    public static let challengeSize = headerSize + nonceSize
    public static let answerSize = headerSize + nonceSize + proofSize
    public static let verdictSize = headerSize
    public static let hostLabel: [UInt8] = Array("holdfast-bridge v1 host".utf8)
    public static let guestLabel: [UInt8] = Array("holdfast-bridge v1 guest".utf8)
    public static let voucherLabel: [UInt8] = Array("holdfast-bridge v1 voucher".utf8)
    /// The guest nonce's random half, then its voucher (a truncated HMAC of that half).
    public static let voucherSize = 16

    /// Why a handshake message was not what it must be.
    public enum Malformed: Error, Sendable, Equatable, CustomStringConvertible {
        /// It does not start with "HFBA": the peer does not speak the handshake at all (a
        /// guest or host configured with `bridge.authentication: none`, or not a bridge peer).
        case notAHandshake
        case unsupportedVersion(UInt8)
        case unsupportedMethod(UInt8)
        case unknownVerdict(UInt8)

        public var description: String {
            switch self {
            case .notAHandshake: "the peer does not speak the bridge authentication handshake"
            case .unsupportedVersion(let version): "unsupported handshake version \(version)"
            case .unsupportedMethod(let method): "unsupported authentication method \(method)"
            case .unknownVerdict(let verdict): "unknown verdict \(verdict)"
            }
        }
    }

    static func header(_ third: UInt8) -> [UInt8] { magic + [version, third, 0, 0] }

    static func checkHeader(_ bytes: ArraySlice<UInt8>) throws(Malformed) {
        guard bytes.count >= headerSize, Array(bytes.prefix(4)) == magic else { throw .notAHandshake }
        let version = bytes[bytes.startIndex + 4]
        guard version == Self.version else { throw .unsupportedVersion(version) }
    }

    public struct Challenge: Sendable, Equatable {
        public var guestNonce: [UInt8]
        public init(guestNonce: [UInt8]) { self.guestNonce = guestNonce }

        public var encoded: [UInt8] { header(hmacSHA256) + guestNonce }

        public static func decode(_ bytes: [UInt8]) throws(Malformed) -> Challenge {
            precondition(bytes.count == challengeSize, "the caller reads exactly challengeSize bytes")
            try checkHeader(bytes[...])
            guard bytes[5] == hmacSHA256 else { throw .unsupportedMethod(bytes[5]) }
            return Challenge(guestNonce: Array(bytes[headerSize...]))
        }
    }

    public struct Answer: Sendable, Equatable {
        public var hostNonce: [UInt8]
        public var hostProof: [UInt8]
        public init(hostNonce: [UInt8], hostProof: [UInt8]) {
            self.hostNonce = hostNonce
            self.hostProof = hostProof
        }

        public var encoded: [UInt8] { header(hmacSHA256) + hostNonce + hostProof }

        public static func decode(_ bytes: [UInt8]) throws(Malformed) -> Answer {
            precondition(bytes.count == answerSize, "the caller reads exactly answerSize bytes")
            try checkHeader(bytes[...])
            guard bytes[5] == hmacSHA256 else { throw .unsupportedMethod(bytes[5]) }
            return Answer(hostNonce: Array(bytes[headerSize..<headerSize + nonceSize]), hostProof: Array(bytes[(headerSize + nonceSize)...]))
        }
    }

    public enum Verdict: UInt8, Sendable, Equatable {
        case accepted = 0
        case refused = 1

        public var encoded: [UInt8] { header(rawValue) }

        public static func decode(_ bytes: [UInt8]) throws(Malformed) -> Verdict {
            precondition(bytes.count == verdictSize, "the caller reads exactly verdictSize bytes")
            try checkHeader(bytes[...])
            guard let verdict = Verdict(rawValue: bytes[5]) else { throw .unknownVerdict(bytes[5]) }
            return verdict
        }
    }
}
