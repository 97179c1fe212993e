import CHoldfastShims
import NIOConcurrencyHelpers
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Readiness notification for non-blocking fds, and the thread the data plane runs on: one
/// thread in `epoll_wait` that wakes the tasks waiting for an fd to become readable or writable
/// — and, for tasks that prefer it as their executor (`Reactor.shared` is a `TaskExecutor`),
/// runs them itself.
///
/// Why not SwiftNIO's channels for the data plane: a relay here makes the syscalls itself on the
/// task that owns the stream, so the fast path (data in the pipe, room in the socket) is a
/// read/write (or splice) loop with no thread hop and no allocation, and a failed write knows
/// exactly how many bytes the kernel accepted (raw mode's loss accounting depends on it). NIO
/// still carries the framed control plane.
///
/// Why relays run on this thread: a task woken by readiness on the global pool costs a second
/// thread's wake-up (a futex and a context switch) for every time a pipe runs dry; run here, a
/// relay continues on the thread that saw the readiness, as a blocking C loop would continue in
/// its own thread. Jobs run in batches between polls, so a busy stream cannot keep the others'
/// readiness from being seen; relays yield after a bounded amount of work.
///
/// Edge-triggered, with interest armed on demand (`epoll_ctl` is a syscall, and in a VM a dear
/// one): an fd is watched for reading from the first time someone waits to read it, and from
/// then on — such fds (a process's pipe, a connection's acknowledgements) are read again and
/// again; it is watched for writing only while writers wait, so a socket whose relay waits for
/// its pipe is not reported writable each time the peer reads. Each registration counts the
/// readiness edges it saw per direction. An operation reads the count, tries its syscall, and
/// only when the syscall says EAGAIN waits for an edge *after* that count: edge-triggered
/// readiness reports what changes, so a wait on the strength of anything weaker (a short read)
/// could wait for bytes that were already there. Arming is level-checked by the kernel, so
/// readiness that came before the first wait is reported at once.
///
/// Why a watchdog takes over a stuck thread (`Reactor+Watchdog.swift`): a non-blocking syscall
/// still waits for the kernel's locks, and a guest process can hold one of them as long as it
/// likes — a pipe's lock is held while the kernel copies a `write(2)`'s bytes from the writer's
/// memory (or a `read(2)`'s to the reader's), so a write from a page that never arrives (a hung
/// FUSE or network file, a userfaultfd) stops our read of that pipe in the kernel, uninterruptibly.
/// On one shared thread that would stop every stream in the broker. Instead the stuck thread is
/// left to its one syscall and a new thread runs the loop and the jobs queued behind it.
public final class Reactor: TaskExecutor, Sendable {
    public static let shared: Reactor = {
        do {
            return try Reactor()
        } catch {
            fatalError("cannot start the I/O reactor: \(error)")
        }
    }()

    private let epollFD: Int32
    /// Written to wake the thread from `epoll_wait` when a job is queued from another thread.
    private let wakeFD: Int32
    private let registrations = NIOLockedValueBox<[UInt64: Registration]>([:])
    private let nextID = Atomic<UInt64>(1)
    let queue = NIOLockedValueBox(JobQueue())
    /// The reactor thread (pthread_self), so jobs it queues itself never write the wake-up fd.
    let thread = Atomic<UInt>(0)
    /// How long one job may run before the watchdog takes the loop to a new thread.
    let stallLimit: Duration
    /// How long one syscall of the loop's may sleep in the kernel before the watchdog takes the
    /// loop to a new thread (the watchdog's sampling interval while the loop is busy).
    let syscallLimit: Duration
    /// The most threads left stuck at once; beyond it the watchdog only reports.
    let maxStrandedThreads: Int
    let stallHandler = NIOLockedValueBox<(@Sendable (Stall) -> Void)?>(nil)
    /// A thread made ahead, waiting to run the loop for the next takeover (Reactor+Watchdog).
    let spare = NIOLockedValueBox<SpareThread?>(nil)
    /// Takeovers put off because no thread could be made (the system's tasks exhausted).
    let takeoversWithoutThread = Atomic<Int>(0)
    /// The fds of the syscall the loop's thread is in (`beginSyscall`): a splice has two.
    let outerSyscallFD = Atomic<Int32>(-1)
    let innerSyscallFD = Atomic<Int32>(-1)
    /// The number of the loop's syscall in progress (0: none), what the watchdog samples: the
    /// same number at two samples is one syscall that lasted from the first to the second.
    let syscallInProgress = Atomic<UInt64>(0)
    /// The last number given to a syscall of the loop's.
    let syscallsBegun = Atomic<UInt64>(1)

