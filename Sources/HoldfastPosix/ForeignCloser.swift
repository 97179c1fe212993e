import CHoldfastShims
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Closes fds that came from outside Holdfast — the fds a peer attached to a message that is
/// refused or not kept, a handoff peer's connection, fds a process sent over its own stdout
/// socket — on threads of their own, never on the reactor's loop or the cooperative pool.
///
/// The last close of a file runs its release, and a release can wait as long as someone else
/// pleases: a TCP socket with SO_LINGER and unsent data waits up to its linger time, a FUSE
/// file for its server. One message brings up to 253 such fds. Closed on the loop, each stuck
/// close cost a watchdog takeover: two messages stranded the loop's 64 spare threads, and every
/// stream of the broker stopped, from a peer that was not even admitted. Here a stuck close
/// holds one of at most `mostThreads` closer threads; the rest wait their turn (their fds stay
/// open meanwhile, counted against the broker's fd room like any other).
public final class ForeignCloser: Sendable {
    public static let shared = ForeignCloser()

    /// Closer threads at most: made as closes queue up with every thread busy, never ended.
    static let mostThreads = 8

    /// The queue: fd numbers written into a pipe (4 bytes each, written whole), read by the
    /// threads with blocking reads. nil if no pipe could be made: closes then go to the loop.
    private let queue: (read: Int32, write: Int32)?
    /// Kept apart from the queue, so that asking (`outstanding`) makes no pipe.
    private static let counts = Mutex<(threads: Int, busy: Int, queued: Int)>((0, 0, 0))
    /// Closes the full queue pipe had no room for (16,384 waiting behind stuck ones): kept
    /// here, taken by the next closer thread free. Falling back to the loop instead would hand
    /// the loop the very closes this type keeps from it.
    private static let overflow = Mutex<[Int32]>([])

    init() {
        guard let ends = try? PipeEnds.make() else {
            queue = nil
            return
        }
        _ = fcntl(ends.write, F_SETFL, fcntl(ends.write, F_GETFL) | O_NONBLOCK)
        queue = (ends.read, ends.write)
    }

    /// Closes each of `fds` on a closer thread.
    public func close(_ fds: [Int32]) {
        for fd in fds { close(fd) }
    }

    /// Closes `fd` on a closer thread (queued behind closes under way).
    public func close(_ fd: Int32) {
        guard fd >= 0 else { return }
        guard let queue else {
            Reactor.shared.closeOnLoop(fd)
            return
        }
        let makeThread = Self.counts.withLock { counts -> Bool in
            counts.queued += 1
            guard counts.threads - counts.busy < counts.queued, counts.threads < Self.mostThreads else { return false }
            counts.threads += 1
            return true
        }
        if makeThread {
            do {
                try Reactor.startThread("closer") { [self] in runThread() }
            } catch {
                Self.counts.withLock { $0.threads -= 1 }
            }
        }
        guard Self.counts.withLock({ $0.threads > 0 }) else {
            // No thread could be made at all (the guest out of tasks): the loop's watchdog is
            // the last resort.
            Self.counts.withLock { $0.queued -= 1 }
            Reactor.shared.closeOnLoop(fd)
            return
        }
        var number = fd
        let written = withUnsafeBytes(of: &number) { write(queue.write, $0.baseAddress, $0.count) }
        if written != MemoryLayout<Int32>.size {
            Self.overflow.withLock { $0.append(fd) }
        }
    }

    /// Closes waiting or under way (for tests, and the broker's figures); asking makes nothing.
    public static var outstanding: Int { counts.withLock { $0.queued + $0.busy } }

    /// Closes waiting for a closer thread (not those under way).
    public static var waiting: Int { counts.withLock { $0.queued } }

    /// For a loop that takes in what it then closes here (connections it turns away): waits,
    /// bounded by `most`, while more than `backlog` closes wait, so that it cannot outrun them
    /// and take the process's fds. Bounded: closes stuck behind a peer's lingering sockets slow
    /// the loop, never stop it.
    public static func letClosesCatchUp(backlog: Int = 8, most: Duration = .milliseconds(50)) async {
        let deadline = ContinuousClock.now + most
        while waiting > backlog, ContinuousClock.now < deadline {
            try? await Task.sleep(for: .milliseconds(1))
        }
    }

    private func runThread() {
        guard let queue else { return }
        while true {
            var fd: Int32 = -1
            let count = withUnsafeMutableBytes(of: &fd) { read(queue.read, $0.baseAddress, $0.count) }
            guard count == MemoryLayout<Int32>.size else {
                if count < 0, errno == EINTR { continue }
                return  // cannot happen: the write end is never closed
            }
            Self.counts.withLock {
                $0.queued -= 1
                $0.busy += 1
            }
            _ = Glibc.close(fd)
            // Then what the full queue had no room for, one at a time, counted as queued.
            while let more = Self.overflow.withLock({ $0.popLast() }) {
                _ = Glibc.close(more)
                Self.counts.withLock { $0.queued -= 1 }
            }
            Self.counts.withLock { $0.busy -= 1 }
        }
    }
}
