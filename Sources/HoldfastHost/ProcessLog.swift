import NIOConcurrencyHelpers

/// What host serve keeps of one process's output, for `host logs`: the newest `capacity` bytes
/// of its stdout and stderr (a tty's output is its stdout), in the order they arrived — the way
/// conmon keeps a container's log, but in memory and bounded. Followers (`logs --follow`) wait
/// here for what comes next; the log ends when every output stream has.
final class ProcessLog: Sendable {
    /// A run of bytes of one stream. `sequence` is the log's position after its last byte (the
    /// bytes ever appended up to it): a follower's cursor, which grows as the run does.
    struct Entry: Sendable {
        /// The log's position of its first byte.
        var start: UInt64
        var kind: String
        var bytes: [UInt8]
        var sequence: UInt64 { start + UInt64(bytes.count) }
    }

    private struct State: Sendable {
        /// Oldest first, from `first` on (entries before it are dropped, kept until compaction).
        var entries: [Entry] = []
        var first = 0
        var bytes = 0
        /// Bytes ever appended: the position of the next one.
        var position: UInt64 = 0
        var openStreams: Set<String>
        var followers: [UInt64: CheckedContinuation<Void, Never>] = [:]
        var nextFollower: UInt64 = 0

        var ended: Bool { openStreams.isEmpty }
        var live: Int { entries.count - first }
    }

    let capacity: Int
    /// At most this many runs are kept (the oldest dropped past it, bytes and all). A guest that
    /// sends its output a byte at a time, switching streams each byte, made a run of each byte:
    /// some 100 bytes of memory per byte of log, 100 MB for a 1 MiB log.
    let maximumEntries: Int
    private let state: NIOLockedValueBox<State>

    /// A run takes appended bytes of its stream up to this size: a chunk per DATA frame from the
    /// guest would otherwise be a run each. Small: once the log is full each append trims the
    /// oldest run from its front, and a follower's copy of the newest one is copied again as it
    /// grows, so a run's size is what one append may cost (at 64 KiB, a 100-byte line moved 64 KiB).
    static let largestMergedEntry = 4096

    /// `streams`: the output streams that will write here ("stdout", "stderr"); the log ends
    /// once each has called `end`.
    init(capacity: Int, streams: [String]) {
        self.capacity = capacity
        self.maximumEntries = max(64, capacity / 128)
        self.state = NIOLockedValueBox(State(openStreams: Set(streams)))
    }

    /// Keeps `bytes` of `kind`, dropping the oldest bytes beyond the capacity.
    func append(_ kind: String, _ bytes: [UInt8]) {
        guard !bytes.isEmpty, capacity > 0 else { return }
        let waiters = state.withLockedValue { s -> [CheckedContinuation<Void, Never>] in
            let dropped = bytes.count > capacity ? bytes.count - capacity : 0
            let kept = dropped > 0 ? Array(bytes.suffix(capacity)) : bytes
            s.position += UInt64(dropped)
            if s.live > 0, s.entries[s.entries.count - 1].kind == kind,
                s.entries[s.entries.count - 1].sequence == s.position,
                s.entries[s.entries.count - 1].bytes.count + kept.count <= Self.largestMergedEntry
            {
                s.entries[s.entries.count - 1].bytes += kept
            } else {
                s.entries.append(Entry(start: s.position, kind: kind, bytes: kept))
            }
            s.position += UInt64(kept.count)
            s.bytes += kept.count
            while s.bytes > capacity || s.live > maximumEntries {
                let excess = s.live > maximumEntries ? Int.max : s.bytes - capacity
                let oldest = s.entries[s.first].bytes.count
                if oldest <= excess {
                    s.bytes -= oldest
                    s.entries[s.first].bytes = []
                    s.first += 1
                } else {
                    s.entries[s.first].bytes.removeFirst(excess)
                    s.entries[s.first].start += UInt64(excess)
                    s.bytes -= excess
                }
            }
            if s.first > 64, s.first * 2 > s.entries.count {
                s.entries.removeFirst(s.first)
                s.first = 0
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
    /// The runs kept.
    var entryCount: Int { state.withLockedValue { $0.live } }

    /// The bytes kept past the position `sequence` (a follower's cursor: the `sequence` of the
    /// last entry it had), as runs, and whether the log has ended. Found by a binary search: a
    /// follower woken for each append does not scan the whole log.
    func entries(after sequence: UInt64) -> (entries: [Entry], ended: Bool) {
        state.withLockedValue { s in
            var low = s.first
            var high = s.entries.count
            while low < high {
                let middle = (low + high) / 2
                if s.entries[middle].sequence <= sequence { low = middle + 1 } else { high = middle }
            }
            var found: [Entry] = []
            for entry in s.entries[low...] where !entry.bytes.isEmpty {
                guard entry.start < sequence else {
                    found.append(entry)
                    continue
                }
                // Only the bytes past the cursor are copied.
                found.append(Entry(start: sequence, kind: entry.kind, bytes: Array(entry.bytes[Int(sequence - entry.start)...])))
            }
            return (found, s.ended)
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
                    if s.ended || s.position > sequence || Task.isCancelled { return true }
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
