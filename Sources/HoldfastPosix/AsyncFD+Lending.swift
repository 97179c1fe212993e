import CHoldfastShims
import HoldfastCore

#if canImport(Glibc)
import Glibc
#endif

// MARK: - Lending pages to a socket

/// A resumable sender copies each byte into its replay ring, where it must stay until the host
/// acknowledges it anyway. Sending it with sendmsg copies it a second time, into the socket's
/// buffers. Lent instead, the ring's pages go into a pipe of the socket's own by reference
/// (vmsplice(2)) and from there into the socket (splice(2)): the socket's buffers point at the
/// ring, and the reader's copy is the only other one. Frame headers, written into reused scratch
/// memory, are copied into the pipe (a 16-byte write).
///
/// The pipe belongs to the connection: it is made at the first lending write, holds nothing
/// between writes (a write returns once every byte is in the socket), and is closed with the
/// socket — or once the connection lent nothing for `lendingPipeIdle`: a pipe counts against
/// its user's pipe quota (fs.pipe-user-pages-soft) whether it holds anything or not, and a
/// broker with thousands of streams that were busy once must not hold thousands of them. A pipe
/// that may hold bytes of a failed write is closed at once, so nothing stale goes out on the
/// connection later.
extension AsyncFD {
    struct Lending {
        var pipe: PipeEnds?
        /// This socket copies: no pipe of a useful size could be had, or vmsplice is refused
        /// (an old kernel, a seccomp filter), or the socket is closed.
        var refused = false
        /// A lending write is under way (the pipe is in use outside the lock).
        var writing = false
        var usedSinceTrim = false
        var trimScheduled = false
    }

    /// What the pipe is asked to hold: 64 pages, a quarter of the sender's largest batch per
    /// vmsplice — a hundred busy streams then take 25 MiB of the broker user's 64 MiB pipe quota.
    static let lendingPipeCapacity = 256 * 1024
    /// A smaller pipe (a user over its pipe quota gets 8 KiB ones) would take a few pages per
    /// syscall: copying is cheaper then.
    static let smallestLendingPipe = 64 * 1024
    /// A pipe that lent nothing for this long is closed.
    static let lendingPipeIdle = Duration.seconds(2)

    @discardableResult
    public func write(vectors: [UnsafeRawBufferPointer], lent: [Bool]) async throws(WriteFailure) -> Int {
        guard isStreamSocket, lent.contains(true), let pipe = startLending() else {
            try await write(vectors: vectors)
            return 0
        }
        defer { lending.withLockedValue { $0.writing = false } }
        var iov: [iovec] = []
        var lends: [Bool] = []
        iov.reserveCapacity(vectors.count)
        lends.reserveCapacity(vectors.count)
        for (vector, isLent) in zip(vectors, lent) where vector.count > 0 {
            iov.append(iovec(iov_base: UnsafeMutableRawPointer(mutating: vector.baseAddress), iov_len: vector.count))
            lends.append(isLent)
        }
        let total = iov.reduce(0) { $0 + $1.iov_len }
        let lentTotal = zip(iov, lends).reduce(0) { $0 + ($1.1 ? $1.0.iov_len : 0) }
        var next = 0
        var inPipe = 0
        var written = 0
        while written < total {
            let seen = registration.edges(.write)
            do {
                // Under the socket's in-flight count: a concurrent close closes the pipe only
                // once no syscall on either is under way.
                try withSyscall { try fillLendingPipe(pipe, from: &iov, lent: lends, next: &next, inPipe: &inPipe) }
            } catch {
                throw abandonLendingPipe(refuse: true, accepted: written, cause: error)
            }
            let outcome: (count: Int, errno: Int32)
            do {
                outcome = try withSyscall {
                    while true {
                        let count = hf_splice(pipe.read, fd, inPipe)
                        if count >= 0 { return (count, 0) }
                        if Glibc.errno != EINTR { return (-1, Glibc.errno) }
                    }
                }
            } catch {
                throw abandonLendingPipe(accepted: written, cause: error)
            }
            if outcome.count > 0 {
                inPipe -= outcome.count
                written += outcome.count
                continue
            }
            guard outcome.count < 0, outcome.errno == EAGAIN || outcome.errno == EWOULDBLOCK else {
                let cause = SystemError("splice(lending pipe → fd \(fd))", errno: .init(rawValue: outcome.count == 0 ? EPIPE : outcome.errno))
                throw abandonLendingPipe(accepted: written, cause: cause)
            }
            do {
                try await registration.wait(.write, after: seen)
            } catch {
                throw abandonLendingPipe(accepted: written, cause: error)
            }
        }
        return lentTotal
    }

