import NIOConcurrencyHelpers

/// What host serve keeps of one process's output, for `host logs`: the newest `capacity` bytes
/// of its stdout and stderr (a tty's output is its stdout), in the order they arrived — the way
/// conmon keeps a container's log, but in memory and bounded. Followers (`logs --follow`) wait
/// here for what comes next; the log ends when every output stream has.
final class ProcessLog: Sendable {
    struct Entry: Sendable {
        var sequence: UInt64
        var kind: String
        var bytes: [UInt8]
    }

    private struct State: Sendable {
        /// Oldest first, from `start` on (entries before it are dropped, kept until compaction).
        var entries: [Entry] = []
        var start = 0
        var bytes = 0
        var nextSequence: UInt64 = 1
        var openStreams: Set<String>
        var followers: [UInt64: CheckedContinuation<Void, Never>] = [:]
        var nextFollower: UInt64 = 0

        var ended: Bool { openStreams.isEmpty }
    }

    let capacity: Int
    private let state: NIOLockedValueBox<State>

    /// `streams`: the output streams that will write here ("stdout", "stderr"); the log ends
    /// once each has called `end`.
    init(capacity: Int, streams: [String]) {
        self.capacity = capacity
        self.state = NIOLockedValueBox(State(openStreams: Set(streams)))
    }

    /// Keeps `bytes` of `kind`, dropping the oldest bytes beyond the capacity.
    func append(_ kind: String, _ bytes: [UInt8]) {
        guard !bytes.isEmpty, capacity > 0 else { return }
        let waiters = state.withLockedValue { s -> [CheckedContinuation<Void, Never>] in
            let kept = bytes.count > capacity ? Array(bytes.suffix(capacity)) : bytes
            s.entries.append(Entry(sequence: s.nextSequence, kind: kind, bytes: kept))
            s.nextSequence &+= 1
            s.bytes += kept.count
            while s.bytes > capacity {
                let excess = s.bytes - capacity
                let oldest = s.entries[s.start].bytes.count
                if oldest <= excess {
                    s.bytes -= oldest
                    s.entries[s.start].bytes = []
                    s.start += 1
                } else {
                    s.entries[s.start].bytes.removeFirst(excess)
                    s.bytes -= excess
                }
            }
            if s.start > 64, s.start * 2 > s.entries.count {
                s.entries.removeFirst(s.start)
                s.start = 0
            }
            defer { s.followers.removeAll() }
            return Array(s.followers.values)
        }
        for waiter in waiters { waiter.resume() }
    }

    /// The stream `kind` has ended: nothing more of it comes.
    func end(_ kind: String) {
        let waiters = state.withLockedValue { s -> [CheckedContinuation<Void, Never>] in
            s.openStreams.remove(kind)
            guard s.ended else { return [] }
            defer { s.followers.removeAll() }
            return Array(s.followers.values)
        }
        for waiter in waiters { waiter.resume() }
    }

    /// Ends every stream (host serve is closing, or the process never ran).
    func endAll() {
        let waiters = state.withLockedValue { s -> [CheckedContinuation<Void, Never>] in
            s.openStreams.removeAll()
            defer { s.followers.removeAll() }
            return Array(s.followers.values)
        }
        for waiter in waiters { waiter.resume() }
    }

    var isEnded: Bool { state.withLockedValue { $0.ended } }
    var byteCount: Int { state.withLockedValue { $0.bytes } }

    /// The entries kept with a sequence number above `sequence`, and whether the log has ended.
    func entries(after sequence: UInt64) -> (entries: [Entry], ended: Bool) {
        state.withLockedValue { s in
            (s.entries[s.start...].filter { $0.sequence > sequence && !$0.bytes.isEmpty }, s.ended)
        }
    }

    /// Returns once there is an entry after `sequence`, the log has ended, or the task is
    /// cancelled.
    func waitForMore(after sequence: UInt64) async {
        let id = state.withLockedValue { s -> UInt64 in
            s.nextFollower &+= 1
            return s.nextFollower
        }
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let ready = state.withLockedValue { s -> Bool in
                    if s.ended || s.nextSequence > sequence + 1 || Task.isCancelled { return true }
                    s.followers[id] = continuation
                    return false
                }
                if ready { continuation.resume() }
            }
        } onCancel: {
            state.withLockedValue { $0.followers.removeValue(forKey: id) }?.resume()
        }
    }
}
