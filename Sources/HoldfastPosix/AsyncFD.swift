import CHoldfastShims
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
    /// A pipe or FIFO: one end of a splice(2) must be one.
    public let isPipe: Bool
    /// A pipe's capacity (F_GETPIPE_SZ), asked by the first splice from it: 0 until then, -1 if
    /// the kernel would not say. Not asked at adoption: F_GETPIPE_SZ takes the pipe's lock, which
    /// a guest process can hold as long as it likes, and adoption may run on any thread, where
    /// the first splice runs on the reactor's, whose watchdog takes over from a stuck thread.
    private let knownPipeCapacity = Atomic<Int>(0)
    /// A SOCK_STREAM socket (Unix, TCP, vsock): a read that returns less than it asked for took
    /// everything queued (`ReadHint`).
    public let isStreamSocket: Bool
    /// The file, if a read takes its bytes away (a pipe, a socket, a pty master): the broker
    /// lets no second stream read it (or write it) alongside this one's.
    public let consumedFile: FileIdentity?
    /// A terminal's master (any character device here) is read 4 KiB at a time, its line
    /// discipline's buffer (`ByteReader.largestRead`); nil for anything else.
    public let largestRead: Int?
    /// The file description may be shared with processes that are not ours (a process's side of
    /// its stdio: a runtime's copy, a shell that inherited it), any of which can clear the
    /// description's O_NONBLOCK after we set it. Every read and write here asks for non-blocking
    /// itself (`MSG_DONTWAIT` on a socket, `RWF_NOWAIT` on a pipe) whatever the description
    /// says; a splice does too for a pipe, but waits for a socket's room (or, over TCP, its
    /// data) as its description says — so a foreign socket is never spliced.
    public let foreignDescription: Bool
    /// An AF_UNIX socket (`spliceNeverWaits`).
    private let isUnixSocket: Bool
    /// This kernel's pipes refused `RWF_NOWAIT` (EOPNOTSUPP): plain reads and writes, relying on
    /// the description's O_NONBLOCK, as before the flag existed.
    private let noWaitRefused = Atomic<Bool>(false)
    /// Another holder of this foreign description cleared its O_NONBLOCK and it was set again
    /// (`keepNonBlocking`): the holder's wish is put back when we let go.
    private let restoredNonBlocking = Atomic<Bool>(false)
    /// The fd was blocking when adopted (restored when it is handed back by `detach`).
    private let wasBlocking: Bool
    let reactor: Reactor
    private let registration: Registration
    private let usage = NIOLockedValueBox(Usage())
    /// IOV_MAX on Linux: the most iovecs one readv or writev takes.
    static let maxVectors = 1024
    /// A splice between this fd and another failed with EINVAL: copy instead.
    private let spliceRefused = Atomic<Bool>(false)
    #if DEBUG
    /// The file adopted (device, inode), checked at `close()` in debug builds (every test): an fd
    /// someone else closed, its number then given to a new file, would otherwise be taken out
    /// of epoll and closed here — the new file's owner waiting for ever on a file nobody watches.
    private let adoptedFile: (device: UInt, inode: UInt)?
    #endif

    private struct Usage {
        var inFlight = 0
        var closed = false
        var deregistered = false
        var released = false
        var readHint = ReadHint.unknown
        /// The last read was refused for want of memory (`isShortage`), not found empty.
        var lastReadShort = false
    }
    #if DEBUG
    /// Calls still to fail as in a shortage (`injectShortages`).
    private let injectedShortages = Atomic<Int>(0)
    #endif

    // MARK: Shortages

    /// A read, write or splice the kernel refused for want of memory: ENOMEM (a pipe page it
    /// could not charge, a terminal's buffer), ENOBUFS (a socket's buffer), EFAULT (a page of
    /// ours it had to fault in inside the call and could not: a replay-ring block given back and
    /// used again, under a memory limit). None of them is the stream's end or the process's:
    /// the bytes stay where they were (in the pipe, in our buffer), and the call is made again
    /// after `shortageRetry`. Taken for an end, a stdout got its END while the process still
    /// wrote (its next write a SIGPIPE) and a stdin was closed under its reader.
    static func isShortage(_ number: Int32) -> Bool {
        number == ENOMEM || number == ENOBUFS || number == EFAULT
    }

    /// How long a call refused for want of memory waits before it is made again: no readiness
    /// report says when memory is back.
    public static let shortageRetry: Duration = .milliseconds(100)

    /// Calls refused for want of memory and waited out, in this process (a metric).
    public static var shortagesWaitedOut: UInt64 { shortages.load(ordering: .relaxed) }
    private static let shortages = Atomic<UInt64>(0)

    /// Calls on this fd refused for want of memory and waited out (for tests).
    var shortagesWaitedOutHere: Int { shortagesHere.load(ordering: .relaxed) }
    private let shortagesHere = Atomic<Int>(0)

    /// Counts a refused call and wakes `direction`'s waiters after `shortageRetry`.
    func waitOutShortage(_ direction: Direction) {
        Self.shortages.add(1, ordering: .relaxed)
        shortagesHere.add(1, ordering: .relaxed)
        registration.wakeLater(direction, after: Self.shortageRetry)
    }

    /// Whether the last read (or window fill) on this fd found the kernel short of memory
    /// rather than nothing to read: its bytes are still there.
    public var lastReadFoundShortage: Bool { usage.withLockedValue { $0.lastReadShort } }

    /// Debug builds: the next `count` reads, writes and splices on this fd fail as in a
    /// shortage (reads alternately EFAULT and ENOMEM, writes and splices ENOMEM), for tests
    /// (`Failpoint.streamShortage`). Does nothing in a release build.
    public func injectShortages(_ count: Int) {
        #if DEBUG
        injectedShortages.store(count, ordering: .relaxed)
        #endif
    }

    /// An injected shortage for this call, if one is left: sets errno and says so.
    func injectedShortage(_ number: Int32) -> Bool {
        #if DEBUG
        guard injectedShortages.load(ordering: .relaxed) > 0 else { return false }
        let left = injectedShortages.subtract(1, ordering: .relaxed).newValue
        Glibc.errno = number == EFAULT && left % 2 == 0 ? ENOMEM : number
        return true
        #else
        return false
        #endif
    }

    /// What the last read said about readability, so `waitReadable` can skip a probe.
    ///
    /// Only an EAGAIN (or a poll that found nothing) says "empty" — or a short read of a stream
    /// socket: a byte stream's read returns less than asked only when it took all that was
    /// queued (no message boundaries; Holdfast sends no ancillary data on one, and none of its
    /// stream sockets asks for credentials), and what arrives after it is a new readiness edge,
    /// counted after `seen` — unless the peer had already hung up, which is reported once. That
    /// spares the resumable receiver an EAGAIN probe per wake-up.
    /// Otherwise a short read does not say "empty". A short
    /// splice may have been cut by a full socket with bytes left in the pipe; a pipe created in
    /// packet mode (O_DIRECT) gives one packet per read; a socket stops at a message carrying fds —
    /// and readiness is reported only for what arrives *after* a wait's count, so a relay that
    /// took any of those for "empty" would wait for bytes that are already there (it did: a
    /// spliced relay hung, once in a dozen 2 GiB runs, after a splice cut short while its
    /// producer sat blocked on the full pipe).
    private enum ReadHint {
        case unknown
        case ready
        /// A read found nothing when the reactor had counted this many read edges.
        case wouldBlock(UInt64)
    }

    /// Takes ownership of `fd` (it is closed by `close()` or on deinit) and makes it non-blocking.
    /// `foreignDescription`: the description may be shared with processes that are not ours.
    public init(adopting fd: Int32, reactor: Reactor = .shared, foreignDescription: Bool = false) throws(SystemError) {
        let flags = fcntl(fd, F_GETFL)
        guard flags >= 0 else { throw .last("fcntl(F_GETFL, fd \(fd))") }
        if flags & O_NONBLOCK == 0, fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0 {
            throw .last("fcntl(F_SETFL, fd \(fd))")
        }
        self.wasBlocking = flags & O_NONBLOCK == 0
        self.foreignDescription = foreignDescription
        var info = stat()
        let statted = fstat(fd, &info) == 0
        isSocket = statted && (info.st_mode & S_IFMT) == S_IFSOCK
        isPipe = statted && (info.st_mode & S_IFMT) == S_IFIFO
        var type: Int32 = 0
        var size = socklen_t(MemoryLayout<Int32>.size)
        isStreamSocket = isSocket && getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &size) == 0 && type == Int32(SOCK_STREAM.rawValue)
        var domain: Int32 = 0
        size = socklen_t(MemoryLayout<Int32>.size)
        isUnixSocket = isSocket && getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &size) == 0 && domain == AF_UNIX
        largestRead = statted && (info.st_mode & S_IFMT) == S_IFCHR ? 4096 : nil
        consumedFile = statted ? DescriptorFacts.consumedFile(info) : nil
        self.fd = fd
        self.reactor = reactor
        #if DEBUG
        adoptedFile = statted ? (UInt(info.st_dev), UInt(info.st_ino)) : nil
        #endif
        self.registration = try reactor.register(fd)
    }

    deinit {
        close()
    }

    public var description: String { "fd \(fd)" }

    public var isClosed: Bool { usage.withLockedValue { $0.closed } }

    /// A pipe's capacity; nil for anything else, or if the kernel would not say.
    var pipeCapacity: Int? {
        var capacity = knownPipeCapacity.load(ordering: .relaxed)
        if capacity == 0 {
            capacity = isPipe ? (try? withSyscall { Int(hf_pipe_capacity(fd)) }) ?? -1 : -1
            knownPipeCapacity.store(capacity > 0 ? capacity : -1, ordering: .relaxed)
        }
        return capacity > 0 ? capacity : nil
    }

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
        var short = false
        let result = try withSyscall { () throws(SystemError) -> Int? in
            var iov = iovec(iov_base: buffer.baseAddress, iov_len: buffer.count)
            while true {
                let count = readOnce(&iov, 1)
                if count >= 0 { return count }
                switch Glibc.errno {
                case EINTR: continue
                case EAGAIN, EWOULDBLOCK: return nil
                case let number where Self.isShortage(number):
                    waitOutShortage(.read)
                    short = true
                    return nil
                default: throw .last("read(fd \(fd))")
                }
            }
        }
        noteRead(result, asked: buffer.count, seen: seen, short: short)
        return result
    }

    /// One readv for several buffers, filled in order.
    public func readNow(into buffers: [UnsafeMutableRawBufferPointer]) throws -> Int? {
        if buffers.count == 1 { return try readNow(into: buffers[0]) }
        let seen = registration.edges(.read)
        var iov = buffers.map { iovec(iov_base: $0.baseAddress, iov_len: $0.count) }
        var short = false
        let result = try withSyscall { () throws(SystemError) -> Int? in
            while true {
                let count = iov.withUnsafeMutableBufferPointer { readOnce($0.baseAddress!, min($0.count, AsyncFD.maxVectors)) }
                if count >= 0 { return count }
                switch Glibc.errno {
                case EINTR: continue
                case EAGAIN, EWOULDBLOCK: return nil
                case let number where Self.isShortage(number):
                    waitOutShortage(.read)
                    short = true
                    return nil
                default: throw .last("readv(fd \(fd))")
                }
            }
        }
        let asked = buffers.prefix(AsyncFD.maxVectors).reduce(0) { $0 + $1.count }
        noteRead(result, asked: asked, seen: seen, short: short)
        return result
    }

    /// Whether a splice(2) with SPLICE_F_NONBLOCK out of (or into) this fd returns rather than
    /// waits, whatever its description's O_NONBLOCK says: always for a pipe; for a socket, only
    /// out of a Unix one (a splice waits for a socket's room, and for a TCP or vsock socket's
    /// data, as the description says). Ours are non-blocking for good; a foreign one may not be.
    ///
    /// Never out of a foreign socket, though: a splice out of a Unix socket lets go of the fds
    /// its messages carry inside the call (the kernel releases them, and a release can wait: a
    /// lingering TCP socket's close), on the loop's thread. Its bytes are copied instead, the
    /// fds taken and closed elsewhere (`readOnce`).
    public func spliceNeverWaits(asSource: Bool) -> Bool {
        guard isSocket, foreignDescription else { return true }
        return false
    }

    /// One read that never waits (`foreignDescription`): recvmsg with MSG_DONTWAIT on a socket,
    /// preadv2 with RWF_NOWAIT on a pipe, readv elsewhere (a terminal: its O_NONBLOCK). The
    /// count, or -1 with errno.
    private func readOnce(_ iov: UnsafeMutablePointer<iovec>, _ count: Int) -> Int {
        if injectedShortage(EFAULT) { return -1 }
        if isSocket, isUnixSocket, foreignDescription {
            // A process can send fds over its own stdout socket. Read without a control buffer,
            // the kernel let go of them inside the call, on this thread (the loop's), and their
            // releases can wait for as long as the process pleases: 65 such messages stranded
            // every thread the loop's watchdog may make. Taken here, they close on a closer thread.
            return withUnsafeTemporaryAllocation(of: Int32.self, capacity: 253) { fds -> Int in
                var taken: Int32 = 0
                var result = hf_recvmsg_taking_fds(fd, iov, Int32(count), Int32(MSG_DONTWAIT), fds.baseAddress, &taken)
                if result < 0, Glibc.errno == ECONNRESET, !isStreamSocket {
                    result = hf_recvmsg_taking_fds(fd, iov, Int32(count), Int32(MSG_DONTWAIT), fds.baseAddress, &taken)
                }
                let saved = Glibc.errno
                if taken > 0 { ForeignCloser.shared.close(Array(fds.prefix(Int(taken)))) }
                Glibc.errno = saved
                return result
            }
        }
        if isSocket {
            var message = msghdr()
            message.msg_iov = iov
            message.msg_iovlen = count
            let result = recvmsg(fd, &message, Int32(MSG_DONTWAIT))
            // A Unix seqpacket or datagram peer that closed with bytes of ours unread leaves
            // ECONNRESET pending, reported ahead of the messages it sent before (a stream
            // socket reports it after them): once reported it is consumed, and those are read.
            guard result < 0, Glibc.errno == ECONNRESET, isUnixSocket, !isStreamSocket else { return result }
            return recvmsg(fd, &message, Int32(MSG_DONTWAIT))
        }
        if isPipe, !noWaitRefused.load(ordering: .relaxed) {
            let result = hf_readv_nowait(fd, iov, Int32(count))
            guard result < 0, Glibc.errno == EOPNOTSUPP else { return result }
            noWaitRefused.store(true, ordering: .relaxed)
        }
        keepNonBlocking()
        return readv(fd, iov, Int32(count))
    }

    /// One write that never waits: sendmsg with MSG_DONTWAIT (and no SIGPIPE) on a socket,
    /// pwritev2 with RWF_NOWAIT on a pipe, writev elsewhere. The count, or -1 with errno.
    private func writeOnce(_ iov: UnsafeMutablePointer<iovec>, _ count: Int) -> Int {
        if injectedShortage(ENOMEM) { return -1 }
        if isSocket {
            var message = msghdr()
            message.msg_iov = iov
            message.msg_iovlen = count
            return sendmsg(fd, &message, Int32(MSG_NOSIGNAL | MSG_DONTWAIT))
        }
        if isPipe, !noWaitRefused.load(ordering: .relaxed) {
            let result = hf_writev_nowait(fd, iov, Int32(count))
            guard result < 0, Glibc.errno == EOPNOTSUPP else { return result }
            noWaitRefused.store(true, ordering: .relaxed)
        }
        keepNonBlocking()
        return writev(fd, iov, Int32(count))
    }

    /// Sets O_NONBLOCK again on a foreign description another holder cleared it on: before a
    /// read or write that has no per-call "do not wait" (a terminal, another character device,
    /// a pipe whose kernel refuses RWF_NOWAIT), which would otherwise wait in the kernel on the
    /// reactor's thread until the watchdog took over — and again at every call after. One fcntl
    /// per call, on those fds only; a holder that clears it between the check and the call still
    /// costs one wait (the watchdog's case).
    private func keepNonBlocking() {
        guard foreignDescription else { return }
        let flags = fcntl(fd, F_GETFL)
        guard flags >= 0, flags & O_NONBLOCK == 0 else { return }
        if fcntl(fd, F_SETFL, flags | O_NONBLOCK) == 0 { restoredNonBlocking.store(true, ordering: .relaxed) }
    }

    /// One non-blocking splice(2) from `source` into this fd, retried on EINTR, with both fds
    /// held open for it: the bytes moved, or -1 and the errno. Throws `DescriptorClosed` if
    /// either was closed.
    func spliceOnce(from source: AsyncFD, limit: Int) throws -> (count: Int, errno: Int32) {
        // As the kernel answers two fds it cannot splice: the caller reads and writes instead.
        guard source.spliceNeverWaits(asSource: true), spliceNeverWaits(asSource: false) else { return (-1, EINVAL) }
        return try source.withSyscall {
            try withSyscall { () -> (count: Int, errno: Int32) in
                // SPLICE_F_NONBLOCK covers the pipe side only: a terminal's side waits as its
                // description says.
                if !source.isPipe, !source.isSocket { source.keepNonBlocking() }
                if !isPipe, !isSocket { keepNonBlocking() }
                if source.injectedShortage(ENOMEM) || injectedShortage(ENOMEM) { return (-1, ENOMEM) }
                while true {
                    let count = hf_splice(source.fd, fd, limit)
                    if count >= 0 { return (count, 0) }
                    if Glibc.errno != EINTR { return (-1, Glibc.errno) }
                }
            }
        }
    }

    /// Records what a read (or a splice out of this fd) found: `nil` for nothing (EAGAIN).
    func noteRead(_ result: Int?, seen: UInt64, short: Bool = false) {
        usage.withLockedValue {
            $0.readHint = result == nil ? .wouldBlock(seen) : .ready
            $0.lastReadShort = short
        }
    }



    /// A read of this fd that asked for `asked` bytes: on a stream socket, fewer (but some)
    /// means it took all that was queued.
    private func noteRead(_ result: Int?, asked: Int, seen: UInt64, short: Bool) {
        // Not after a hang-up: reported once, as an edge that may be counted already — the
        // next read must find the end-of-file, not a wait for an edge that never comes.
        if isStreamSocket, let result, result > 0, result < asked, !registration.hasHungUp {
            usage.withLockedValue {
                $0.readHint = .wouldBlock(seen)
                $0.lastReadShort = false
            }
        } else {
            noteRead(result, seen: seen, short: short)
        }
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
                throw writeFailure(accepted: written, cause: error)
            }
            if let result {
                written += result
                // A short write filled the pipe or the socket buffer: wait without an EAGAIN probe.
                if written == bytes.count || result == 0 { continue }
            }
            do {
                try await registration.wait(.write, after: seen)
            } catch {
                throw writeFailure(accepted: written, cause: error)
            }
        }
    }

    /// One writev (sendmsg on a socket) per attempt for a frame's header and body, so a small
    /// header does not cost a syscall (or a packet) of its own.
    public func write(_ header: UnsafeRawBufferPointer, _ body: UnsafeRawBufferPointer) async throws(WriteFailure) {
        try await write(vectors: [header, body])
    }

    /// One writev (sendmsg on a socket) per attempt for all of `vectors`; after a short write,
    /// waits for room without an EAGAIN probe and goes on from where it stopped.
    public func write(vectors: [UnsafeRawBufferPointer]) async throws(WriteFailure) {
        var iov = vectors.compactMap { vector -> iovec? in
            guard vector.count > 0 else { return nil }
            return iovec(iov_base: UnsafeMutableRawPointer(mutating: vector.baseAddress), iov_len: vector.count)
        }
        let total = iov.reduce(0) { $0 + $1.iov_len }
        var written = 0
        var first = 0
        while written < total {
            let seen = registration.edges(.write)
            let parts = min(iov.count - first, AsyncFD.maxVectors)
            let offered = iov[first..<first + parts].reduce(0) { $0 + $1.iov_len }
            let result: Int?
            do {
                result = try withSyscall { () throws(SystemError) -> Int? in
                    while true {
                        let count = iov.withUnsafeMutableBufferPointer { writeOnce($0.baseAddress! + first, parts) }
                        if count >= 0 { return count }
                        switch Glibc.errno {
                        case EINTR: continue
                        case EAGAIN, EWOULDBLOCK: return nil
                        case let number where Self.isShortage(number):
                            waitOutShortage(.write)
                            return nil
                        default: throw .last(isSocket ? "sendmsg(fd \(fd))" : "writev(fd \(fd))")
                        }
                    }
                }
            } catch {
                throw writeFailure(accepted: written, cause: error)
            }
            if let result, result > 0 {
                written += result
                // Step past what went out.
                var consumed = result
                while consumed > 0 {
                    if consumed >= iov[first].iov_len {
                        consumed -= iov[first].iov_len
                        first += 1
                    } else {
                        iov[first].iov_base += consumed
                        iov[first].iov_len -= consumed
                        consumed = 0
                    }
                }
                if written == total { return }
                // A short write filled the socket buffer or the pipe: wait without a probe.
                if result == offered { continue }
            }
            do {
                try await registration.wait(.write, after: seen)
            } catch {
                throw writeFailure(accepted: written, cause: error)
            }
        }
    }

    // MARK: Splicing

    /// Moves bytes from `source` into this fd inside the kernel (splice(2)) when one of the two
    /// is a pipe and the other a pipe or a socket — a process's output pipe into a connection, a
    /// connection into a process's input pipe — until `limit` bytes moved or the source is empty;
    /// suspends while this fd is full. `nil` for anything else (a terminal, a file, a fake).
    ///
    /// A splice that would block, or comes back short, does not say which end stopped it: one
    /// poll(2) of both asks — an empty source ends the call (the caller waits for it), a full
    /// destination is waited for here.
    public func splice(from source: some ByteReader, limit: Int) async throws(WriteFailure) -> SpliceResult? {
        guard let source = source as? AsyncFD, source !== self, !spliceRefused.load(ordering: .relaxed),
            (source.isPipe && (isSocket || isPipe)) || (isPipe && source.isSocket),
            source.spliceNeverWaits(asSource: true), spliceNeverWaits(asSource: false)
        else { return nil }
        var moved = 0
        // What a failure counts as in flight (WriteFailure.unconfirmed), as a copy does: the last
        // splice's bytes while they wait in a full buffer for room; 0 once a splice went through
        // with room to spare (its bytes, like a write completed, are the peer's to read).
        var unconfirmed = 0
        // The last splice's count when it was cut short: its bytes may wait in a full buffer.
        var cutShort = 0
        var racedProbes = 0
        while moved < limit {
            let requested = limit - moved
            let readSeen = source.registration.edges(.read)
            let writeSeen = registration.edges(.write)
            let outcome: (count: Int, errno: Int32)
            do {
                outcome = try spliceOnce(from: source, limit: requested)
            } catch {
                // One of the two was closed: report it as a read or a write on it would be.
                if source.isClosed { return moved > 0 ? .moved(moved) : .sourceFailed(error) }
                throw writeFailure(accepted: moved, unconfirmed: unconfirmed, cause: error)
            }
            if outcome.count > 0 {
                moved += outcome.count
                unconfirmed = 0
                source.noteRead(outcome.count, seen: readSeen)
                cutShort = 0
                guard outcome.count < requested else { continue }
                // Cut short: the source emptied or this fd filled, and the splice does not say
                // which. A splice that took a whole pipe-full woke a writer that was waiting for
                // room, which is writing again right now: the next splice is asked at once. It
                // takes the pipe's lock, so it waits for that write and moves it, where a poll
                // would have found the pipe empty and put the relay to sleep — a sleep per
                // pipe-full with 64 KiB pipes. Its EAGAIN says which end to wait for (below).
                if let capacity = source.pipeCapacity, outcome.count >= capacity {
                    cutShort = outcome.count
                    continue
                }
                // Less than a pipe-full: the writer is slower than we are, and a retry would only
                // find the pipe empty. One poll of both says which end stopped the splice.
                let (sourceReady, destinationReady) = pollBoth(source)
                if !sourceReady {
                    source.noteRead(nil, seen: readSeen)
                    return .moved(moved)
                }
                if !destinationReady {
                    unconfirmed = outcome.count
                    do {
                        try await registration.wait(.write, after: writeSeen)
                    } catch {
                        throw writeFailure(accepted: moved, unconfirmed: unconfirmed, cause: error)
                    }
                }
                continue
            }
            if outcome.count == 0 { return moved > 0 ? .moved(moved) : .endOfFile }
            let error = SystemError("splice(fd \(source.fd) → fd \(fd))", errno: .init(rawValue: outcome.errno))
            switch outcome.errno {
            case EAGAIN, EWOULDBLOCK:
                let (sourceReady, destinationReady) = pollBoth(source)
                if !sourceReady {
                    source.noteRead(nil, seen: readSeen)
                    return moved > 0 ? .moved(moved) : .sourceEmpty
                }
                // This fd is full: the splice before, if it was cut short, may have its bytes
                // waiting in it.
                if !destinationReady { unconfirmed = cutShort }
                cutShort = 0
                racedProbes = destinationReady ? racedProbes + 1 : 0
                // Both look ready yet the splice would block (a race, or a socket that reports
                // room it cannot use): after a few tries, wait for this fd all the same.
                if !destinationReady || racedProbes > 3 {
                    racedProbes = 0
                    do {
                        try await registration.wait(.write, after: writeSeen)
                    } catch {
                        throw writeFailure(accepted: moved, unconfirmed: unconfirmed, cause: error)
                    }
                }
            case let number where Self.isShortage(number):
                // The kernel had no memory for the move (a pipe page, a socket buffer): neither
                // end failed. Both are tried again after a pause (no readiness report comes).
                waitOutShortage(.write)
                do {
                    try await registration.wait(.write, after: writeSeen)
                } catch {
                    throw writeFailure(accepted: moved, unconfirmed: unconfirmed, cause: error)
                }
            case EINVAL where moved == 0:
                // These two cannot be spliced after all (a socket family without splice
                // support): copy from now on.
                spliceRefused.store(true, ordering: .relaxed)
                return nil
            case EPIPE:
                throw writeFailure(accepted: moved, unconfirmed: unconfirmed, cause: error)
            default:
                // A socket source fails by itself (a reset connection); anything else is this
                // end refusing the bytes.
                if source.isSocket { return moved > 0 ? .moved(moved) : .sourceFailed(error) }
                throw writeFailure(accepted: moved, unconfirmed: unconfirmed, cause: error)
            }
        }
        return .moved(moved)
    }

    /// A failed write's report: what this fd accepted before `cause`, and of that what counts as
    /// unconfirmed. After EPIPE on a Unix stream socket the kernel says whether anything was
    /// lost: a peer that closes with bytes unread leaves ECONNRESET pending on this end (the
    /// send itself reports EPIPE); one that had read everything leaves nothing, and then nothing
    /// this connection accepted is unconfirmed. (TCP says no such thing: bytes sent after the
    /// peer's FIN are lost without it; vsock is not asked.)
    fileprivate func writeFailure(accepted: Int, unconfirmed: Int? = nil, cause: any Error) -> WriteFailure {
        var unconfirmed = unconfirmed ?? accepted
        if unconfirmed > 0, isSocket, (cause as? SystemError)?.errno == .brokenPipe, peerReadEverything() { unconfirmed = 0 }
        return WriteFailure(accepted: accepted, unconfirmed: unconfirmed, cause: cause)
    }

    /// A Unix stream socket whose peer closed after reading every byte (no ECONNRESET pending).
    private func peerReadEverything() -> Bool {
        (try? withSyscall { () -> Bool in
            var value: Int32 = 0
            var size = socklen_t(MemoryLayout<Int32>.size)
            guard getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &value, &size) == 0, value == AF_UNIX else { return false }
            size = socklen_t(MemoryLayout<Int32>.size)
            guard getsockopt(fd, SOL_SOCKET, SO_ERROR, &value, &size) == 0 else { return false }
            return value == 0
        }) ?? false
    }

    /// After a splice's EAGAIN: (source readable, this fd writable), from one poll(2).
    private func pollBoth(_ source: AsyncFD) -> (Bool, Bool) {
        var fds = [
            pollfd(fd: source.fd, events: Int16(POLLIN), revents: 0),
            pollfd(fd: fd, events: Int16(POLLOUT), revents: 0),
        ]
        let ready = poll(&fds, 2, 0)
        guard ready >= 0 else { return (true, true) }
        // An error or hang-up counts as ready: the next splice reports it.
        let sourceReady = fds[0].revents != 0
        let destinationReady = fds[1].revents != 0
        return (sourceReady, destinationReady)
    }

    /// Writes what fits now: the count written, or `nil` if nothing fits.
    public func writeNow(_ bytes: UnsafeRawBufferPointer) throws -> Int? {
        try withSyscall { () throws(SystemError) -> Int? in
            var iov = iovec(iov_base: UnsafeMutableRawPointer(mutating: bytes.baseAddress), iov_len: bytes.count)
            while true {
                let count = writeOnce(&iov, 1)
                if count >= 0 { return count }
                switch Glibc.errno {
                case EINTR: continue
                case EAGAIN, EWOULDBLOCK: return nil
                case let number where Self.isShortage(number):
                    waitOutShortage(.write)
                    return nil
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
    /// Tasks waiting for this fd to become readable (for tests).
    var readWaiters: Int { registration.waiting(.read) }
    var writeWaiters: Int { registration.waiting(.write) }
    /// The reactor saw the peer hang up (for tests).
    var registrationHasHungUp: Bool { registration.hasHungUp }
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
        } else {
            restoreHoldersBlocking()
        }
        return fd
    }

    /// A holder cleared O_NONBLOCK and `keepNonBlocking` set it again: clear it as that holder
    /// left it, now that we no longer read or write the fd.
    private func restoreHoldersBlocking() {
        guard restoredNonBlocking.load(ordering: .relaxed) else { return }
        let flags = fcntl(fd, F_GETFL)
        if flags >= 0 { _ = fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) }
    }

    /// Closes the fd. Waiters are woken with `DescriptorClosed`; the fd number itself is released
    /// when the last in-flight syscall on it returns — a pipe's on the reactor's thread, a moment
    /// later if called elsewhere (`Reactor.closeOnLoop`). Idempotent.
    public func close() {
        let first: Bool = usage.withLockedValue { u in
            guard !u.closed else { return false }
            u.closed = true
            return true
        }
        guard first else { return }
        #if DEBUG
        checkStillAdopted()
        #endif
        restoreHoldersBlocking()
        // Deregister before the fd number can be released: epoll_ctl(DEL) on a number the kernel
        // already recycled would remove someone else's registration.
        reactor.deregister(registration, fd: fd)
        let releaseNow: Bool = usage.withLockedValue { u in
            u.deregistered = true
            guard u.inFlight == 0, !u.released else { return false }
            u.released = true
            return true
        }
        if releaseNow { release() }
    }

    #if DEBUG
    /// Stops a debug build (every test) at once if the number no longer holds the adopted file.
    private func checkStillAdopted() {
        guard let adoptedFile else { return }
        var info = stat()
        guard fstat(fd, &info) == 0 else {
            fatalError("AsyncFD fd \(fd) was closed behind its back (fstat: errno \(errno)): a double close")
        }
        guard UInt(info.st_dev) == adoptedFile.device, UInt(info.st_ino) == adoptedFile.inode else {
            fatalError("AsyncFD fd \(fd) was closed behind its back and the number now holds another file: a double close")
        }
    }
    #endif

    /// Closes the number: a pipe's on the reactor's thread (`Reactor.closeOnLoop`: its last
    /// close takes the pipe's lock, which a guest process can hold).
    private func release() {
        if isPipe { reactor.closeOnLoop(fd) } else { _ = Glibc.close(fd) }
    }

    /// Runs `body` with the fd guaranteed open; throws `DescriptorClosed` after `close()`.
    public func withSyscall<T, E: Error>(_ body: () throws(E) -> T) throws -> T {
        let open = usage.withLockedValue { u -> Bool in
            guard !u.closed else { return false }
            u.inFlight += 1
            return true
        }
        guard open else { throw DescriptorClosed() }
        let noted = reactor.beginSyscall(on: fd)
        defer {
            reactor.endSyscall(noted)
            let release: Bool = usage.withLockedValue { u in
                u.inFlight -= 1
                if u.deregistered, u.inFlight == 0, !u.released {
                    u.released = true
                    return true
                }
                return false
            }
            if release { self.release() }
        }
        return try body()
    }
}