    struct JobQueue {
        var jobs: [UnownedJob] = []
        /// The thread is in (or about to enter) an `epoll_wait` without a timeout.
        var sleeping = false
        /// The batch the loop works through, and its next job: here rather than on the thread's
        /// stack so that a takeover can hand the jobs behind a stuck one to the new thread.
        var batch: [UnownedJob] = []
        var next = 0
        /// Which thread runs the loop: a takeover makes a new number, and a thread that finds
        /// its number superseded when its job returns ends.
        var runner: UInt64 = 0
        var runnerTID: pid_t = 0
        /// Jobs started, and whether one runs now: what the watchdog samples.
        var started: UInt64 = 0
        var inJob = false
        /// Threads taken over whose job has not returned yet, and takeovers so far.
        var stranded = 0
        var stalls = 0
    }

    /// The reserved registration id of the wake-up fd.
    private static let wakeID: UInt64 = 0

    /// - Parameters:
    ///   - stallLimit: a job still running after this long (measured between one and two times
    ///     it) is taken to be stuck in the kernel, and a new thread takes over the loop.
    ///   - syscallLimit: one syscall found asleep in the kernel at two samples this far apart
    ///     (while the loop is busy) is taken to wait for a lock a process holds, and a new thread
    ///     takes over the loop.
    ///   - maxStrandedThreads: the most stuck threads kept at once.
    public init(
        stallLimit: Duration = .seconds(1), syscallLimit: Duration = .milliseconds(20), maxStrandedThreads: Int = 64
    ) throws(SystemError) {
        self.stallLimit = stallLimit
        self.syscallLimit = syscallLimit
        self.maxStrandedThreads = maxStrandedThreads
        // A write to a pipe whose reader is gone must fail with EPIPE, not kill the process.
        signal(SIGPIPE, SIG_IGN)
        epollFD = try retryingInterrupts("epoll_create1") { epoll_create1(Int32(EPOLL_CLOEXEC)) }
        wakeFD = try retryingInterrupts("eventfd") { hf_eventfd() }
        var event = epoll_event()
        event.events = EPOLLIN.rawValue | EPOLLET.rawValue
        event.data.u64 = Self.wakeID
        guard epoll_ctl(epollFD, EPOLL_CTL_ADD, wakeFD, &event) == 0 else { throw .last("epoll_ctl(ADD, eventfd)") }
        try Self.startThread("reactor") { [self] in runLoop(as: 0) }
        try Self.startThread("reactor watchdog") { [self] in watch() }
    }

    /// Starts a detached thread running `body`.
    static func startThread(_ name: String, _ body: @escaping @Sendable () -> Void) throws(SystemError) {
        final class Body: Sendable {
            let run: @Sendable () -> Void
            init(_ run: @escaping @Sendable () -> Void) { self.run = run }
        }
        let box = Unmanaged.passRetained(Body(body))
        var thread = pthread_t()
        let created = pthread_create(&thread, nil, { context in
            Unmanaged<Body>.fromOpaque(context!).takeRetainedValue().run()
            return nil
        }, box.toOpaque())
        guard created == 0 else {
            box.release()
            throw SystemError("pthread_create(\(name))", errno: .init(rawValue: created))
        }
        pthread_detach(thread)
    }

    // MARK: TaskExecutor

