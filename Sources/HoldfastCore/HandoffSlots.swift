/// The checkpoint slots a broker gives handoff peers' streams (a range of the checkpoint and
/// ring areas the supervisor never allocates), which process has which, and whether the
/// supervisor keeps each process's deposit.
///
/// A freed slot is reused as late as possible: slots never used by this broker first, then the
/// freed ones, first freed first. Why: a stream can touch its slot after its process left — the
/// shared ring releases its free blocks' pages when the stream's storage goes (`deinit`, after
/// the last task holding it let go), and a checkpoint may take one last store — and in a newer
/// stream's slot that release zeroes bytes the newer stream has not delivered yet. The slots
/// were once taken round-robin from a cursor that each broker started at the range's first
/// slot, while a broker started after a crash or a live upgrade *claims* whatever slots the
/// processes it is handed had: when such a process left, its slots were often the very next
/// the cursor took — found by the soak as a handed-over process's stderr line arriving as nine
/// zero bytes (the right length, no broker crash in its life). The ring area now refuses a
/// stale storage's writes itself (`RegionOwnership`); the order stays, for the checkpoint's
/// last store, which nothing guards.
public struct HandoffSlots: Sendable {
    public let range: Range<Int>
    /// The next slot never taken nor claimed by this broker (`range.upperBound`: none left).
    private var fresh: Int
    /// Slots taken or claimed by this broker at some time.
    private var used: Set<Int> = []
    /// Slots freed here, in the order they were: reused first in, first out, once no fresh
    /// slot is left.
    private var freed: [Int] = []
    private var freedHead = 0
    private var taken: Set<Int> = []
    private var byProcess: [String: [Int]] = [:]
    /// Processes with slots whose deposit the supervisor has not said it keeps: its word is
    /// awaited (`awaitingWord`), or it said no.
    private var unkept: Set<String> = []
    /// ...by the deposit it awaits it for (nil: not numbered).
    private var awaitingWord: [String: UInt64?] = [:]

    public init(range: Range<Int>) {
        self.range = range
        self.fresh = range.lowerBound
    }

    /// `count` free slots for `process`, nil if not that many are free (or it has slots).
    public mutating func take(for process: String, count: Int) -> [Int]? {
        guard byProcess[process] == nil, taken.count + count <= range.count else { return nil }
        var slots: [Int] = []
        while slots.count < count, fresh < range.upperBound {
            if !used.contains(fresh) { slots.append(fresh) }
            fresh += 1
        }
        while slots.count < count, freedHead < freed.count {
            let slot = freed[freedHead]
            freedHead += 1
            // A freed slot claimed again since (a handed-back process naming it) is not free.
            if !taken.contains(slot), !slots.contains(slot) { slots.append(slot) }
        }
        if freedHead > 4096, freedHead * 2 > freed.count {
            freed.removeFirst(freedHead)
            freedHead = 0
        }
        // Every slot not taken is fresh or waits in `freed`, so the count checked above is
        // found; were it not, what was found goes back to be taken first next time.
        guard slots.count == count else {
            freed.insert(contentsOf: slots, at: freedHead)
            return nil
        }
        taken.formUnion(slots)
        used.formUnion(slots)
        byProcess[process] = slots
        return slots
    }

    /// `process` has `slots` (named by the supervisor when it hands the process back).
    public mutating func claim(_ slots: [Int], for process: String) {
        taken.formUnion(slots)
        used.formUnion(slots)
        byProcess[process, default: []] += slots
    }

    /// `process`'s slots, nil if it has none here.
    public func slots(of process: String) -> [Int]? { byProcess[process] }

    /// Whether `process` has slots here (its fds were deposited with the supervisor, which may
    /// not have said yet whether it keeps them).
    public func has(_ process: String) -> Bool { byProcess[process] != nil }

    /// Whether the supervisor keeps copies of `process`'s fds: a broker crash then costs it nothing.
    public func isKept(_ process: String) -> Bool { has(process) && !unkept.contains(process) }

    /// `process` was adopted before the supervisor's word on its deposit came.
    public mutating func awaitWord(_ process: String, deposit: UInt64? = nil) {
        guard has(process) else { return }
        unkept.insert(process)
        awaitingWord[process] = .some(deposit)
    }

    /// The supervisor's word came for a process adopted without it: whether it keeps it, or nil
    /// if no such process waits for it (it left, or the word is for another deposit of the id).
    public mutating func settleWord(_ process: String, kept: Bool, deposit: UInt64? = nil) -> Bool? {
        guard let awaited = awaitingWord[process] else { return nil }
        if let deposit, let awaited, deposit != awaited { return nil }
        awaitingWord[process] = nil
        if kept { unkept.remove(process) }
        return kept
    }

    /// `process` left: its slots, now free (nil if it had none here), to be reused last.
    public mutating func end(_ process: String) -> [Int]? {
        unkept.remove(process)
        awaitingWord[process] = nil
        guard let slots = byProcess.removeValue(forKey: process) else { return nil }
        taken.subtract(slots)
        freed += slots
        return slots
    }
}
