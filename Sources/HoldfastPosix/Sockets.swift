import CHoldfastShims
import HoldfastCore
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// A resolved sockaddr ready for connect(2) or bind(2).
struct ResolvedAddress {
    var storage = sockaddr_storage()
    var length: socklen_t = 0
    var family: Int32 = 0

    init(_ address: SocketAddress) throws(SystemError) {
        switch address {
        case .vsock(let cid, let port):
            family = hf_af_vsock()
            length = hf_sockaddr_vm(&storage, cid, port)
        case .unix(let path):
            family = AF_UNIX
            let sunPathOffset = MemoryLayout<sa_family_t>.size
            withUnsafeMutableBytes(of: &storage) { raw in
                raw.storeBytes(of: sa_family_t(AF_UNIX), as: sa_family_t.self)
                let bytes = Array(path.utf8)
                for (index, byte) in bytes.enumerated() { raw[sunPathOffset + index] = byte }
                raw[sunPathOffset + bytes.count] = 0
            }
            length = socklen_t(sunPathOffset + path.utf8.count + 1)
        case .tcp(let host, let port):
            var hints = addrinfo()
            hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
            hints.ai_flags = AI_NUMERICSERV  // no AI_ADDRCONFIG: it asks netlink, which the broker may not open
            var result: UnsafeMutablePointer<addrinfo>?
            let status = getaddrinfo(host, String(port), &hints, &result)
            guard status == 0, let first = result else {
                let reason = String(cString: gai_strerror(status))
                throw SystemError("resolve \(host): \(reason)", errno: .noSuchFileOrDirectory)
            }
            defer { freeaddrinfo(result) }
            family = first.pointee.ai_family
            length = first.pointee.ai_addrlen
            withUnsafeMutableBytes(of: &storage) { raw in
                raw.copyMemory(from: UnsafeRawBufferPointer(start: first.pointee.ai_addr, count: Int(length)))
            }
        }
    }

    func withSockaddr<T>(_ body: (UnsafePointer<sockaddr>, socklen_t) -> T) -> T {
        withUnsafeBytes(of: storage) { raw in
            body(raw.baseAddress!.assumingMemoryBound(to: sockaddr.self), length)
        }
    }
}

/// A connect that did not finish in time.
public struct ConnectTimedOut: Error, Sendable, CustomStringConvertible {
    public var address: SocketAddress
    public var timeout: Duration
    public var description: String { "connect to \(address) timed out after \(timeout)" }
}

public enum Dialer {
    /// Connects a stream socket to `address`, giving up after `timeout`. The returned connection
    /// is non-blocking and registered with the reactor. `sendBuffer` asks for that much send
    /// buffer on a Unix stream socket (see `resumableSendBuffer`). `fromReservedPort`: a TCP or
    /// vsock connection comes from a port below 1024 if this process may bind one
    /// (`ReservedPorts`: the peer then knows a privileged process dialled).
    public static func connect(
        to address: SocketAddress, kind: SocketKind = .stream, timeout: Duration = .seconds(2), sendBuffer: Int? = nil,
        fromReservedPort: Bool = false, reactor: Reactor = .shared
    ) async throws -> AsyncFD {
        let resolved = try ResolvedAddress(address)
        let fd = try retryingInterrupts("socket(\(address))") {
            socket(resolved.family, kind.rawValue | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        }
        if let sendBuffer, kind == .stream, resolved.family == AF_UNIX { requestSendBuffer(fd, bytes: sendBuffer) }
        if fromReservedPort, resolved.family != AF_UNIX { _ = ReservedPorts.bind(fd, family: resolved.family) }
        let connection: AsyncFD
        do {
            connection = try AsyncFD(adopting: fd, reactor: reactor)
        } catch {
            _ = Glibc.close(fd)
            throw error
        }
        // A Unix listener whose backlog is full answers a non-blocking connect with EAGAIN at
        // once (TCP would queue it): that is transient — 2,000 streams redialled at the same
        // bridge-up do it — so try again briefly, within the connect timeout.
        let deadline = ContinuousClock.now + timeout
        var started = resolved.withSockaddr { Glibc.connect(fd, $0, $1) }
        var error = started == 0 ? 0 : Glibc.errno
        var pause = Duration.milliseconds(1)
        while started != 0, error == EAGAIN, ContinuousClock.now + pause < deadline {
            try? await Task.sleep(for: pause)
            pause = min(pause * 2, .milliseconds(50))
            started = resolved.withSockaddr { Glibc.connect(fd, $0, $1) }
            error = started == 0 ? 0 : Glibc.errno
        }
        if started == 0 { return connection }
        guard error == EINPROGRESS || error == EINTR else {
            connection.close()
            throw SystemError("connect(\(address))", errno: .init(rawValue: error))
        }
        do {
            try await withDeadline(timeout, address: address) { try await connection.waitWritable() }
        } catch {
            connection.close()
            throw error
        }
        var socketError: Int32 = 0
        var size = socklen_t(MemoryLayout<Int32>.size)
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &socketError, &size)
        guard socketError == 0 else {
            connection.close()
            throw SystemError("connect(\(address))", errno: .init(rawValue: socketError))
        }
        return connection
    }

