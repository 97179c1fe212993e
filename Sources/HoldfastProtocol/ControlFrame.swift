#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// The control-plane framing shared by the bridge and the broker's control sockets
/// (docs/PROTOCOL.md, "Control frames"): a 16-byte header, then a JSON body.
///
///     0  u32  type
///     4  u32  body length
///     8  u64  request id (0 for notifications)
///    16  ...  JSON body (UTF-8)
///
/// Big-endian, like the stream frames. hcsshim's bridge uses the same shape.
public struct ControlFrame: Sendable, Equatable {
    public static let headerSize = 16
    /// The default largest body; a bigger frame closes the connection it came on.
    public static let defaultMaxBody = 64 * 1024

    public var type: UInt32
    public var id: UInt64
    public var body: [UInt8]

    public init(type: UInt32, id: UInt64, body: [UInt8]) {
        self.type = type
        self.id = id
        self.body = body
    }

    public var encoded: [UInt8] {
        var bytes = [UInt8]()
        bytes.reserveCapacity(Self.headerSize + body.count)
        append(type, to: &bytes)
        append(UInt32(body.count), to: &bytes)
        append(id, to: &bytes)
        bytes += body
        return bytes
    }

    /// The header alone: type, body length and id.
    public struct Header: Sendable, Equatable {
        public var type: UInt32
        public var bodyLength: Int
        public var id: UInt64
    }

    public static func decodeHeader(_ bytes: some Collection<UInt8>, maxBody: Int = defaultMaxBody) throws(ControlFrameError) -> Header {
        guard bytes.count >= headerSize else { throw .truncated(needed: headerSize, got: bytes.count) }
        let start = bytes.startIndex
        func word(_ offset: Int, _ width: Int) -> UInt64 {
            var value: UInt64 = 0
            var index = bytes.index(start, offsetBy: offset)
            for _ in 0..<width {
                value = value << 8 | UInt64(bytes[index])
                index = bytes.index(after: index)
            }
            return value
        }
        let header = Header(type: UInt32(word(0, 4)), bodyLength: Int(word(4, 4)), id: word(8, 8))
        guard header.bodyLength <= maxBody else { throw .oversized(length: header.bodyLength, limit: maxBody) }
        return header
    }

    /// Decodes one whole frame from a datagram (a SOCK_SEQPACKET message): the header's length
    /// must match exactly.
    public static func decode(datagram bytes: [UInt8], maxBody: Int = defaultMaxBody) throws(ControlFrameError) -> ControlFrame {
        let header = try decodeHeader(bytes, maxBody: maxBody)
        guard bytes.count == headerSize + header.bodyLength else {
            throw .lengthMismatch(declared: header.bodyLength, actual: bytes.count - headerSize)
        }
        return ControlFrame(type: header.type, id: header.id, body: Array(bytes[headerSize...]))
    }

    private func append<T: FixedWidthInteger>(_ value: T, to bytes: inout [UInt8]) {
        withUnsafeBytes(of: value.bigEndian) { bytes += $0 }
    }
}

public enum ControlFrameError: Error, Sendable, Equatable, CustomStringConvertible {
    case truncated(needed: Int, got: Int)
    case oversized(length: Int, limit: Int)
    case lengthMismatch(declared: Int, actual: Int)
    case unknownType(UInt32)
    case badBody(type: UInt32, reason: String)

    public var description: String {
        switch self {
        case .truncated(let needed, let got): return "frame cut short: \(got) of \(needed) bytes"
        case .oversized(let length, let limit): return "frame body of \(length) bytes exceeds the limit of \(limit)"
        case .lengthMismatch(let declared, let actual): return "frame declares \(declared) body bytes but carries \(actual)"
        case .unknownType(let type): return "unknown frame type 0x\(String(type, radix: 16))"
        case .badBody(let type, let reason): return "bad body for frame type 0x\(String(type, radix: 16)): \(reason)"
        }
    }
}

/// JSON helpers with one configuration everywhere (sorted keys: stable, diffable output).
public enum ControlJSON {
    public static func encode<T: Encodable>(_ value: T) -> [UInt8] {
        let encoder = JSONEncoder()
        // Slashes as they are: escaped (`\/`, Foundation's default) a path-heavy body grew up to
        // twice its size, so that a request a host sent within the frame limit (a create with a
        // long PATH-like variable) no longer fit it when the bridge worker passed it on.
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        // Encoding our own Codable types cannot fail; a failure here is a programming error.
        return Array((try? encoder.encode(value)) ?? Data("{}".utf8))
    }

    public static func decode<T: Decodable>(_ type: T.Type, from bytes: [UInt8], frameType: UInt32) throws(ControlFrameError) -> T {
        do {
            return try JSONDecoder().decode(T.self, from: Data(bytes))
        } catch {
            throw .badBody(type: frameType, reason: describe(error))
        }
    }

    /// A one-line reason from a DecodingError (which key, what was wrong).
    static func describe(_ error: any Error) -> String {
        guard let error = error as? DecodingError else { return "\(error)" }
        func path(_ context: DecodingError.Context) -> String {
            let keys = context.codingPath.map { $0.intValue.map { "[\($0)]" } ?? $0.stringValue }
            return keys.isEmpty ? "body" : keys.joined(separator: ".")
        }
        switch error {
        case .typeMismatch(_, let context): return "\(path(context)): \(context.debugDescription)"
        case .valueNotFound(_, let context): return "\(path(context)): missing value"
        case .keyNotFound(let key, let context): return "\(path(context)): missing key '\(key.stringValue)'"
        case .dataCorrupted(let context): return "\(path(context)): \(context.debugDescription)"
        @unknown default: return "\(error)"
        }
    }
}

/// Replies that list things (streams, processes, exits) must fit one frame (64 KiB): with
/// thousands of streams they would not. `fit` keeps the longest prefix that fits and says how
/// many were left out, so a reply is never refused for its size.
public enum FrameBudget {
    /// Leaves room below the 64 KiB frame limit for the rest of the body.
    public static let bytes = 60 * 1024

    /// `make(prefix)` for the longest prefix of `items` whose encoding fits `budget`, and how
    /// many items did not fit.
    public static func fit<Item, Reply: Encodable>(
        _ items: [Item], budget: Int = bytes, _ make: ([Item]) -> Reply
    ) -> (reply: Reply, omitted: Int) {
        let whole = make(items)
        if ControlJSON.encode(whole).count <= budget { return (whole, 0) }
        var low = 0
        var high = items.count
        while low < high {
            let middle = (low + high + 1) / 2
            if ControlJSON.encode(make(Array(items.prefix(middle)))).count <= budget { low = middle } else { high = middle - 1 }
        }
        return (make(Array(items.prefix(low))), items.count - low)
    }
}
