/// Where a stream or the bridge connects: `vsock://CID:PORT`, `unix:/path` or `tcp://HOST:PORT`.
///
/// Parsing is pure so configuration checks and the host tools share it; the syscalls that use an
/// address live in HoldfastPosix.
public enum SocketAddress: Sendable, Hashable, Codable, CustomStringConvertible {
    case vsock(cid: UInt32, port: UInt32)
    case unix(path: String)
    case tcp(host: String, port: UInt16)

    /// VMADDR_CID_ANY: listen on every CID.
    public static let vsockAnyCID: UInt32 = 0xFFFF_FFFF
    /// VMADDR_CID_HOST: the hypervisor's host.
    public static let vsockHostCID: UInt32 = 2
    /// The longest path a sockaddr_un holds, without its terminating NUL.
    public static let maxUnixPathLength = 107

    /// The longest address text taken: a DNS name is at most 253 bytes, a Unix path 107, so any
    /// real address fits; a longer one (a host of 60 KiB, a CID padded with zeros) only grew the
    /// requests that carry it past what a frame holds.
    public static let maxLength = 512

    public init(parsing text: String) throws(AddressError) {
        func fail(_ part: String, _ reason: String) -> AddressError {
            AddressError(input: String(text.prefix(64)) + (text.utf8.count > 64 ? "…" : ""), part: part, reason: reason)
        }
        guard text.utf8.count <= Self.maxLength else {
            throw fail("", "the address is \(text.utf8.count) bytes; at most \(Self.maxLength) are taken")
        }
        if text.hasPrefix("vsock://") {
            let rest = text.dropFirst("vsock://".count)
            guard let colon = rest.lastIndex(of: ":") else {
                throw fail(String(rest), "expected CID:PORT after vsock://")
            }
            let cidText = rest[..<colon]
            let portText = rest[rest.index(after: colon)...]
            let cid: UInt32
            switch cidText {
            case "host": cid = Self.vsockHostCID
            case "any": cid = Self.vsockAnyCID
            default:
                guard let number = UInt32(cidText) else {
                    throw fail(String(cidText), "the CID must be a number (0-4294967295), 'host' or 'any'")
                }
                cid = number
            }
            guard let port = UInt32(portText) else {
                throw fail(String(portText), "the port must be a number (0-4294967295)")
            }
            self = .vsock(cid: cid, port: port)
        } else if text.hasPrefix("unix:") {
            var path = Substring(text.dropFirst("unix:".count))
            if path.hasPrefix("//") { path = path.dropFirst(2) }  // unix:///run/x is unix:/run/x
            guard !path.isEmpty else { throw fail("", "the path is empty") }
            guard path.utf8.count <= Self.maxUnixPathLength else {
                throw fail(String(path), "the path is \(path.utf8.count) bytes; a Unix socket path holds at most \(Self.maxUnixPathLength)")
            }
            guard !path.utf8.contains(0) else { throw fail(String(path), "the path contains a NUL byte") }
            self = .unix(path: String(path))
        } else if text.hasPrefix("tcp://") {
            let rest = text.dropFirst("tcp://".count)
            let host: Substring
            let portText: Substring
            if rest.hasPrefix("[") {
                guard let close = rest.firstIndex(of: "]") else {
                    throw fail(String(rest), "an IPv6 address needs a closing ']'")
                }
                host = rest[rest.index(after: rest.startIndex)..<close]
                let after = rest[rest.index(after: close)...]
                guard after.hasPrefix(":") else { throw fail(String(after), "expected :PORT after the IPv6 address") }
                portText = after.dropFirst()
            } else {
                guard let colon = rest.lastIndex(of: ":") else {
                    throw fail(String(rest), "expected HOST:PORT after tcp://")
                }
                host = rest[..<colon]
                portText = rest[rest.index(after: colon)...]
            }
            guard !host.isEmpty else { throw fail("", "the host is empty") }
            guard let port = UInt16(portText) else {
                throw fail(String(portText), "the port must be a number (0-65535)")
            }
            self = .tcp(host: String(host), port: port)
        } else {
            let scheme = text.split(separator: ":", maxSplits: 1).first.map(String.init) ?? text
            throw fail(scheme, "unknown scheme; use vsock://CID:PORT, unix:/path or tcp://HOST:PORT")
        }
    }

    public var description: String {
        switch self {
        case .vsock(let cid, let port):
            let cidText = cid == Self.vsockAnyCID ? "any" : (cid == Self.vsockHostCID ? "host" : String(cid))
            return "vsock://\(cidText):\(port)"
        case .unix(let path): return "unix:\(path)"
        case .tcp(let host, let port): return host.contains(":") ? "tcp://[\(host)]:\(port)" : "tcp://\(host):\(port)"
        }
    }

    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        self = try SocketAddress(parsing: text)
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}

/// An address that does not parse, naming the part that is wrong and why.
public struct AddressError: Error, Sendable, Equatable, CustomStringConvertible {
    public var input: String
    public var part: String
    public var reason: String

    public var description: String { "invalid address '\(input)': '\(part)': \(reason)" }
}
