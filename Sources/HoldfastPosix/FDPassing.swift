import CHoldfastShims
import HoldfastCore

#if canImport(Glibc)
import Glibc
#endif

/// A received message: its payload and the fds that came with it (owned by the receiver, all
/// close-on-exec).
public struct ReceivedMessage: Sendable {
    public var payload: [UInt8]
    public var descriptors: [Int32]

    /// Closes every fd that came with the message (for a message that is refused) on a closer
    /// thread (`ForeignCloser`): a last close runs the file's release, which its sender can make
    /// wait (a pipe's lock, a lingering TCP socket, a FUSE file).
    public func closeDescriptors() {
        ForeignCloser.shared.close(descriptors)
    }
}

/// Why a message with fds was refused. The message's fds are closed before this is thrown, so a
/// refusal never leaks a descriptor.
public enum FDPassingError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The peer closed the connection (0 bytes read).
    case endOfFile
    /// More fds than this receiver accepts per message were attached; they were closed.
    case tooManyDescriptors(received: Int, limit: Int)
    /// The kernel truncated the fds (MSG_CTRUNC): some were lost in flight — the receiver was
    /// at its limit on open files. The message's bytes, for a refusal that names it; the fds
    /// that did arrive are closed.
    case descriptorsTruncated(payload: [UInt8])
    /// The payload did not fit the receive buffer (MSG_TRUNC on a datagram socket).
    case payloadTruncated(limit: Int)
    /// More fds than a sender may attach to one message.
    case sendLimitExceeded(count: Int, limit: Int)
    case system(SystemError)

    public var description: String {
        switch self {
        case .endOfFile: return "the peer closed the connection"
        case .tooManyDescriptors(let received, let limit): return "\(received) fds attached, at most \(limit) accepted; all were closed"
        case .descriptorsTruncated: return "the kernel truncated the attached fds (MSG_CTRUNC)"
        case .payloadTruncated(let limit): return "message larger than \(limit) bytes"
        case .sendLimitExceeded(let count, let limit): return "cannot attach \(count) fds: at most \(limit) per message"
        case .system(let error): return error.description
        }
    }
}

/// A Unix socket that carries messages with fds attached (SCM_RIGHTS). Used between the
/// supervisor and the broker (a SOCK_SEQPACKET socketpair: one message per packet) and on the
/// broker's public handoff socket.
///
/// Receiving uses MSG_CMSG_CLOEXEC, treats MSG_CTRUNC as an error, closes any fd beyond what
/// the caller accepts, and caps fds per message; a refused message's fds are always closed.
public final class FDChannel: Sendable {
    /// The most fds one message may carry (the kernel's own limit is 253).
    public static let maxDescriptorsPerMessage = 64

    public let socket: AsyncFD

    public init(_ socket: AsyncFD) {
        self.socket = socket
    }

