import HoldfastCore
import Testing

/// A handoff peer's process's checkpoint and ring slots come back into use as late as possible:
/// a stream's shared ring releases its free blocks' pages when its storage goes, which can be
/// after its process left, and in a newer stream's slot that zeroes bytes not delivered yet.
@Suite("Handoff slots are reused last", .timeLimit(.minutes(1)))
struct HandoffSlotsTests {
    /// The soak's case: a broker started after a crash (or a live upgrade) is handed a process
    /// with the slots an earlier broker gave it — the first of the range, where every broker's
    /// taking began. It leaves; the next process adopted must not get those slots. The old
    /// cursor, at the range's first slot in a new broker, took them at once.
    @Test func slotsAProcessWasHandedBackWithAreNotTheNextTaken() {
        var slots = HandoffSlots(range: 100..<108)
        slots.claim([100, 101], for: "earlier")
        #expect(slots.end("earlier") == [100, 101])
        #expect(slots.take(for: "next", count: 2) == [102, 103])
    }

    @Test func aFreedSlotIsReusedOnlyOnceNoFreshOneIsLeftAndFirstFreedFirst() {
        var slots = HandoffSlots(range: 0..<4)
        #expect(slots.take(for: "a", count: 2) == [0, 1])
        #expect(slots.take(for: "b", count: 1) == [2])
        #expect(slots.end("b") == [2])
        #expect(slots.end("a") == [0, 1])
        // Fresh first, then the freed ones in the order they were freed.
        #expect(slots.take(for: "c", count: 2) == [3, 2])
        #expect(slots.take(for: "d", count: 2) == [0, 1])
        #expect(slots.take(for: "e", count: 1) == nil, "every slot taken")
        #expect(slots.end("c") == [3, 2])
        #expect(slots.take(for: "e", count: 1) == [3])
    }

    @Test func aSlotClaimedWhileItWaitsToBeReusedIsNotGivenTwice() {
        var slots = HandoffSlots(range: 0..<3)
        #expect(slots.take(for: "a", count: 3) == [0, 1, 2])
        #expect(slots.end("a") == [0, 1, 2])
        // Handed back with slot 0 (a kept release, say) while 0 waits in the freed queue.
        slots.claim([0], for: "back")
        #expect(slots.take(for: "b", count: 2) == [1, 2])
        #expect(slots.take(for: "c", count: 1) == nil)
        #expect(slots.end("back") == [0])
        #expect(slots.take(for: "c", count: 1) == [0])
        #expect(Set([slots.slots(of: "b"), slots.slots(of: "c")].compactMap { $0 }.flatMap { $0 }) == [0, 1, 2])
    }

    @Test func oneTakeAtATimeForAProcessAndNothingForANameWithout() {
        var slots = HandoffSlots(range: 0..<8)
        #expect(slots.take(for: "a", count: 1) == [0])
        #expect(slots.take(for: "a", count: 1) == nil, "a process has its slots once")
        #expect(slots.end("nobody") == nil)
        #expect(slots.slots(of: "nobody") == nil && !slots.has("nobody"))
    }

    /// A deposit the supervisor answers after the adopt stopped waiting: the process has slots
    /// (`has`) but is not kept until the word says so; a `false` leaves it unkept.
    @Test func aProcessIsKeptOnceTheSupervisorsWordSaysSo() {
        var slots = HandoffSlots(range: 0..<8)
        _ = slots.take(for: "late", count: 1)
        _ = slots.take(for: "refused", count: 1)
        slots.awaitWord("late")
        slots.awaitWord("refused")
        #expect(slots.has("late") && !slots.isKept("late"))
        #expect(slots.settleWord("late", kept: true) == true)
        #expect(slots.isKept("late"))
        #expect(slots.settleWord("refused", kept: false) == false)
        #expect(!slots.isKept("refused") && slots.has("refused"))
        #expect(slots.settleWord("refused", kept: true) == nil, "a word comes once")
        _ = slots.end("refused")
        #expect(slots.settleWord("refused", kept: true) == nil, "nor for a process that left")
        slots.awaitWord("nobody")
        #expect(!slots.isKept("nobody"))
    }
}
