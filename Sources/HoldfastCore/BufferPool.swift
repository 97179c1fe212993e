import NIOConcurrencyHelpers

/// A pool of fixed-size, uninitialised byte buffers for the data plane.
///
/// Relays borrow a buffer only once their source is readable and give it back as soon as it is
/// written out, and replay rings hold blocks only while bytes are unacknowledged, so thousands
/// of idle streams hold no buffer at all, while busy ones reuse the same memory without
/// allocating or zero-filling per chunk.
///
/// How much it keeps follows the load: a burst's buffers stay in the pool while the burst
/// needs them (a hundred busy streams cycle thousands of ring blocks a second; each new block
/// from the system is a mapping to create, sixteen pages to fault in and zero, and a mapping to
/// remove — it cost the broker more than the bytes it carried), and what the pool did not need
/// during a `trimInterval` goes back, down to `retained` buffers. So memory taken in a burst
/// is returned a few seconds after it.
public final class BufferPool: Sendable {
    public let bufferSize: Int
    /// Buffers kept however long they stay unused.
    public let retained: Int
    public let trimInterval: Duration
    private let state: NIOLockedValueBox<State>

    private struct State {
        var free: [Buffer] = []
        /// The fewest buffers `free` held since the last trim: that many were not needed.
        var lowWater = 0
        var trimScheduled = false
    }

    /// A borrowed buffer. Give it back with `BufferPool.recycle` (or let `withBuffer` do it).
    public struct Buffer: @unchecked Sendable {
        public let bytes: UnsafeMutableRawBufferPointer
    }

    public init(bufferSize: Int = 128 * 1024, retained: Int = 32, trimInterval: Duration = .seconds(2)) {
        precondition(bufferSize > 0)
        self.bufferSize = bufferSize
        self.retained = retained
        self.trimInterval = trimInterval
        self.state = NIOLockedValueBox(State())
    }

    public static let shared = BufferPool()

    public func take() -> Buffer {
        let buffer = state.withLockedValue { s -> Buffer? in
            guard let buffer = s.free.popLast() else { return nil }
            s.lowWater = min(s.lowWater, s.free.count)
            return buffer
        }
        return buffer ?? Buffer(bytes: .allocate(byteCount: bufferSize, alignment: 16))
    }

    public func recycle(_ buffer: Buffer) {
        let scheduleTrim = state.withLockedValue { s -> Bool in
            s.free.append(buffer)
            guard s.free.count > retained, !s.trimScheduled else { return false }
            s.trimScheduled = true
            return true
        }
        if scheduleTrim {
            TimeoutWheel.shared.schedule(after: trimInterval) { [weak self] in self?.trim() }
        }
    }

    /// Buffers held unused.
    public var freeCount: Int { state.withLockedValue { $0.free.count } }

    /// Gives back the buffers that stayed unused since the last trim, keeping at least
    /// `retained`; runs again later while the pool holds more than that.
    public func trim() {
        let (surplus, again) = state.withLockedValue { s -> ([Buffer], Bool) in
            let excess = max(0, min(s.lowWater, s.free.count) - retained)
            // The longest unused first (the end of the list is what was recycled last).
            let surplus = Array(s.free.prefix(excess))
            s.free.removeFirst(excess)
            s.lowWater = s.free.count
            s.trimScheduled = s.free.count > retained
            return (surplus, s.trimScheduled)
        }
        for buffer in surplus { buffer.bytes.deallocate() }
        if again {
            TimeoutWheel.shared.schedule(after: trimInterval) { [weak self] in self?.trim() }
        }
    }

    deinit {
        for buffer in state.withLockedValue({ $0.free }) { buffer.bytes.deallocate() }
    }
}