    /// Queues a job to run on the reactor thread (after the current batch of readiness events).
    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        let wake = queue.withLockedValue { q -> Bool in
            q.jobs.append(job)
            guard q.sleeping else { return false }
            q.sleeping = false
            return true
        }
        if wake, !isCurrent {
            var one: UInt64 = 1
            _ = Glibc.write(wakeFD, &one, 8)
        }
    }

    /// Whether the calling code runs on the reactor thread.
    public var isCurrent: Bool { pthread_self() == thread.load(ordering: .relaxed) }

    // MARK: Registrations

    /// Registers a non-blocking fd, with no interest armed until someone waits. Files that epoll
    /// cannot watch (regular files) get a registration that is always ready: their reads and
    /// writes do not block for long anyway.
    func register(_ fd: Int32) throws(SystemError) -> Registration {
        let id = nextID.wrappingAdd(1, ordering: .relaxed).oldValue
        var event = epoll_event()
        event.events = EPOLLET.rawValue
        event.data.u64 = id
        let registration = Registration(id: id, fd: fd, epollFD: epollFD)
        registrations.withLockedValue { $0[id] = registration }
        if epoll_ctl(epollFD, EPOLL_CTL_ADD, fd, &event) != 0 {
            let error = Glibc.errno
            registrations.withLockedValue { _ = $0.removeValue(forKey: id) }
            guard error == EPERM else {
                throw SystemError("epoll_ctl(ADD, fd \(fd))", errno: .init(rawValue: error))
            }
            return Registration(id: 0, fd: fd, epollFD: epollFD, alwaysReady: true)
        }
        return registration
    }

    /// Stops watching `fd` and wakes its waiters with `DescriptorClosed`. Call before close(2).
    func deregister(_ registration: Registration, fd: Int32) {
        if !registration.alwaysReady {
            registration.cancelAll()  // first: no waiter may arm the fd again after the DEL
            var event = epoll_event()
            _ = epoll_ctl(epollFD, EPOLL_CTL_DEL, fd, &event)
            registrations.withLockedValue { _ = $0.removeValue(forKey: registration.id) }
        } else {
            registration.cancelAll()
        }
    }

    // MARK: The loop

    /// The loop, run by thread number `runner` until a takeover supersedes it.
    func runLoop(as runner: UInt64) {
        thread.store(pthread_self(), ordering: .relaxed)
        let tid = hf_gettid()
        queue.withLockedValue { q in if q.runner == runner { q.runnerTID = tid } }
        let capacity = 256
        let events = UnsafeMutablePointer<epoll_event>.allocate(capacity: capacity)
        defer { events.deallocate() }
        let executor = asUnownedTaskExecutor()
        while true {
            // The jobs queued so far; what they queue runs after the next poll.
            queue.withLockedValue { q in
                swap(&q.jobs, &q.batch)
                q.next = 0
            }
            batch: while true {
                switch nextJob(for: runner) {
                case .run(let job): job.runSynchronously(on: executor)
                case .batchDone: break batch
                case .superseded: return  // a takeover moved the loop to another thread
                }
            }

            let timeout: Int32 = queue.withLockedValue { q in
                guard q.jobs.isEmpty else { return 0 }
                q.sleeping = true
                return -1
            }
            let count = epoll_wait(epollFD, events, Int32(capacity), timeout)
            if timeout != 0 { queue.withLockedValue { $0.sleeping = false } }
            if count < 0 {
                if Glibc.errno == EINTR { continue }
                fatalError("epoll_wait: errno \(Glibc.errno)")
            }
            for index in 0..<Int(count) {
                let event = events[index]
                let id = event.data.u64
                if id == Self.wakeID {
                    var value: UInt64 = 0
                    _ = Glibc.read(wakeFD, &value, 8)
                    continue
                }
                guard let registration = registrations.withLockedValue({ $0[id] }) else { continue }
                let flags = event.events
                let error = flags & (EPOLLERR.rawValue | EPOLLHUP.rawValue) != 0
                let readable = error || flags & (EPOLLIN.rawValue | EPOLLRDHUP.rawValue | EPOLLPRI.rawValue) != 0
                let writable = error || flags & EPOLLOUT.rawValue != 0
                let hungUp = error || flags & EPOLLRDHUP.rawValue != 0
                registration.signal(readable: readable, writable: writable, hungUp: hungUp)
            }
        }
    }

    private enum Step {
        case run(UnownedJob)
        case batchDone
        case superseded
    }

    /// The batch's next job for thread `runner`, marked as running for the watchdog. One lock
    /// per job: what lets a takeover find the jobs behind a stuck one.
    private func nextJob(for runner: UInt64) -> Step {
        queue.withLockedValue { q in
            guard q.runner == runner else {
                q.stranded -= 1
                return .superseded
            }
            guard q.next < q.batch.count else {
                q.inJob = false
                q.batch.removeAll(keepingCapacity: true)
                return .batchDone
            }
            let job = q.batch[q.next]
            q.next += 1
            q.started &+= 1
            q.inJob = true
            return .run(job)
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
    private let fd: Int32
    private let epollFD: Int32
    private let state = NIOLockedValueBox(State())

    private struct State {
        var readEdges: UInt64 = 0
        var writeEdges: UInt64 = 0
        var readers = Waiters()
        var writers = Waiters()
        var nextWaiter: UInt64 = 0
        var cancelled = false
        /// The directions armed in epoll (edge-triggered).
        var armed: UInt32 = 0
        /// The peer hung up (or the fd failed): reported once, as an edge, never again.
        var hungUp = false
        /// Directions a `wakeLater` will signal (an always-ready fd waits for it too).
        var wakePending: UInt32 = 0
    }

    /// The fd reported a hang-up or an error: no later edge will say so again.
    var hasHungUp: Bool { state.withLockedValue { $0.hungUp } }

    /// A suspended wait. Unsafe continuations: each is resumed exactly once, by whoever removes
    /// it from `State` under the lock (the reactor, a cancellation, the close), and a checked one
    /// would cost an allocation per wait.
    private struct Waiter {
        var id: UInt64
        var continuation: UnsafeContinuation<Void, any Error>
    }

    /// The waiters of one direction: nearly always none or one, held without allocating.
    private struct Waiters {
        var first: Waiter?
        var more: [Waiter] = []

        var isEmpty: Bool { first == nil }

        mutating func add(_ waiter: Waiter) {
            if first == nil { first = waiter } else { more.append(waiter) }
        }

        mutating func remove(id: UInt64) -> Waiter? {
            if let waiter = first, waiter.id == id {
                first = more.isEmpty ? nil : more.removeFirst()
                return waiter
            }
            guard let index = more.firstIndex(where: { $0.id == id }) else { return nil }
            return more.remove(at: index)
        }

        mutating func takeAll() -> Waiters {
            defer { self = Waiters() }
            return self
        }

        func resumeAll(with result: Result<Void, any Error>) {
            first?.continuation.resume(with: result)
            for waiter in more { waiter.continuation.resume(with: result) }
        }
    }

    init(id: UInt64, fd: Int32, epollFD: Int32, alwaysReady: Bool = false) {
        self.id = id
        self.fd = fd
        self.epollFD = epollFD
        self.alwaysReady = alwaysReady
    }

    /// The number of readiness edges seen so far in a direction. Read before trying a syscall.
    func edges(_ direction: Direction) -> UInt64 {
        state.withLockedValue { direction == .read ? $0.readEdges : $0.writeEdges }
    }

    /// Waits until an edge after `seen` arrives in `direction`. Throws `DescriptorClosed` once the
    /// fd is deregistered and `CancellationError` if the task is cancelled.
    func wait(_ direction: Direction, after seen: UInt64) async throws {
        // An always-ready fd (a file epoll cannot watch) is ready at once — unless its last call
        // was refused for want of memory: then it waits for the retry's wake-up, as any fd does
        // (returning at once, its relay would spin on the refusal).
        if alwaysReady, state.withLockedValue({ $0.wakePending & Self.mask(direction) == 0 }) { return }
        let id = state.withLockedValue { s -> UInt64 in
            s.nextWaiter &+= 1
            return s.nextWaiter
        }
        try await withTaskCancellationHandler {
            try await withUnsafeThrowingContinuation { (continuation: UnsafeContinuation<Void, any Error>) in
                let outcome: Result<Void, any Error>? = state.withLockedValue { s in
                    if s.cancelled { return .failure(DescriptorClosed()) }
                    let now = direction == .read ? s.readEdges : s.writeEdges
                    if now != seen { return .success(()) }
                    if Task.isCancelled { return .failure(CancellationError()) }
                    let waiter = Waiter(id: id, continuation: continuation)
                    if direction == .read { s.readers.add(waiter) } else { s.writers.add(waiter) }
                    let wanted = Self.mask(direction)
                    if s.armed & wanted != wanted { arm(&s, s.armed | wanted) }
                    return nil
                }
                if let outcome { continuation.resume(with: outcome) }
            }
        } onCancel: {
            let waiter = state.withLockedValue { s in
                direction == .read ? s.readers.remove(id: id) : s.writers.remove(id: id)
            }
            waiter?.continuation.resume(throwing: CancellationError())
        }
    }

    /// Waits suspended in a direction.
    func waiting(_ direction: Direction) -> Int {
        state.withLockedValue { s in
            let waiters = direction == .read ? s.readers : s.writers
            return (waiters.first == nil ? 0 : 1) + waiters.more.count
        }
    }

    /// The reactor saw an event: wakes the waiters of the directions that became ready. Write
    /// interest that nobody waits for any more is disarmed; read interest stays.
    func signal(readable: Bool, writable: Bool, hungUp: Bool = false) {
        let (readers, writers) = state.withLockedValue { s -> (Waiters, Waiters) in
            if hungUp { s.hungUp = true }
            if readable {
                s.readEdges &+= 1
                s.wakePending &= ~Self.mask(.read)
            }
            if writable {
                s.writeEdges &+= 1
                s.wakePending &= ~Self.mask(.write)
            }
            let readers = readable ? s.readers.takeAll() : Waiters()
            let writers = writable ? s.writers.takeAll() : Waiters()
            let writeMask = Self.mask(.write)
            // Nobody was waiting to write: a spurious report, so stop watching that side.
            if writable, writers.isEmpty, s.armed & writeMask != 0, !s.cancelled { arm(&s, s.armed & ~writeMask) }
            return (readers, writers)
        }
        readers.resumeAll(with: .success(()))
        writers.resumeAll(with: .success(()))
    }

    /// Counts an edge in `direction` after `delay`, as if the kernel had reported one: for a
    /// call the kernel refused for want of memory (`AsyncFD.isShortage`), after which no
    /// readiness report comes — the fd is as ready as it was.
    func wakeLater(_ direction: Direction, after delay: Duration) {
        state.withLockedValue { $0.wakePending |= Self.mask(direction) }
        Task.detached { [self] in
            try? await Task.sleep(for: delay)
            signal(readable: direction == .read, writable: direction == .write)
        }
    }

    func cancelAll() {
        let (readers, writers) = state.withLockedValue { s -> (Waiters, Waiters) in
            s.cancelled = true
            return (s.readers.takeAll(), s.writers.takeAll())
        }
        readers.resumeAll(with: .failure(DescriptorClosed()))
        writers.resumeAll(with: .failure(DescriptorClosed()))
    }

    /// Arms `directions` (under the state lock, so two arms never race). The kernel checks
    /// readiness as it arms: an fd already ready is reported at once.
    private func arm(_ s: inout State, _ directions: UInt32) {
        var event = epoll_event()
        event.events = directions | EPOLLET.rawValue
        event.data.u64 = id
        if epoll_ctl(epollFD, EPOLL_CTL_MOD, fd, &event) == 0 {
            s.armed = directions
        }
        // A failure (the fd was closed under us) leaves it disarmed: the owner's close()
        // deregisters and wakes every waiter with DescriptorClosed.
    }

    private static func mask(_ direction: Direction) -> UInt32 {
        direction == .read ? EPOLLIN.rawValue | EPOLLRDHUP.rawValue : EPOLLOUT.rawValue
    }
}
