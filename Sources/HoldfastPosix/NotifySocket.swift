import CHoldfastShims
import HoldfastProtocol

#if canImport(Glibc)
import Glibc
#endif

/// Sends sd_notify(3) datagrams to the service manager's `$NOTIFY_SOCKET` without libsystemd:
/// one unconnected AF_UNIX datagram socket, one `sendto` per message. The message itself comes
/// from `ServiceNotify` (HoldfastProtocol).
public final class NotifySocket: Sendable {
    public let address: ServiceNotify.Address
    private let fd: Int32

    public init(address: ServiceNotify.Address) throws(SystemError) {
        self.address = address
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw .last("socket(AF_UNIX, SOCK_DGRAM)") }
        self.fd = fd
    }

    deinit { close(fd) }

    /// Sends one datagram without blocking (a manager that does not read its queue must not stall
    /// the caller): EAGAIN is thrown like any other error, and the caller decides to retry.
    public func send(_ message: [UInt8]) throws(SystemError) {
        var storage = sockaddr_un()
        storage.sun_family = sa_family_t(AF_UNIX)
        let name: [UInt8]
        switch address {
        case .path(let path): name = Array(path.utf8) + [0]
        // Abstract: a leading NUL, then the name; the length says where it ends (no NUL).
        case .abstract(let abstract): name = [0] + Array(abstract.utf8)
        }
        let capacity = MemoryLayout.size(ofValue: storage.sun_path)
        guard name.count <= capacity else { throw SystemError("sendto(\(address))", errno: .fileNameTooLong) }
        withUnsafeMutableBytes(of: &storage.sun_path) { raw in
            for (index, byte) in name.enumerated() { raw[index] = byte }
        }
        // A path's length may include its NUL; an abstract name's must not include padding.
        let length = socklen_t(MemoryLayout<sa_family_t>.size + name.count)
        let sent = message.withUnsafeBytes { bytes in
            withUnsafePointer(to: &storage) { pointer in
                pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { address in
                    var result: Int
                    repeat {
                        result = sendto(fd, bytes.baseAddress, bytes.count, Int32(MSG_DONTWAIT | MSG_NOSIGNAL), address, length)
                    } while result < 0 && errno == EINTR
                    return result
                }
            }
        }
        guard sent >= 0 else { throw .last("sendto(\(address))") }
        guard sent == message.count else { throw SystemError("sendto(\(address)): short datagram", errno: .messageTooLong) }
    }

    /// Sends, retrying EAGAIN (a full queue at the manager) for up to `patience`.
    public func send(_ fields: [ServiceNotify.Field], patience: Duration = .seconds(1)) async throws(SystemError) {
        let message = ServiceNotify.message(fields)
        let deadline = ContinuousClock.now + patience
        while true {
            do {
                try send(message)
                return
            } catch where error.errno == .resourceTemporarilyUnavailable && ContinuousClock.now < deadline {
                try? await Task.sleep(for: .milliseconds(10))
            }
        }
    }
}
