/// The last `capacity` values kept, by key, the oldest dropped first; keeping a key again makes
/// it the newest. What the ledgers remember of forgotten processes (`CreateLedger`: a create's
/// key by process id; `SignalLedger`: the signals sent, by process and key) — bounded, since a
/// host may run processes for ever, and in order, since a snapshot hands it on as it is.
struct RecentlyKept<Key: Hashable & Sendable, Value: Sendable>: Sendable {
    let capacity: Int
    private var entries: [Key: (value: Value, sequence: UInt64)] = [:]
    /// Keys in the order they were kept (entries replaced since are skipped on eviction).
    private var order: [(key: Key, sequence: UInt64)] = []
    private var orderStart = 0
    private var sequence: UInt64 = 0

    init(capacity: Int) {
        self.capacity = capacity
    }

    subscript(key: Key) -> Value? { entries[key]?.value }

    var count: Int { entries.count }
    /// Entries kept to know the eviction order (bounded: at most about 2 × capacity).
    var orderLength: Int { order.count - orderStart }

    /// Oldest first.
    var inOrder: [(key: Key, value: Value)] {
        entries.sorted { $0.value.sequence < $1.value.sequence }.map { ($0.key, $0.value.value) }
    }

    mutating func keep(_ value: Value, for key: Key) {
        sequence &+= 1
        entries[key] = (value, sequence)
        order.append((key, sequence))
        while entries.count > capacity, orderStart < order.count {
            let oldest = order[orderStart]
            orderStart += 1
            if entries[oldest.key]?.sequence == oldest.sequence { entries.removeValue(forKey: oldest.key) }
        }
        // Keep the order list from growing with stale entries (a key kept again and again
        // leaves one behind each time).
        if order.count - orderStart > 2 * capacity {
            order = entries.map { (key: $0.key, sequence: $0.value.sequence) }.sorted { $0.sequence < $1.sequence }
            orderStart = 0
        } else if orderStart > capacity {
            order.removeFirst(orderStart)
            orderStart = 0
        }
    }

    mutating func remove(_ key: Key) {
        entries.removeValue(forKey: key)
    }
}