    /// The send buffer a resumable stream asks for on a Unix stream connection. The default
    /// (208 KiB of kernel accounting, about 100 KiB of data in flight) makes a relay that
    /// outpaces its reader wait for room every few dozen KiB; the kernel caps the request at
    /// `net.core.wmem_max`. Not for raw mode: a raw stream loses what a dying connection had
    /// accepted, so a bigger buffer is a bigger loss (resumable mode replays it). TCP keeps its
    /// own autotuning, which a fixed SO_SNDBUF would switch off.
    public static let resumableSendBuffer = 1 << 20

    /// SO_SNDBUF, best effort.
    static func requestSendBuffer(_ fd: Int32, bytes: Int) {
        var value = Int32(bytes)
        _ = setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &value, socklen_t(MemoryLayout<Int32>.size))
    }

    /// Runs `body`, throwing `ConnectTimedOut` if it has not finished within `timeout`. `body`
    /// must honour cancellation (reactor waits do).
    static func withDeadline(
        _ timeout: Duration, address: SocketAddress, _ body: @escaping @Sendable () async throws -> Void
    ) async throws {
        let work = Task { try await body() }
        let timedOut = NIOLockedValueBox(false)
        let timer = TimeoutWheel.shared.schedule(after: timeout) {
            timedOut.withLockedValue { $0 = true }
            work.cancel()
        }
        defer { TimeoutWheel.shared.cancel(timer) }
        do {
            try await withTaskCancellationHandler { try await work.value } onCancel: { work.cancel() }
        } catch {
            if timedOut.withLockedValue({ $0 }) { throw ConnectTimedOut(address: address, timeout: timeout) }
            throw error
        }
        if timedOut.withLockedValue({ $0 }) { throw ConnectTimedOut(address: address, timeout: timeout) }
    }
}

/// SOCK_STREAM (a byte stream) or SOCK_SEQPACKET (messages, for fd passing).
public enum SocketKind: Sendable {
    case stream, seqpacket

    var rawValue: Int32 {
        switch self {
        case .stream: return Int32(SOCK_STREAM.rawValue)
        case .seqpacket: return Int32(SOCK_SEQPACKET.rawValue)
        }
    }
}

/// A listening socket that accepts any number of connections.
public final class Listener: Sendable {
    public let address: SocketAddress
    private let socket: AsyncFD
    /// The inode of the Unix socket file we created, so `close` never unlinks a successor's.
    private let unixInode: ino_t?

