import HoldfastCore
import HoldfastProtocol

#if canImport(Glibc)
import Glibc
#endif

/// The guest's stream ends over real sockets: a ConnSlot (raw) or a ResumableStream
/// (resumable) whose redial dials `address` with the policy's connect timeout.
public enum GuestStreams {
    public static func raw(
        to address: SocketAddress, name: String = "stream", policy: RedialPolicy = .default,
        observer: (@Sendable (SlotEvent) -> Void)? = nil
    ) -> ConnSlot<AsyncFD> {
        ConnSlot(
            name: name, policy: policy,
            dial: { try await Dialer.connect(to: address, timeout: policy.connectTimeout) }, observer: observer)
    }

    /// - Parameters:
    ///   - checkpoint: where the stream keeps its progress for a broker that outlives this one.
    ///   - resumeAt: the stream was held by a broker that crashed: it goes on at this offset
    ///     (what its checkpoint recovered), and the host hears of any gap.
    public static func resumable(
        to address: SocketAddress, token: [UInt8], secret: StreamSecret, direction: StreamDirection,
        configuration: ResumableConfiguration = ResumableConfiguration(), policy: RedialPolicy = .default,
        checkpoint: StreamCheckpoint? = nil, resumeAt: UInt64? = nil, storage: (any RingBlockStorage)? = nil, restoring: RestoredRing? = nil,
        hole: Range<UInt64>? = nil, inputEnded: Bool = false, observer: (@Sendable (SlotEvent) -> Void)? = nil
    ) -> ResumableStream<AsyncFD> {
        ResumableStream(
            token: token, secret: secret, role: .guest, direction: direction, configuration: configuration, policy: policy,
            storage: storage ?? BufferPool.ring, executor: Reactor.shared, resumeAt: resumeAt, restoring: restoring, hole: hole,
            checkpoint: checkpoint, inputEnded: inputEnded,
            dial: { try await Dialer.connect(to: address, timeout: policy.connectTimeout, sendBuffer: Dialer.resumableSendBuffer) },
            attemptClock: monotonicNanoseconds, observer: observer)
    }
}

/// CLOCK_MONOTONIC in nanoseconds: system-wide and never going back within a boot.
@Sendable public func monotonicNanoseconds() -> UInt64 {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return UInt64(now.tv_sec) &* 1_000_000_000 &+ UInt64(now.tv_nsec)
}