    /// A connected pair of SOCK_SEQPACKET sockets, both close-on-exec (pass one to a child
    /// explicitly).
    public static func pair() throws(SystemError) -> (Int32, Int32) {
        var fds: [Int32] = [-1, -1]
        _ = try retryingInterrupts("socketpair(SEQPACKET)") {
            socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds)
        }
        return (fds[0], fds[1])
    }

    /// Sends one message with `descriptors` attached. The caller keeps its copies of the fds
    /// (close them after a successful send if they were only meant for the peer).
    /// How many times a send the kernel refused for want of memory is tried again, 50 ms apart.
    static let shortOfMemoryRetries = 20

    public func send(_ payload: [UInt8], descriptors: [Int32] = []) async throws(FDPassingError) {
        guard descriptors.count <= Self.maxDescriptorsPerMessage else {
            throw .sendLimitExceeded(count: descriptors.count, limit: Self.maxDescriptorsPerMessage)
        }
        var shortOfMemory = 0
        while true {
            let seen = socket.registrationEdges(.write)
            let result: Int?
            do {
                result = try socket.withSyscall { () throws(SystemError) -> Int? in
                    while true {
                        let sent = payload.withUnsafeBytes { bytes in
                            descriptors.withUnsafeBufferPointer { fds in
                                hf_send_with_fds(socket.fd, bytes.baseAddress, bytes.count, fds.baseAddress, Int32(fds.count))
                            }
                        }
                        if sent >= 0 { return sent }
                        switch Glibc.errno {
                        case EINTR: continue
                        case EAGAIN, EWOULDBLOCK: return nil
                        default: throw .last("sendmsg(SCM_RIGHTS)")
                        }
                    }
                }
            } catch let failure as SystemError {
                // The kernel short of memory for the message (ENOBUFS, ENOMEM) for a moment: a
                // message lost between roles costs more than a pause, so it is tried again for a
                // second before the caller is told.
                if [ENOBUFS, ENOMEM].contains(failure.number), shortOfMemory < Self.shortOfMemoryRetries {
                    shortOfMemory += 1
                    do {
                        try await Task.sleep(for: .milliseconds(50))
                    } catch {
                        throw .system(failure)
                    }
                    continue
                }
                throw .system(failure)
            } catch {
                throw .system(SystemError("sendmsg(SCM_RIGHTS)", errno: .badFileDescriptor))
            }
            if let result {
                // SEQPACKET sends whole messages; a stream socket may take part of the payload
                // (the fds went with the first byte): send the rest without fds.
                if result < payload.count {
                    try await sendRemainder(Array(payload[result...]))
                }
                return
            }
            do {
                try await socket.waitForWriteEdge(after: seen)
            } catch {
                throw .system(SystemError("sendmsg(SCM_RIGHTS)", errno: .badFileDescriptor))
            }
        }
    }

    private func sendRemainder(_ rest: [UInt8]) async throws(FDPassingError) {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: rest.count, alignment: 1)
        defer { buffer.deallocate() }
        buffer.copyBytes(from: rest)
        do {
            try await socket.write(UnsafeRawBufferPointer(buffer))
        } catch {
            throw .system((error.cause as? SystemError) ?? SystemError("send", errno: .brokenPipe))
        }
    }

    /// Receives one message of at most `maxPayload` bytes with at most `maxDescriptors` fds.
    public func receive(maxPayload: Int = 65536, maxDescriptors: Int = maxDescriptorsPerMessage) async throws(FDPassingError) -> ReceivedMessage {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, maxPayload), alignment: 8)
        defer { buffer.deallocate() }
        while true {
            let seen = socket.registrationEdges(.read)
            let outcome: Result<ReceivedMessage, FDPassingError>?
            do {
                outcome = try socket.withSyscall { () -> Result<ReceivedMessage, FDPassingError>? in
                    Self.receiveNow(socket.fd, buffer: buffer, maxPayload: maxPayload, maxDescriptors: maxDescriptors)
                }
            } catch {
                throw .system(SystemError("recvmsg", errno: .badFileDescriptor))
            }
            if let outcome { return try outcome.get() }
            do {
                try await socket.waitForReadEdge(after: seen)
            } catch {
                throw .system(SystemError("recvmsg", errno: .badFileDescriptor))
            }
        }
    }

    /// SCM_MAX_FD: the most fds the kernel lets one message carry.
    static let mostDescriptorsAMessageCarries = 253

    private static func receiveNow(
        _ fd: Int32, buffer: UnsafeMutableRawBufferPointer, maxPayload: Int, maxDescriptors: Int
    ) -> Result<ReceivedMessage, FDPassingError>? {
        // Room for every fd a message can carry (SCM_MAX_FD), whatever this receiver accepts: the
        // kernel lets go of fds that do not fit, and a surplus closed in the shim was closed on
        // this thread — each a release its sender can make wait. Past `maxDescriptors` they are
        // refused here and closed on a closer thread.
        var fds = [Int32](repeating: -1, count: Self.mostDescriptorsAMessageCarries)
        var count: Int32 = 0
        var surplus: Int32 = 0
        var truncated: Int32 = 0
        var payloadTruncated: Int32 = 0
        func receiveOnce() -> Int {
            fds.withUnsafeMutableBufferPointer { fdBuffer in
                hf_recv_with_fds(
                    fd, buffer.baseAddress, maxPayload, fdBuffer.baseAddress, Int32(Self.mostDescriptorsAMessageCarries), &count, &surplus,
                    &truncated, &payloadTruncated, 0)
            }
        }
        var got = receiveOnce()
        if got < 0, Glibc.errno == ECONNRESET {
            // A peer that died with messages of ours unread leaves ECONNRESET pending here, and
            // a seqpacket socket reports it before the messages the peer sent first (the error
            // is checked ahead of the queue). Reporting it once consumed it: what the peer said
            // before it died is read now, then end-of-file. Taken as the end, it lost a dying
            // broker's last notifications (its `handoff-releasing`: a release kept was relayed).
            got = receiveOnce()
        }
        if got < 0 {
            let error = Glibc.errno
            if error == EAGAIN || error == EWOULDBLOCK || error == EINTR { return nil }
            return .failure(.system(SystemError("recvmsg", errno: .init(rawValue: error))))
        }
        let received = ReceivedMessage(payload: Array(buffer[..<got]), descriptors: Array(fds[..<Int(count)]))
        if Int(count) > maxDescriptors {
            received.closeDescriptors()
            return .failure(.tooManyDescriptors(received: Int(count + surplus), limit: maxDescriptors))
        }
        if truncated != 0 {
            received.closeDescriptors()
            return .failure(.descriptorsTruncated(payload: received.payload))
        }
        if surplus > 0 {
            received.closeDescriptors()
            return .failure(.tooManyDescriptors(received: Int(count + surplus), limit: maxDescriptors))
        }
        if payloadTruncated != 0 {
            received.closeDescriptors()
            return .failure(.payloadTruncated(limit: maxPayload))
        }
        if got == 0 && count == 0 { return .failure(.endOfFile) }
        return .success(received)
    }

    public func close() { socket.close() }

    /// Closes the connection of a peer that is not Holdfast (a handoff peer) on a closer thread:
    /// what it sent and nobody read is let go of with the socket, fds included, and their
    /// releases can wait (`ForeignCloser`). A plain `close` let them go on this thread.
    public func closeForeign() {
        guard let fd = socket.detach() else {
            socket.close()  // a syscall on it under way: closed when that ends, as before
            return
        }
        ForeignCloser.shared.close(fd)
    }

    /// Whether a message waits here unread (FIONREAD: the next message's length). False once
    /// closed, at end-of-file, or if the kernel will not say.
    public var hasUnreadMessage: Bool {
        let waiting = try? socket.withSyscall { () -> Bool in
            var length: Int32 = 0
            return ioctl(socket.fd, UInt(FIONREAD), &length) == 0 && length > 0
        }
        return waiting ?? false
    }
}

/// The credentials of the process at the other end of a Unix socket (SO_PEERCRED), as the
/// kernel recorded them at connect time: they cannot be forged by the peer.
public struct PeerCredentials: Sendable, Equatable {
    public var pid: pid_t
    public var uid: uid_t
    public var gid: gid_t

    public static func of(_ socket: AsyncFD) throws -> PeerCredentials {
        try socket.withSyscall { () throws(SystemError) -> PeerCredentials in
            var pid: pid_t = 0
            var uid: uid_t = 0
            var gid: gid_t = 0
            guard hf_peer_credentials(socket.fd, &pid, &uid, &gid) == 0 else { throw .last("getsockopt(SO_PEERCRED)") }
            return PeerCredentials(pid: pid, uid: uid, gid: gid)
        }
    }
}
