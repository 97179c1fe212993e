import HoldfastCore
import NIOConcurrencyHelpers
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// An owned, non-blocking file descriptor whose reads and writes suspend the calling task
/// (never a thread) until the reactor reports readiness: a pipe end, a pty master or a socket.
///
/// `close()` may race with operations on other tasks: the fd number is released to the kernel
/// only once no syscall on it is in flight, so a concurrent operation can never hit a recycled
/// fd number that now belongs to someone else.
public final class AsyncFD: ByteConnection, CustomStringConvertible {
    public let fd: Int32
    public let isSocket: Bool
    /// The fd was blocking when adopted (restored when it is handed back by `detach`).
    private let wasBlocking: Bool
    private let reactor: Reactor
    private let registration: Registration
    private let usage = NIOLockedValueBox(Usage())

    private struct Usage {
        var inFlight = 0
        var closed = false
        var deregistered = false
        var released = false
        var readHint = ReadHint.unknown
    }

    /// What the last read said about readability, so `waitReadable` can skip a probe.
    private enum ReadHint {
        case unknown
        case ready
        /// A read found nothing when the reactor had counted this many read edges.
        case wouldBlock(UInt64)
    }

    /// Takes ownership of `fd` (it is closed by `close()` or on deinit) and makes it non-blocking.
    public init(adopting fd: Int32, reactor: Reactor = .shared) throws(SystemError) {
        let flags = fcntl(fd, F_GETFL)
        guard flags >= 0 else { throw .last("fcntl(F_GETFL, fd \(fd))") }
        if flags & O_NONBLOCK == 0, fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0 {
            throw .last("fcntl(F_SETFL, fd \(fd))")
        }
        self.wasBlocking = flags & O_NONBLOCK == 0
        var info = stat()
        isSocket = fstat(fd, &info) == 0 && (info.st_mode & S_IFMT) == S_IFSOCK
        self.fd = fd
        self.reactor = reactor
        self.registration = try reactor.register(fd)
    }

    deinit {
        close()
    }

    public var description: String { "fd \(fd)" }

    public var isClosed: Bool { usage.withLockedValue { $0.closed } }

    // MARK: ByteReader

    /// Returns at once while the last read made progress (the relay's fast path costs no extra
    /// syscall); after a read found nothing, waits for the next readiness edge.
    public func waitReadable() async throws {
        let hint = usage.withLockedValue { $0.readHint }
        switch hint {
        case .ready:
            return
        case .wouldBlock(let seen):
            try await registration.wait(.read, after: seen)
        case .unknown:
            let seen = registration.edges(.read)
            let ready: Bool = try withSyscall {
                var probe = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                return poll(&probe, 1, 0) > 0
            }
            if ready { return }
            try await registration.wait(.read, after: seen)
        }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer) async throws -> Int {
        while true {
            let seen = registration.edges(.read)
            if let count = try readNow(into: buffer) { return count }
            try await registration.wait(.read, after: seen)
        }
    }

    public func readNow(into buffer: UnsafeMutableRawBufferPointer) throws -> Int? {
        let seen = registration.edges(.read)
        let result = try withSyscall { () throws(SystemError) -> Int? in
            while true {
                let count = Glibc.read(fd, buffer.baseAddress, buffer.count)
                if count >= 0 { return count }
                switch Glibc.errno {
                case EINTR: continue
                case EAGAIN, EWOULDBLOCK: return nil
                default: throw .last("read(fd \(fd))")
                }
            }
        }
        usage.withLockedValue { $0.readHint = result == nil ? .wouldBlock(seen) : .ready }
        return result
    }

    // MARK: ByteWriter

    public func write(_ bytes: UnsafeRawBufferPointer) async throws(WriteFailure) {
        var written = 0
        while written < bytes.count {
            let seen = registration.edges(.write)
            let result: Int?
            do {
                result = try writeNow(UnsafeRawBufferPointer(rebasing: bytes[written...]))
            } catch {
                throw WriteFailure(accepted: written, cause: error)
            }
            if let result {
                written += result
                continue
            }
            do {
                try await registration.wait(.write, after: seen)
            } catch {
                throw WriteFailure(accepted: written, cause: error)
            }
        }
    }

