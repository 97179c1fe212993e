#if canImport(Glibc)
import Glibc
#endif

/// Log lines reach their file descriptor (stderr: the journal under systemd) through one thread
/// of their own, so that a reader who stops reading never stops Holdfast.
///
/// A `write(2)` to a pipe or stream socket nobody drains blocks once its buffer is full:
/// journald stopped (SIGSTOP) or too slow, `holdfast daemon 2>&1 | less` left paused. Written
/// from the thread that logs, the first such write held a thread of the cooperative pool — two on
/// a two-vCPU guest — and the next one the rest: creates, exit reports, a broker's control
/// channel and its redials all waited for a log reader. Here the caller only appends to a
/// bounded queue; the writer thread alone waits for the descriptor. When the queue is full a
/// line is dropped and counted, and once the reader is back a line says how many
/// (`droppedNotice`), in order, after the lines that were queued before them.
public final class LogLineQueue: @unchecked Sendable {
    // @unchecked: every stored var below is read and written only with `mutex` held.
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    /// Signalled when a line is queued (the writer waits on it).
    private let queued: UnsafeMutablePointer<pthread_cond_t>
    /// Broadcast when the writer has written everything queued (`flush` waits on it).
    private let drained: UnsafeMutablePointer<pthread_cond_t>
    private var lines: [[UInt8]] = []
    private var queuedBytes = 0
    private var dropped = 0
    private var writing = false
    /// Lines of the batch being written that are not out yet.
    private var batchLeft = 0
    private var writerStarted = false

    public let descriptor: Int32
    /// The most bytes of lines waiting at once; a line beyond it is dropped and counted.
    public let capacity: Int
    /// The line that says `count` lines were dropped (without its newline).
    private let droppedNotice: @Sendable (Int) -> String

    public init(descriptor: Int32, capacity: Int, droppedNotice: @escaping @Sendable (Int) -> String) {
        self.descriptor = descriptor
        self.capacity = capacity
        self.droppedNotice = droppedNotice
        mutex = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
        queued = .allocate(capacity: 1)
        pthread_cond_init(queued, nil)
        drained = .allocate(capacity: 1)
        // Timed waits on the monotonic clock: a wall clock set back (NTP, an operator) during a
        // flush would stretch its bound by as much.
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        pthread_cond_init(drained, &attributes)
        pthread_condattr_destroy(&attributes)
    }

    // The queue lives as long as its process (`DaemonLogHandler.queue`); a test's ends with its
    // writer thread parked, which keeps a reference.

    /// Queues one line (with its newline); never waits for the descriptor.
    public func append(_ line: [UInt8]) {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        if !writerStarted {
            writerStarted = true
            startWriter()
        }
        guard queuedBytes + line.count <= capacity else {
            dropped += 1
            return
        }
        lines.append(line)
        queuedBytes += line.count
        pthread_cond_signal(queued)
    }

    /// Waits until every line queued so far is written, at most `milliseconds`; returns whether
    /// it was. For the moments a process ends or replaces its image, which would lose the queue.
    @discardableResult
    public func flush(withinMilliseconds milliseconds: Int) -> Bool {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        var deadline = timespec()
        clock_gettime(CLOCK_MONOTONIC, &deadline)
        let nanoseconds = Int(deadline.tv_nsec) + (milliseconds % 1000) * 1_000_000
        deadline.tv_sec += milliseconds / 1000 + nanoseconds / 1_000_000_000
        deadline.tv_nsec = nanoseconds % 1_000_000_000
        while !lines.isEmpty || writing || dropped > 0 {
            guard writerStarted else { return false }
            if pthread_cond_timedwait(drained, mutex, &deadline) == ETIMEDOUT {
                return lines.isEmpty && !writing && dropped == 0
            }
        }
        return true
    }

    /// Lines not written yet: queued, dropped and unsaid, or in the batch being written (one of
    /// which may be inside its `write(2)` now). What an image replaced now would lose.
    public var unwritten: Int {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return lines.count + dropped + batchLeft
    }

    /// Lines dropped and not yet said (for tests).
    public var droppedNow: Int {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return dropped
    }

    private func startWriter() {
        let box = Unmanaged.passRetained(self)
        var thread = pthread_t()
        let created = pthread_create(&thread, nil, { argument in
            Unmanaged<LogLineQueue>.fromOpaque(argument!).takeRetainedValue().runWriter()
        }, box.toOpaque())
        if created == 0 {
            pthread_detach(thread)
        } else {
            // No thread to be had (the process is at its limit): lines wait until a later append
            // manages to start one.
            box.release()
            writerStarted = false
        }
    }

    private func runWriter() -> Never {
        while true {
            pthread_mutex_lock(mutex)
            writing = false
            while lines.isEmpty && dropped == 0 {
                pthread_cond_broadcast(drained)
                pthread_cond_wait(queued, mutex)
            }
            let batch = lines
            let lost = dropped
            lines = []
            queuedBytes = 0
            dropped = 0
            writing = true
            batchLeft = batch.count
            pthread_mutex_unlock(mutex)

            // One write per line, as before: lines from the daemon's other processes, which
            // share the descriptor, never interleave with ours.
            for line in batch {
                writeWhole(line)
                pthread_mutex_lock(mutex)
                batchLeft -= 1
                pthread_mutex_unlock(mutex)
            }
            if lost > 0 { writeWhole(Array((droppedNotice(lost) + "\n").utf8)) }
        }
    }

    /// Writes `bytes` whole, blocking as long as the descriptor does; gives up on an error (a
    /// closed journal: nothing else can be done with the line).
    private func writeWhole(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { raw in
            var offset = 0
            while offset < raw.count {
                let count = write(descriptor, raw.baseAddress! + offset, raw.count - offset)
                if count > 0 {
                    offset += count
                } else if count < 0 && errno == EINTR {
                    continue
                } else {
                    return
                }
            }
        }
    }
}
