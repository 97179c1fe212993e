import HoldfastCore
import NIOConcurrencyHelpers

/// One-shot faults shared by every `FaultyConnection` made with the same plan. Arm a fault and
/// the next connection that reaches that point dies there.
public final class FaultPlan: Sendable {
    public enum Fault: String, Sendable, CaseIterable {
        /// Close instead of answering the hello: the dialer's handshake dies half-way.
        case midHello
        /// Close instead of the next write: an acknowledgement that is never sent.
        case lostAck
        /// Close right after the next write: the acknowledgement leaves, the connection dies.
        case afterAck
    }

    private let armed = NIOLockedValueBox<[Fault: Int]>([:])
    private let fired = NIOLockedValueBox<[Fault: Int]>([:])

    public init() {}

    public func arm(_ fault: Fault) {
        armed.withLockedValue { $0[fault, default: 0] += 1 }
    }

    public func firedCount(_ fault: Fault) -> Int { fired.withLockedValue { $0[fault] ?? 0 } }
    public var pending: Int { armed.withLockedValue { $0.values.reduce(0, +) } }

    fileprivate func take(_ fault: Fault) -> Bool {
        let taken = armed.withLockedValue { a -> Bool in
            guard let count = a[fault], count > 0 else { return false }
            a[fault] = count - 1
            return true
        }
        if taken { fired.withLockedValue { $0[fault, default: 0] += 1 } }
        return taken
    }
}

/// Wraps a connection (the host's end, in tests) and kills it where a `FaultPlan` says.
public final class FaultyConnection<Inner: ByteConnection>: ByteConnection {
    public let inner: Inner
    private let plan: FaultPlan
    private let writes = NIOLockedValueBox(0)

    public struct Injected: Error, Sendable {}

    public init(_ inner: Inner, plan: FaultPlan) {
        self.inner = inner
        self.plan = plan
    }

    public func waitReadable() async throws { try await inner.waitReadable() }
    public func read(into buffer: UnsafeMutableRawBufferPointer) async throws -> Int { try await inner.read(into: buffer) }
    public func readNow(into buffer: UnsafeMutableRawBufferPointer) throws -> Int? { try inner.readNow(into: buffer) }

    public func write(_ bytes: UnsafeRawBufferPointer) async throws(WriteFailure) {
        try before()
        try await inner.write(bytes)
        after()
    }

    public func write(_ header: UnsafeRawBufferPointer, _ body: UnsafeRawBufferPointer) async throws(WriteFailure) {
        try before()
        try await inner.write(header, body)
        after()
    }

    public func write(vectors: [UnsafeRawBufferPointer]) async throws(WriteFailure) {
        try before()
        try await inner.write(vectors: vectors)
        after()
    }

    public func close() { inner.close() }
    public func shutdownWrite() { inner.shutdownWrite() }

    private func before() throws(WriteFailure) {
        let first = writes.withLockedValue { count -> Bool in
            count += 1
            return count == 1
        }
        if (first && plan.take(.midHello)) || (!first && plan.take(.lostAck)) {
            inner.close()
            throw WriteFailure(accepted: 0, cause: Injected())
        }
    }

    private func after() {
        if writes.withLockedValue({ $0 }) > 1, plan.take(.afterAck) { inner.close() }
    }
}
