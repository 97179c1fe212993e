import CHoldfastShims

#if canImport(Glibc)
import Glibc
#endif

/// Reserved ports: what a connection's source says of the process that made it.
///
/// Any process in a guest can dial the host's bridge port (vsock is not namespaced), so the host
/// cannot tell the guest's daemon from a flood of connections by where they come from (one VM,
/// one CID) — except by a privilege: binding a port below 1024 takes CAP_NET_BIND_SERVICE, for
/// TCP and for vsock alike, so a connection from such a port was made by a privileged process of
/// the peer's system (the guest's bridge worker runs as root and dials from one). The host admits
/// such connections apart, where a flood from an unprivileged process cannot push them out. A
/// Unix socket says nothing of the guest: a VMM that hands guest connections to the host over
/// one (Firecracker's hybrid vsock) is the peer of them all.
public enum ReservedPorts {
    /// The ports only a privileged process can bind.
    public static let range: ClosedRange<UInt32> = 1...1023
    /// Where a dialler picks its source port: the upper part, clear of the well-known services.
    static let dialRange: ClosedRange<UInt32> = 600...1023

    /// Whether the process at the other end of `socket` (an accepted TCP or vsock connection)
    /// was privileged: its source port is below 1024. False when it cannot be told (a Unix
    /// socket, an unknown family).
    public static func peerIsPrivileged(_ socket: AsyncFD) -> Bool {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let known = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(socket.fd, $0, &length) == 0 }
        }
        guard known else { return false }
        switch Int32(storage.ss_family) {
        case AF_INET, AF_INET6:
            // sin_port and sin6_port sit at the same offset, in network byte order.
            let port = withUnsafeBytes(of: storage) { UInt16(bigEndian: $0.load(fromByteOffset: 2, as: UInt16.self)) }
            return range.contains(UInt32(port))
        case hf_af_vsock():
            var cid: UInt32 = 0
            var port: UInt32 = 0
            return hf_sockaddr_vm_parse(&storage, &cid, &port) == 0 && range.contains(port)
        default:
            return false
        }
    }

    /// Binds `fd`, a TCP or vsock socket about to connect, to a free reserved port, so its peer
    /// can tell it was dialled by a privileged process. False (the socket left unbound, to get an
    /// ordinary port at connect) when this process may not (EACCES) or none of a few tried was free.
    static func bind(_ fd: Int32, family: Int32) -> Bool {
        for _ in 0..<16 {
            let port = UInt32.random(in: dialRange)
            var storage = sockaddr_storage()
            func place<Address>(_ address: Address) -> socklen_t {
                withUnsafeMutableBytes(of: &storage) { $0.storeBytes(of: address, as: Address.self) }
                return socklen_t(MemoryLayout<Address>.size)
            }
            let length: socklen_t
            switch family {
            case AF_INET:
                var address = sockaddr_in()
                address.sin_family = sa_family_t(AF_INET)
                address.sin_port = UInt16(port).bigEndian
                length = place(address)
            case AF_INET6:
                var address = sockaddr_in6()
                address.sin6_family = sa_family_t(AF_INET6)
                address.sin6_port = UInt16(port).bigEndian
                length = place(address)
            case hf_af_vsock():
                length = hf_sockaddr_vm(&storage, hf_vmaddr_cid_any(), port)
            default:
                return false
            }
            let bound = withUnsafePointer(to: &storage) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.bind(fd, $0, length) } }
            if bound == 0 { return true }
            if errno != EADDRINUSE { return false }
        }
        return false
    }
}
