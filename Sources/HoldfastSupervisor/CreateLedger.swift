import HoldfastProtocol

#if canImport(Glibc)
import Glibc
#endif

/// What makes a create safe to send again (docs/PROTOCOL.md, "Repeating a create").
///
/// A host whose bridge drops before the reply cannot know whether its create ran. Sending it
/// again must not start the program twice, and must not race the first: the id is reserved the
/// moment a create is accepted (not when its process has started, seconds later on a busy
/// guest), and a create that carries an idempotency key is recognised by it — while the first
/// is still starting (the repeat waits for the first's outcome), while its process lives, and
/// after its exit was acknowledged and the process forgotten (the last `capacity` such keys
/// are remembered).
///
/// Pure bookkeeping: the supervisor keeps it under the same lock as its process table, so that
/// "is the id free" and "reserve it" are one step.
struct CreateLedger {
    /// A create in progress. Repeats of it wait here for its outcome.
    typealias PendingStart = PendingOutcome<pid_t>

    enum Decision {
        /// The id is now reserved for this create: start the process, then `started` or `failed`.
        case start(PendingStart)
        /// The same create (same id and key) is starting: its outcome is this one's.
        case join(PendingStart)
        /// The same create already started this process (it may have exited since).
        case repeated(pid_t)
        /// Another create holds the id.
        case exists
    }

    /// How many acknowledged creates are remembered by key after their process was forgotten.
    let capacity: Int
    private(set) var starting: [String: PendingStart] = [:]
    /// The keyed creates whose process was forgotten, by id.
    private var remembered: RecentlyKept<String, Remembered>

    init(capacity: Int = 4096) {
        self.capacity = capacity
        remembered = RecentlyKept(capacity: capacity)
    }

    /// A keyed create whose process was forgotten, as a snapshot keeps it.
    struct Remembered: Codable, Sendable, Equatable {
        var id: String
        var key: String
        var pid: pid_t
    }

    /// The remembered creates, oldest first (what a snapshot keeps; creates still starting are
    /// not in it).
    var rememberedInOrder: [Remembered] { remembered.inOrder.map(\.value) }

    /// A ledger that remembers what a snapshot listed, in the same order.
    init(capacity: Int = 4096, restoring entries: [Remembered]) {
        self.init(capacity: capacity)
        for entry in entries { forgotten(id: entry.id, key: entry.key, pid: entry.pid) }
    }

    var rememberedCount: Int { remembered.count }
    /// Entries kept to know the eviction order (bounded: at most about 2 × capacity).
    var orderLength: Int { remembered.orderLength }

    /// `live` is the key and pid of the process the table still holds under this id, if any.
    mutating func decide(id: String, key: String?, live: (key: String?, pid: pid_t)?) -> Decision {
        if let live {
            if let key, live.key == key { return .repeated(live.pid) }
            return .exists
        }
        if let pending = starting[id] {
            if let key, pending.key == key { return .join(pending) }
            return .exists
        }
        if let key, let earlier = remembered[id], earlier.key == key {
            return .repeated(earlier.pid)
        }
        // A new create for this id (a different key, or none): whatever was remembered under
        // the id belongs to a create that is over.
        remembered.remove(id)
        let pending = PendingStart(key: key)
        starting[id] = pending
        return .start(pending)
    }

    /// The reserved create has ended, started or failed (a failed create is not remembered:
    /// sending it again is a new attempt, since nothing of the first is left).
    mutating func release(id: String) {
        starting.removeValue(forKey: id)
    }

    /// The process of a keyed create was forgotten (its exit acknowledged): remember the key,
    /// so a late repeat of that create answers with its pid instead of running it again.
    mutating func forgotten(id: String, key: String?, pid: pid_t) {
        guard let key else { return }
        remembered.keep(Remembered(id: id, key: key, pid: pid), for: id)
    }
}
