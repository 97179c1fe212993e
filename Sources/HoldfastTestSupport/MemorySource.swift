import HoldfastCore
import NIOConcurrencyHelpers

/// An in-memory byte source standing in for a process's output pipe: serves what was appended,
/// then end-of-file once `finish()` is called. Counts its reads, so a test can show that a parked
/// relay stops reading its source.
public final class MemorySource: ByteReader {
    private struct State {
        var pending: [UInt8] = []
        var finished = false
        var waiters: [Int: CheckedContinuation<Void, any Error>] = [:]
        var nextWaiter = 0
        var reads = 0
    }

    private let state = NIOLockedValueBox(State())

    public init(_ bytes: [UInt8] = [], finished: Bool = false) {
        state.withLockedValue {
            $0.pending = bytes
            $0.finished = finished
        }
    }

    /// How many reads returned data.
    public var reads: Int { state.withLockedValue { $0.reads } }
    public var remaining: Int { state.withLockedValue { $0.pending.count } }
    /// Readers suspended in `waitReadable`.
    public var waiters: Int { state.withLockedValue { $0.waiters.count } }

    public func append(_ bytes: [UInt8]) {
        wake { $0.pending += bytes }
    }

    public func finish() {
        wake { $0.finished = true }
    }

    private func wake(_ change: (inout State) -> Void) {
        let waiters = state.withLockedValue { s -> [CheckedContinuation<Void, any Error>] in
            change(&s)
            defer { s.waiters.removeAll() }
            return Array(s.waiters.values)
        }
        for waiter in waiters { waiter.resume() }
    }

    public func waitReadable() async throws {
        let id = state.withLockedValue { s -> Int in
            s.nextWaiter += 1
            return s.nextWaiter
        }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                let outcome: Result<Void, any Error>? = state.withLockedValue { s in
                    if !s.pending.isEmpty || s.finished { return .success(()) }
                    if Task.isCancelled { return .failure(CancellationError()) }
                    s.waiters[id] = continuation
                    return nil
                }
                if let outcome { continuation.resume(with: outcome) }
            }
        } onCancel: {
            state.withLockedValue { $0.waiters.removeValue(forKey: id) }?.resume(throwing: CancellationError())
        }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer) async throws -> Int {
        while true {
            if let count = readNow(into: buffer) { return count }
            try await waitReadable()
        }
    }

    public func readNow(into buffer: UnsafeMutableRawBufferPointer) -> Int? {
        state.withLockedValue { s in
            if !s.pending.isEmpty {
                let count = min(buffer.count, s.pending.count)
                buffer.copyBytes(from: s.pending[..<count])
                s.pending.removeFirst(count)
                s.reads += 1
                return count
            }
            return s.finished ? 0 : nil
        }
    }
}