    /// One writev per attempt for a frame's header and body, so a small header does not cost a
    /// syscall (or a packet) of its own.
    public func write(_ header: UnsafeRawBufferPointer, _ body: UnsafeRawBufferPointer) async throws(WriteFailure) {
        let total = header.count + body.count
        var written = 0
        while written < header.count {
            let seen = registration.edges(.write)
            let result: Int?
            do {
                result = try withSyscall { () throws(SystemError) -> Int? in
                    var vectors = [
                        iovec(iov_base: UnsafeMutableRawPointer(mutating: header.baseAddress! + written), iov_len: header.count - written),
                        iovec(iov_base: UnsafeMutableRawPointer(mutating: body.baseAddress), iov_len: body.count),
                    ]
                    let parts = body.count > 0 ? 2 : 1
                    while true {
                        let count = vectors.withUnsafeMutableBufferPointer { iov -> Int in
                            guard isSocket else { return writev(fd, iov.baseAddress, Int32(parts)) }
                            var message = msghdr()
                            message.msg_iov = iov.baseAddress
                            message.msg_iovlen = parts
                            return sendmsg(fd, &message, Int32(MSG_NOSIGNAL))
                        }
                        if count >= 0 { return count }
                        switch Glibc.errno {
                        case EINTR: continue
                        case EAGAIN, EWOULDBLOCK: return nil
                        default: throw .last("writev(fd \(fd))")
                        }
                    }
                }
            } catch {
                throw WriteFailure(accepted: written, cause: error)
            }
            if let result {
                written += result
                continue
            }
            do {
                try await registration.wait(.write, after: seen)
            } catch {
                throw WriteFailure(accepted: written, cause: error)
            }
        }
        guard written < total else { return }
        do {
            try await write(UnsafeRawBufferPointer(rebasing: body[(written - header.count)...]))
        } catch {
            throw WriteFailure(accepted: written + error.accepted, cause: error.cause)
        }
    }

    /// Writes what fits now: the count written, or `nil` if nothing fits.
    public func writeNow(_ bytes: UnsafeRawBufferPointer) throws -> Int? {
        try withSyscall { () throws(SystemError) -> Int? in
            while true {
                let count =
                    isSocket
                    ? Glibc.send(fd, bytes.baseAddress, bytes.count, Int32(MSG_NOSIGNAL))
                    : Glibc.write(fd, bytes.baseAddress, bytes.count)
                if count >= 0 { return count }
                switch Glibc.errno {
                case EINTR: continue
                case EAGAIN, EWOULDBLOCK: return nil
                default: throw .last(isSocket ? "send(fd \(fd))" : "write(fd \(fd))")
                }
            }
        }
    }

    /// Waits until the fd is writable (used by a non-blocking connect).
    public func waitWritable() async throws {
        let seen = registration.edges(.write)
        let ready: Bool = try withSyscall {
            var probe = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
            return poll(&probe, 1, 0) > 0
        }
        if ready { return }
        try await registration.wait(.write, after: seen)
    }

    // MARK: Building other operations (fd passing, accept)

    /// The reactor's edge count for a direction: read it before a non-blocking syscall, and if
    /// that syscall would block, wait for an edge after it.
    func registrationEdges(_ direction: Direction) -> UInt64 { registration.edges(direction) }
    func waitForReadEdge(after seen: UInt64) async throws { try await registration.wait(.read, after: seen) }
    func waitForWriteEdge(after seen: UInt64) async throws { try await registration.wait(.write, after: seen) }

    // MARK: Lifetime

    /// Shuts down the write side of a socket: the peer reads end-of-file after every byte sent.
    public func shutdownWrite() {
        try? withSyscall { _ = Glibc.shutdown(fd, Int32(SHUT_WR)) }
    }

    /// Stops managing the fd and hands the number to the caller, open: for giving an fd back
    /// (a broker release). Waiters are woken with `DescriptorClosed`. Returns nil if the fd was
    /// already closed or detached, or an operation is still in flight on it.
    public func detach() -> Int32? {
        let claimed: Bool = usage.withLockedValue { u in
            guard !u.closed, u.inFlight == 0 else { return false }
            u.closed = true
            u.released = true  // nobody closes the number now: it belongs to the caller
            return true
        }
        guard claimed else { return nil }
        reactor.deregister(registration, fd: fd)
        usage.withLockedValue { $0.deregistered = true }
        if wasBlocking {
            let flags = fcntl(fd, F_GETFL)
            if flags >= 0 { _ = fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) }
        }
        return fd
    }

    /// Closes the fd. Waiters are woken with `DescriptorClosed`; the fd number itself is released
    /// when the last in-flight syscall on it returns. Idempotent.
    public func close() {
        let first: Bool = usage.withLockedValue { u in
            guard !u.closed else { return false }
            u.closed = true
            return true
        }
        guard first else { return }
        // Deregister before the fd number can be released: epoll_ctl(DEL) on a number the kernel
        // already recycled would remove someone else's registration.
        reactor.deregister(registration, fd: fd)
        let releaseNow: Bool = usage.withLockedValue { u in
            u.deregistered = true
            guard u.inFlight == 0, !u.released else { return false }
            u.released = true
            return true
        }
        if releaseNow { _ = Glibc.close(fd) }
    }

    /// Runs `body` with the fd guaranteed open; throws `DescriptorClosed` after `close()`.
    public func withSyscall<T, E: Error>(_ body: () throws(E) -> T) throws -> T {
        let open = usage.withLockedValue { u -> Bool in
            guard !u.closed else { return false }
            u.inFlight += 1
            return true
        }
        guard open else { throw DescriptorClosed() }
        defer {
            let release: Bool = usage.withLockedValue { u in
                u.inFlight -= 1
                if u.deregistered, u.inFlight == 0, !u.released {
                    u.released = true
                    return true
                }
                return false
            }
            if release { _ = Glibc.close(fd) }
        }
        return try body()
    }
}
