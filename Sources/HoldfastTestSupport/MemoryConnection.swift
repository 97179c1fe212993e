import HoldfastCore
import NIOConcurrencyHelpers

/// An in-memory ByteConnection for tests: records what is written to it, serves what is fed
/// to it, and can be told to fail or hang, so ConnSlot and relay behaviour is tested without
/// sockets or timing luck.
public final class MemoryConnection: ByteConnection, CustomStringConvertible {
    public struct Failure: Error, Sendable, Equatable {
        public var reason: String
        public init(reason: String) { self.reason = reason }
    }

    public enum WriteBehaviour: Sendable {
        /// Accept every byte.
        case accept
        /// Accept this many more bytes, then fail (and keep failing).
        case failAfter(Int)
        /// Accept nothing and suspend until the connection is closed (a full socket buffer).
        case hang
    }

    private struct State {
        var written: [UInt8] = []
        var inbound: [UInt8] = []
        var inboundEnded = false
        var inboundError: String?
        var closed = false
        var closeCount = 0
        var writeBehaviour: WriteBehaviour = .accept
        var readers: [Int: CheckedContinuation<Void, any Error>] = [:]
        var nextReader = 0
        var hungWriters: [CheckedContinuation<Void, Never>] = []
    }

    public let label: String
    private let state = NIOLockedValueBox(State())

    public init(label: String = "memory", writes: WriteBehaviour = .accept) {
        self.label = label
        state.withLockedValue { $0.writeBehaviour = writes }
    }

    public var description: String { label }

    // MARK: Inspection

    public var written: [UInt8] { state.withLockedValue { $0.written } }
    public var isClosed: Bool { state.withLockedValue { $0.closed } }
    public var closeCount: Int { state.withLockedValue { $0.closeCount } }

    // MARK: Control

    public func setWriteBehaviour(_ behaviour: WriteBehaviour) {
        state.withLockedValue { $0.writeBehaviour = behaviour }
    }

    /// Makes bytes available to `read`.
    public func feed(_ bytes: [UInt8]) {
        let readers = state.withLockedValue { s -> [CheckedContinuation<Void, any Error>] in
            s.inbound += bytes
            defer { s.readers.removeAll() }
            return Array(s.readers.values)
        }
        for reader in readers { reader.resume() }
    }

    /// The peer closed its side: `read` returns 0 once the fed bytes are consumed.
    public func feedEndOfFile() {
        let readers = state.withLockedValue { s -> [CheckedContinuation<Void, any Error>] in
            s.inboundEnded = true
            defer { s.readers.removeAll() }
            return Array(s.readers.values)
        }
        for reader in readers { reader.resume() }
    }

    /// The transport failed: `read` throws.
    public func feedError(_ reason: String = "connection reset") {
        let readers = state.withLockedValue { s -> [CheckedContinuation<Void, any Error>] in
            s.inboundError = reason
            defer { s.readers.removeAll() }
            return Array(s.readers.values)
        }
        for reader in readers { reader.resume() }
    }

    // MARK: ByteConnection

    public func waitReadable() async throws {
        while true {
            let ready: Bool = state.withLockedValue { s in
                !s.inbound.isEmpty || s.inboundEnded || s.inboundError != nil || s.closed
            }
            if ready { return }
            try await parkReader()
        }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer) async throws -> Int {
        while true {
            if let count = try readNow(into: buffer) { return count }
            try await parkReader()
        }
    }

    public func readNow(into buffer: UnsafeMutableRawBufferPointer) throws -> Int? {
        let outcome: Result<Int?, Failure> = state.withLockedValue { s in
            if s.closed { return .failure(Failure(reason: "closed")) }
            if !s.inbound.isEmpty {
                let count = min(buffer.count, s.inbound.count)
                buffer.copyBytes(from: s.inbound[..<count])
                s.inbound.removeFirst(count)
                return .success(count)
            }
            if let reason = s.inboundError { return .failure(Failure(reason: reason)) }
            if s.inboundEnded { return .success(0) }
            return .success(nil)
        }
        return try outcome.get()
    }

    public func write(_ bytes: UnsafeRawBufferPointer) async throws(WriteFailure) {
        enum Step { case done, fail(Int, String), hang }
        let step: Step = state.withLockedValue { s in
            if s.closed { return .fail(0, "closed") }
            switch s.writeBehaviour {
            case .accept:
                s.written += bytes
                return .done
            case .failAfter(let remaining):
                let accepted = min(remaining, bytes.count)
                s.written += bytes[..<accepted]
                s.writeBehaviour = .failAfter(remaining - accepted)
                if accepted == bytes.count { return .done }
                return .fail(accepted, "broken pipe")
            case .hang:
                return .hang
            }
        }
        switch step {
        case .done: return
        case .fail(let accepted, let reason): throw WriteFailure(accepted: accepted, cause: Failure(reason: reason))
        case .hang:
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let resumeNow = state.withLockedValue { s -> Bool in
                    if s.closed { return true }
                    s.hungWriters.append(continuation)
                    return false
                }
                if resumeNow { continuation.resume() }
            }
            throw WriteFailure(accepted: 0, cause: Failure(reason: "closed while writing"))
        }
    }

    public func close() {
        let (readers, writers) = state.withLockedValue { s -> ([CheckedContinuation<Void, any Error>], [CheckedContinuation<Void, Never>]) in
            s.closeCount += 1
            s.closed = true
            defer {
                s.readers.removeAll()
                s.hungWriters.removeAll()
            }
            return (Array(s.readers.values), s.hungWriters)
        }
        for reader in readers { reader.resume() }
        for writer in writers { writer.resume() }
    }

    /// Parks until something changes; like a reactor wait, it honours cancellation.
    private func parkReader() async throws {
        let id = state.withLockedValue { s -> Int in
            s.nextReader += 1
            return s.nextReader
        }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                let outcome: Result<Void, any Error>? = state.withLockedValue { s in
                    if !s.inbound.isEmpty || s.inboundEnded || s.inboundError != nil || s.closed { return .success(()) }
                    if Task.isCancelled { return .failure(CancellationError()) }
                    s.readers[id] = continuation
                    return nil
                }
                if let outcome { continuation.resume(with: outcome) }
            }
        } onCancel: {
            state.withLockedValue { $0.readers.removeValue(forKey: id) }?.resume(throwing: CancellationError())
        }
    }
}