    /// Binds and listens. A stale Unix socket file at the path (ours, nobody listening) is
    /// replaced; another user's, or a live one, is not (bind fails). For vsock port
    /// `VMADDR_PORT_ANY` the kernel picks a port (see `boundAddress`).
    public init(
        binding address: SocketAddress, kind: SocketKind = .stream, backlog: Int32 = 4096, unixMode: mode_t? = nil,
        reactor: Reactor = .shared
    ) throws(SystemError) {
        let resolved = try ResolvedAddress(address)
        let fd = try retryingInterrupts("socket(\(address))") {
            Glibc.socket(resolved.family, kind.rawValue | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        }
        do {
            // Only a stale socket of our own replaces: never another user's, never one a process
            // listens on (bind then fails with EADDRINUSE).
            if case .unix(let path) = address, UnixSocketFile.state(path) == .stale { unlink(path) }
            if resolved.family == AF_INET || resolved.family == AF_INET6 {
                var one: Int32 = 1
                setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            }
            _ = try retryingInterrupts("bind(\(address))") { resolved.withSockaddr { Glibc.bind(fd, $0, $1) } }
            if case .unix(let path) = address, let unixMode {
                _ = try retryingInterrupts("chmod(\(path))") { chmod(path, unixMode) }
            }
            _ = try retryingInterrupts("listen(\(address))") { Glibc.listen(fd, backlog) }
            self.socket = try AsyncFD(adopting: fd, reactor: reactor)
            if case .unix(let path) = address {
                var info = stat()
                self.unixInode = lstat(path, &info) == 0 ? info.st_ino : nil
            } else {
                self.unixInode = nil
            }
        } catch {
            _ = Glibc.close(fd)
            throw error
        }
        self.address = address
    }

    /// Takes over a socket that is already listening (handed down by a parent process).
    public init(adopting fd: Int32, address: SocketAddress, reactor: Reactor = .shared) throws(SystemError) {
        self.socket = try AsyncFD(adopting: fd, reactor: reactor)
        self.address = address
        self.unixInode = nil  // the creator owns the socket file
    }

    /// The listening fd (to hand to a child process; it stays owned by this listener).
    public var descriptor: Int32 { socket.fd }

    /// Stops managing the fd and hands it back open (a listener adopted across a live upgrade's
    /// exec, given back for the image it falls back to). Nil if it was closed already.
    public func detach() -> Int32? { socket.detach() }

    /// The address actually bound (differs from `address` for TCP or vsock port 0).
    public var boundAddress: SocketAddress {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let ok = withUnsafeMutableBytes(of: &storage) { raw in
            getsockname(socket.fd, raw.baseAddress!.assumingMemoryBound(to: sockaddr.self), &length) == 0
        }
        guard ok else { return address }
        switch address {
        case .tcp(let host, _):
            let port: UInt16 = withUnsafeBytes(of: storage) { raw in
                // sin_port and sin6_port sit at the same offset, in network byte order.
                UInt16(bigEndian: raw.load(fromByteOffset: 2, as: UInt16.self))
            }
            return .tcp(host: host, port: port)
        case .vsock:
            var cid: UInt32 = 0
            var port: UInt32 = 0
            guard hf_sockaddr_vm_parse(&storage, &cid, &port) == 0 else { return address }
            return .vsock(cid: cid, port: port)
        case .unix:
            return address
        }
    }

    /// Accepts the next connection, suspending until one arrives. Throws `DescriptorClosed` after
    /// `close()`.
    public func accept() async throws -> AsyncFD {
        while true {
            let fd: Int32? = try socket.withSyscall { () throws(SystemError) -> Int32? in
                while true {
                    let fd = hf_accept_nonblocking(socket.fd)
                    if fd >= 0 { return fd }
                    switch Glibc.errno {
                    case EINTR, ECONNABORTED: continue
                    case EAGAIN, EWOULDBLOCK: return nil
                    default: throw .last("accept(\(address))")
                    }
                }
            }
            if let fd {
                do {
                    return try AsyncFD(adopting: fd, reactor: .shared)
                } catch {
                    _ = Glibc.close(fd)
                    throw error
                }
            }
            try await socket.waitReadable()
        }
    }

    /// The next accepted connection, or nil once the listener is closed or the task cancelled.
    /// Any other failure — no fd left (EMFILE, ENFILE), no memory (ENOMEM, ENOBUFS), the epoll
    /// watch limit — is a moment of scarcity, not the listener's end: the connection waits in the
    /// backlog, `failed` is told, and the accept is tried again after `pause`. A server whose
    /// loop ended at the first such error stayed deaf for good, however many fds came free.
    public func nextConnection(pause: Duration = .milliseconds(50), failed: (any Error) -> Void = { _ in }) async -> AsyncFD? {
        while !Task.isCancelled {
            do {
                return try await accept()
            } catch is DescriptorClosed {
                return nil
            } catch is CancellationError {
                return nil
            } catch {
                if socket.isClosed { return nil }
                failed(error)
                guard (try? await Task.sleep(for: pause)) != nil else { return nil }
            }
        }
        return nil
    }

    /// Stops listening; a pending `accept` throws. Removes the Unix socket file.
    public func close() {
        guard !socket.isClosed else { return }
        socket.close()
        if case .unix(let path) = address, let unixInode {
            var info = stat()
            if lstat(path, &info) == 0, info.st_ino == unixInode { unlink(path) }
        }
    }
}

extension AsyncFD {
    /// Up to `count` of the bytes waiting on this socket, left there for the next read (empty
    /// while none have arrived, or on any failure). For a server that sorts a connection by its
    /// first message before it reads it (the bridge's voucher, a stream's hello), without
    /// waiting for it.
    public func peekNow(upTo count: Int) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        let received = (try? withSyscall { () -> Int in
            bytes.withUnsafeMutableBytes { recv(fd, $0.baseAddress, count, Int32(MSG_PEEK | MSG_DONTWAIT)) }
        }) ?? -1
        return Array(bytes.prefix(max(received, 0)))
    }
}
