import HoldfastCore
import HoldfastProtocol
import NIOConcurrencyHelpers

/// A guest stream and its host stream joined by in-memory links that a test can break at will:
/// every guest dial makes a fresh `MemoryPipe` whose host end goes through the same accept path
/// a real listener uses (read the hello, look up the token, `accept`).
public final class ResumablePair: Sendable {
    public typealias Stream = ResumableStream<MemoryPipe.End>

    public let guest: Stream
    public let host: Stream
    private let links = NIOLockedValueBox<[MemoryPipe]>([])
    private let dials = NIOLockedValueBox(0)
    /// Makes a guest end that dials this pair's host (the first guest, and any successor).
    private let makeGuestEnd: @Sendable (UInt64?, RestoredRing?, Range<UInt64>?, any RingBlockStorage, StreamCheckpoint?) -> Stream

    /// - Parameters:
    ///   - guestDirection: `.send` for an output stream (stdout), `.receive` for stdin.
    ///   - budget: called per dial; the bytes that link carries before it is cut (nil: never).
    ///   - beforeAccept: runs on the host side after the hello was read (delay it, or cut it).
    ///   - checkpoint: where the first guest keeps its progress (for `restartGuest`).
    public init(
        guestDirection: StreamDirection,
        configuration: ResumableConfiguration = ResumableConfiguration(),
        policy: RedialPolicy = RedialPolicy(attempts: 1_000_000, interval: .zero, connectTimeout: .seconds(5)),
        token: String = "test-stream",
        budget: @escaping @Sendable () -> Int? = { nil },
        beforeAccept: @escaping @Sendable (MemoryPipe) async -> Void = { _ in },
        checkpoint: StreamCheckpoint? = nil,
        guestStorage: any RingBlockStorage = BufferPool.ring
    ) {
        let tokenBytes = Array(token.utf8)
        let secret = StreamSecret.random()
        let host = Stream(
            token: tokenBytes, secret: secret, role: .host, direction: guestDirection == .send ? .receive : .send,
            configuration: configuration)
        self.host = host
        let links = self.links
        let dials = self.dials
        // Dial attempts numbered across guests, as the broker's monotonic clock does: a
        // successor's first dial outranks everything its predecessor tried.
        let attempts = NIOLockedValueBox<UInt64>(0)
        let attemptClock: @Sendable () -> UInt64 = { attempts.withLockedValue { $0 += 1; return $0 } }
        let dial: @Sendable () async throws -> MemoryPipe.End = {
            let link = MemoryPipe(budget: budget())
            links.withLockedValue { $0.append(link) }
            dials.withLockedValue { $0 += 1 }
            let (guestEnd, hostEnd) = link.ends
            Task {
                do {
                    let hello = try await Handshake.readHello(from: hostEnd)
                    await beforeAccept(link)
                    guard hello.token == tokenBytes else {
                        await Handshake.refuse(hostEnd, .wrongToken)
                        return
                    }
                    try await host.accept(hostEnd, hello: hello)
                } catch {
                    hostEnd.close()
                }
            }
            return guestEnd
        }
        makeGuestEnd = { resumeAt, restoring, hole, storage, checkpoint in
            Stream(
                token: tokenBytes, secret: secret, role: .guest, direction: guestDirection, configuration: configuration, policy: policy,
                storage: storage, resumeAt: resumeAt, restoring: restoring, hole: hole, checkpoint: checkpoint, dial: dial, attemptClock: attemptClock)
        }
        self.guest = makeGuestEnd(nil, nil, nil, guestStorage, checkpoint)
    }

    /// A new guest end taking over from a crashed one (the first guest must be closed first:
    /// a crash is a relay gone): it resumes at `resumeAt` — what the crashed one's checkpoint
    /// recovered — and connects at once. The caller closes it.
    public func restartGuest(
        resumeAt: UInt64, restoring: RestoredRing? = nil, hole: Range<UInt64>? = nil, storage: any RingBlockStorage = BufferPool.ring,
        checkpoint: StreamCheckpoint? = nil
    ) -> Stream {
        let successor = makeGuestEnd(resumeAt, restoring, hole, storage, checkpoint)
        successor.slot.disconnect()
        return successor
    }

    /// Connects for the first time.
    public func start() {
        guest.slot.disconnect()
    }

    /// Cuts the current link (in-flight bytes both ways are lost).
    public func cutCurrentLink() {
        links.withLockedValue { $0.last }?.cut()
    }

    public var dialCount: Int { dials.withLockedValue { $0 } }

    public func close() {
        guest.close()
        host.close()
        links.withLockedValue { $0.removeAll() }
    }
}

/// Deterministic pseudo-random bytes (SplitMix64) for stream tests: the same seed gives the
/// same stream, so the receiver can check it without holding it.
public struct PatternBytes {
    private var random: SeededRandom
    private var word: UInt64 = 0
    private var left = 0

    public init(seed: UInt64) { random = SeededRandom(seed: seed) }

    public mutating func fill(_ buffer: UnsafeMutableRawBufferPointer) {
        for index in 0..<buffer.count {
            if left == 0 {
                word = random.next()
                left = 8
            }
            buffer[index] = UInt8(truncatingIfNeeded: word)
            word >>= 8
            left -= 1
        }
    }

    public mutating func next(_ count: Int) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        bytes.withUnsafeMutableBytes { fill($0) }
        return bytes
    }
}