    /// Puts what fits of `iov[next...]` in the pipe: runs of lent vectors by one vmsplice each,
    /// the others (frame headers) by write. Stops when the pipe is full or everything is in.
    private func fillLendingPipe(
        _ pipe: PipeEnds, from iov: inout [iovec], lent: [Bool], next: inout Int, inPipe: inout Int
    ) throws {
        while next < iov.count {
            let count: Int
            if lent[next] {
                var end = next + 1
                while end < iov.count, lent[end], end - next < AsyncFD.maxVectors { end += 1 }
                let first = next
                count = iov.withUnsafeBufferPointer { hf_vmsplice(pipe.write, $0.baseAddress! + first, UInt(end - first)) }
            } else {
                count = Glibc.write(pipe.write, iov[next].iov_base, iov[next].iov_len)
            }
            if count < 0 {
                switch Glibc.errno {
                case EINTR: continue
                case EAGAIN, EWOULDBLOCK: return
                default: throw SystemError.last(lent[next] ? "vmsplice(lending pipe)" : "write(lending pipe)")
                }
            }
            inPipe += count
            var consumed = count
            while consumed > 0 {
                if consumed >= iov[next].iov_len {
                    consumed -= iov[next].iov_len
                    next += 1
                } else {
                    iov[next].iov_base += consumed
                    iov[next].iov_len -= consumed
                    consumed = 0
                }
            }
        }
    }

    /// The socket's lending pipe, made if it has none, marked in use; nil when this socket
    /// copies.
    private func startLending() -> PipeEnds? {
        let (pipe, scheduleTrim) = lending.withLockedValue { state -> (PipeEnds?, Bool) in
            guard !state.refused else { return (nil, false) }
            if state.pipe == nil {
                state.pipe = Self.makeLendingPipe()
                if state.pipe == nil {
                    state.refused = true
                    return (nil, false)
                }
            }
            state.writing = true
            state.usedSinceTrim = true
            defer { state.trimScheduled = true }
            return (state.pipe, !state.trimScheduled)
        }
        if scheduleTrim { TimeoutWheel.shared.schedule(after: Self.lendingPipeIdle) { [weak self] in self?.trimLendingPipe() } }
        return pipe
    }

    /// Closes the pipe if the connection lent nothing since the last look; else looks again later.
    func trimLendingPipe() {
        let (idle, again) = lending.withLockedValue { state -> (PipeEnds?, Bool) in
            if state.usedSinceTrim || state.writing {
                state.usedSinceTrim = false
                return (nil, true)
            }
            state.trimScheduled = false
            defer { state.pipe = nil }
            return (state.pipe, false)
        }
        if let idle { Self.close(idle) }
        if again { TimeoutWheel.shared.schedule(after: Self.lendingPipeIdle) { [weak self] in self?.trimLendingPipe() } }
    }

    /// Whether the socket holds a lending pipe now.
    var holdsLendingPipe: Bool { lending.withLockedValue { $0.pipe != nil } }

    private static func close(_ pipe: PipeEnds) {
        Glibc.close(pipe.read)
        Glibc.close(pipe.write)
    }

    private static func makeLendingPipe() -> PipeEnds? {
        guard let pipe = try? PipeEnds.make() else { return nil }
        let flags = fcntl(pipe.write, F_GETFL)
        // (The header writes must not block; vmsplice and splice are asked not to.)
        guard flags >= 0, fcntl(pipe.write, F_SETFL, flags | O_NONBLOCK) == 0,
            let capacity = PipeEnds.setCapacity(of: pipe.write, to: lendingPipeCapacity), capacity >= smallestLendingPipe,
            // vmsplice of nothing: refused here if a filter or the kernel refuses it at all.
            hf_vmsplice(pipe.write, nil, 0) >= 0
        else {
            close(pipe)
            return nil
        }
        return pipe
    }

    /// A lending write failed: its pipe may hold bytes that must never follow on this
    /// connection, so it goes (a later write makes another, unless `refuse`).
    private func abandonLendingPipe(refuse: Bool = false, accepted: Int, cause: any Error) -> WriteFailure {
        let pipe = lending.withLockedValue { state -> PipeEnds? in
            defer {
                state.pipe = nil
                if refuse { state.refused = true }
            }
            return state.pipe
        }
        if let pipe { Self.close(pipe) }
        return writeFailure(accepted: accepted, cause: cause)
    }

    /// Closes the lending pipe for good (the socket is closed or handed over).
    func closeLendingPipe() {
        let pipe = lending.withLockedValue { state -> PipeEnds? in
            defer {
                state.pipe = nil
                state.refused = true
            }
            return state.pipe
        }
        if let pipe { Self.close(pipe) }
    }
}
