import CHoldfastShims
import NIOConcurrencyHelpers
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Readiness notification for non-blocking fds: one thread in `epoll_wait`, waking the tasks
/// that wait for an fd to become readable or writable.
///
/// Why not SwiftNIO's channels for the data plane: a relay here makes the syscalls itself on the
/// task that owns the stream, so the fast path (data in the pipe, room in the socket) is a
/// read/write loop with no thread hop and no allocation, and a failed write knows exactly how many
/// bytes the kernel accepted (raw mode's loss accounting depends on it). NIO still carries the
/// framed control plane.
///
/// Edge-triggered: each registration counts the readiness edges per direction. An operation reads
/// the count, tries its syscall, and on EAGAIN waits for an edge *after* that count, so an edge that
/// arrives between the EAGAIN and the wait is never missed.
public final class Reactor: Sendable {
    public static let shared: Reactor = {
        do {
            return try Reactor()
        } catch {
            fatalError("cannot start the I/O reactor: \(error)")
        }
    }()

    private let epollFD: Int32
    private let registrations = NIOLockedValueBox<[UInt64: Registration]>([:])
    private let nextID = Atomic<UInt64>(1)

    public init() throws(SystemError) {
        // A write to a pipe whose reader is gone must fail with EPIPE, not kill the process.
        signal(SIGPIPE, SIG_IGN)
        epollFD = try retryingInterrupts("epoll_create1") { epoll_create1(Int32(EPOLL_CLOEXEC)) }
        let box = Unmanaged.passRetained(self)
        var thread = pthread_t()
        let created = pthread_create(&thread, nil, { context in
            let reactor = Unmanaged<Reactor>.fromOpaque(context!).takeRetainedValue()
            reactor.run()
            return nil
        }, box.toOpaque())
        guard created == 0 else {
            box.release()
            throw SystemError("pthread_create(reactor)", errno: .init(rawValue: created))
        }
        pthread_detach(thread)
    }

    /// Registers a non-blocking fd. Files that epoll cannot watch (regular files) get a
    /// registration that is always ready: their reads and writes do not block for long anyway.
    func register(_ fd: Int32) throws(SystemError) -> Registration {
        let id = nextID.wrappingAdd(1, ordering: .relaxed).oldValue
        var event = epoll_event()
        event.events = EPOLLIN.rawValue | EPOLLOUT.rawValue | EPOLLRDHUP.rawValue | EPOLLET.rawValue
        event.data.u64 = id
        let registration = Registration(id: id)
        registrations.withLockedValue { $0[id] = registration }
        if epoll_ctl(epollFD, EPOLL_CTL_ADD, fd, &event) != 0 {
            let error = Glibc.errno
            registrations.withLockedValue { _ = $0.removeValue(forKey: id) }
            guard error == EPERM else {
                throw SystemError("epoll_ctl(ADD, fd \(fd))", errno: .init(rawValue: error))
            }
            return Registration(id: 0, alwaysReady: true)
        }
        return registration
    }

    /// Stops watching `fd` and wakes its waiters with `DescriptorClosed`. Call before close(2).
    func deregister(_ registration: Registration, fd: Int32) {
        if !registration.alwaysReady {
            var event = epoll_event()
            _ = epoll_ctl(epollFD, EPOLL_CTL_DEL, fd, &event)
            registrations.withLockedValue { _ = $0.removeValue(forKey: registration.id) }
        }
        registration.cancelAll()
    }

    private func run() {
        let capacity = 256
        let events = UnsafeMutablePointer<epoll_event>.allocate(capacity: capacity)
        while true {
            let count = epoll_wait(epollFD, events, Int32(capacity), -1)
            if count < 0 {
                if Glibc.errno == EINTR { continue }
                fatalError("epoll_wait: errno \(Glibc.errno)")
            }
            for index in 0..<Int(count) {
                let event = events[index]
                let id = event.data.u64
                guard let registration = registrations.withLockedValue({ $0[id] }) else { continue }
                let flags = event.events
                let error = flags & (EPOLLERR.rawValue | EPOLLHUP.rawValue) != 0
                let readable = error || flags & (EPOLLIN.rawValue | EPOLLRDHUP.rawValue | EPOLLPRI.rawValue) != 0
                let writable = error || flags & EPOLLOUT.rawValue != 0
                registration.signal(readable: readable, writable: writable)
            }
        }
    }
}

enum Direction: Sendable {
    case read, write
}

/// The readiness state of one registered fd.
final class Registration: Sendable {
    let id: UInt64
    let alwaysReady: Bool
    private let state = NIOLockedValueBox(State())

    private struct State {
        var readEdges: UInt64 = 0
        var writeEdges: UInt64 = 0
        var waiters: [UInt64: Waiter] = [:]
        var nextWaiter: UInt64 = 0
        var cancelled = false
    }

    private struct Waiter {
        var direction: Direction
        var continuation: CheckedContinuation<Void, any Error>
    }

    init(id: UInt64, alwaysReady: Bool = false) {
        self.id = id
        self.alwaysReady = alwaysReady
    }

    /// The number of readiness edges seen so far in a direction. Read before trying a syscall.
    func edges(_ direction: Direction) -> UInt64 {
        state.withLockedValue { direction == .read ? $0.readEdges : $0.writeEdges }
    }

    /// Waits until an edge after `seen` arrives in `direction`. Throws `DescriptorClosed` once the
    /// fd is deregistered and `CancellationError` if the task is cancelled.
    func wait(_ direction: Direction, after seen: UInt64) async throws {
        if alwaysReady { return }
        let id = state.withLockedValue { s -> UInt64 in
            s.nextWaiter &+= 1
            return s.nextWaiter
        }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                let outcome: Result<Void, any Error>? = state.withLockedValue { s in
                    if s.cancelled { return .failure(DescriptorClosed()) }
                    let now = direction == .read ? s.readEdges : s.writeEdges
                    if now != seen { return .success(()) }
                    if Task.isCancelled { return .failure(CancellationError()) }
                    s.waiters[id] = Waiter(direction: direction, continuation: continuation)
                    return nil
                }
                if let outcome { continuation.resume(with: outcome) }
            }
        } onCancel: {
            state.withLockedValue { $0.waiters.removeValue(forKey: id) }?.continuation.resume(throwing: CancellationError())
        }
    }

    func signal(readable: Bool, writable: Bool) {
        let woken: [Waiter] = state.withLockedValue { s in
            if readable { s.readEdges &+= 1 }
            if writable { s.writeEdges &+= 1 }
            guard !s.waiters.isEmpty else { return [] }
            var woken: [Waiter] = []
            for (key, waiter) in s.waiters
            where (waiter.direction == .read && readable) || (waiter.direction == .write && writable) {
                woken.append(waiter)
                s.waiters.removeValue(forKey: key)
            }
            return woken
        }
        for waiter in woken { waiter.continuation.resume() }
    }

    func cancelAll() {
        let woken: [Waiter] = state.withLockedValue { s in
            s.cancelled = true
            defer { s.waiters.removeAll() }
            return Array(s.waiters.values)
        }
        for waiter in woken { waiter.continuation.resume(throwing: DescriptorClosed()) }
    }
}
