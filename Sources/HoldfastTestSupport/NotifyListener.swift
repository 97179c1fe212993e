import HoldfastPosix
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// What systemd's end of sd_notify looks like to a test: a bound AF_UNIX datagram socket (a
/// file, or an abstract name) that collects every message sent to it.
public final class NotifyListener: Sendable {
    /// The value for `$NOTIFY_SOCKET`.
    public let notifySocket: String
    private let fd: Int32
    private let received = NIOLockedValueBox<[String]>([])

    /// `path` starting with "@" binds an abstract name.
    public init(path: String) throws {
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        guard fd >= 0 else { throw SystemError.last("socket") }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let abstract = path.hasPrefix("@")
        let name: [UInt8] = abstract ? [0] + Array(path.utf8.dropFirst()) : Array(path.utf8) + [0]
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (index, byte) in name.enumerated() { raw[index] = byte }
        }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + name.count)
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) }
        }
        guard bound == 0 else {
            close(fd)
            throw SystemError.last("bind(\(path))")
        }
        self.fd = fd
        notifySocket = path
    }

    deinit { close(fd) }

    /// Every message received so far (reads what is waiting first).
    public var messages: [String] {
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            guard count >= 0 else { break }  // EAGAIN: nothing more
            let message = String(decoding: buffer[..<count], as: UTF8.self)
            received.withLockedValue { $0.append(message) }
        }
        return received.withLockedValue { $0 }
    }

    /// Every assignment received, in order ("READY=1", "STATUS=…"), messages split at newlines.
    public var assignments: [String] {
        messages.flatMap { $0.split(separator: "\n").map(String.init) }
    }
}
