import NIOConcurrencyHelpers

/// What the registry needs from a slot, whatever its connection type.
public protocol ManagedSlot: AnyObject, Sendable {
    var isClosed: Bool { get }
    func disconnect()
    func redialNow()
}

extension ConnSlot: ManagedSlot {}

/// Tracks the live slots of a process so that a bridge event reaches all of them.
///
/// Closed slots are dropped as the registry goes: on every sweep (`disconnectAll`, `redialAll`,
/// `count`) and, amortised, on `register`, so its size stays bounded by the live-stream count
/// however many streams come and go.
public final class SlotRegistry: Sendable {
    private struct State {
        var slots: [ObjectIdentifier: any ManagedSlot] = [:]
        /// Size after the last compaction; `register` compacts when the table doubles.
        var compactedSize = 0
    }

    private let state = NIOLockedValueBox(State())

    public init() {}

    /// Adds a slot. `nil` and already-closed slots are ignored; registering twice is harmless.
    public func register(_ slot: (any ManagedSlot)?) {
        guard let slot, !slot.isClosed else { return }
        state.withLockedValue { s in
            s.slots[ObjectIdentifier(slot)] = slot
            if s.slots.count > max(64, 2 * s.compactedSize) {
                s.slots = s.slots.filter { !$0.value.isClosed }
                s.compactedSize = s.slots.count
            }
        }
    }

    /// Removes a slot. A slot this registry never saw, or `nil`, is a no-op.
    public func unregister(_ slot: (any ManagedSlot)?) {
        guard let slot else { return }
        _ = state.withLockedValue { $0.slots.removeValue(forKey: ObjectIdentifier(slot)) }
    }

    /// The number of live (not closed) slots; drops closed ones.
    public var count: Int { live().count }

    /// Disconnects every live slot (each closes its connection and starts its own redial cycle).
    /// Returns how many were disconnected.
    @discardableResult
    public func disconnectAll() -> Int {
        let slots = live()
        for slot in slots { slot.disconnect() }
        return slots.count
    }

    /// The bridge is back: every empty slot dials now. Returns how many slots were told.
    @discardableResult
    public func redialAll() -> Int {
        let slots = live()
        for slot in slots { slot.redialNow() }
        return slots.count
    }

    /// Entries currently stored, closed ones included (for tests of compaction).
    var storedCount: Int { state.withLockedValue { $0.slots.count } }

    /// Compacts, then returns the live slots. Slot methods run outside the registry's lock.
    private func live() -> [any ManagedSlot] {
        state.withLockedValue { s in
            s.slots = s.slots.filter { !$0.value.isClosed }
            s.compactedSize = s.slots.count
            return Array(s.slots.values)
        }
    }
}
