/// The secret of one resumable stream: what makes a hello for it provable. Chosen by the host
/// (from the kernel's random source), carried to the guest in the create request (or an adopt on
/// the handoff socket), known only to the host and the broker. Every hello carries an HMAC under
/// it (docs/PROTOCOL.md, "Authentication"), so a process in the guest that dials the host's
/// stream listener with a guessed token cannot speak for the stream.
///
/// On the wire (JSON) it is a hex string; in logs and descriptions it is never printed.
public struct StreamSecret: Sendable, Equatable, Codable, CustomStringConvertible, CustomDebugStringConvertible {
    /// At least 128 bits; what `random()` makes: 256.
    public static let minimumLength = 16
    public static let maximumLength = 64
    public static let generatedLength = 32

    public let bytes: [UInt8]

    public init(bytes: [UInt8]) throws(StreamSecretError) {
        guard (Self.minimumLength...Self.maximumLength).contains(bytes.count) else {
            throw .length(bytes.count)
        }
        self.bytes = bytes
    }

    /// From its hex form (upper or lower case).
    public init(hex: String) throws(StreamSecretError) {
        let digits = Array(hex.utf8)
        guard digits.count % 2 == 0 else { throw .notHex }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(digits.count / 2)
        var index = 0
        while index < digits.count {
            guard let high = Self.nibble(digits[index]), let low = Self.nibble(digits[index + 1]) else { throw .notHex }
            bytes.append(high << 4 | low)
            index += 2
        }
        try self.init(bytes: bytes)
    }

    /// 32 bytes from the system's random source (getrandom(2) on Linux).
    public static func random() -> StreamSecret {
        var generator = SystemRandomNumberGenerator()
        var bytes: [UInt8] = []
        bytes.reserveCapacity(generatedLength)
        while bytes.count < generatedLength {
            let word = generator.next()
            for shift in stride(from: 0, to: 64, by: 8) { bytes.append(UInt8(truncatingIfNeeded: word >> UInt64(shift))) }
        }
        return try! StreamSecret(bytes: Array(bytes.prefix(generatedLength)))
    }

    /// Lower-case hex: what the JSON carries and what `--secret-file` holds.
    public var hex: String {
        let digits = Array("0123456789abcdef".utf8)
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count * 2)
        for byte in bytes {
            out.append(digits[Int(byte >> 4)])
            out.append(digits[Int(byte & 0x0F)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    public var description: String { "StreamSecret(\(bytes.count) bytes, redacted)" }
    public var debugDescription: String { description }

    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        do {
            try self.init(hex: text)
        } catch {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: error.description))
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(hex)
    }

    private static func nibble(_ digit: UInt8) -> UInt8? {
        switch digit {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return digit - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return digit - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return digit - UInt8(ascii: "A") + 10
        default: return nil
        }
    }
}

public enum StreamSecretError: Error, Sendable, Equatable, CustomStringConvertible {
    case length(Int)
    case notHex

    public var description: String {
        switch self {
        case .length(let count):
            return "a stream secret must be \(StreamSecret.minimumLength) to \(StreamSecret.maximumLength) bytes (\(2 * StreamSecret.minimumLength) to \(2 * StreamSecret.maximumLength) hex digits), not \(count)"
        case .notHex: return "a stream secret must be hex digits"
        }
    }
}
