import NIOConcurrencyHelpers
/// Bounded waiting for tests: every wait has a deadline, so a broken invariant fails a test
/// instead of hanging the suite.

/// Every wait here bounds a hang; it never times anything. The bound is at least this long, so
/// a CI machine starved for seconds (two cores, other suites hashing 256 MiB streams) does not
/// fail a test that would pass: what a test asserts is the property, not the speed.
public let hangBoundFloor: Duration = .seconds(30)

public struct TimedOut: Error, CustomStringConvertible {
    public var what: String
    public var description: String { "timed out waiting for \(what)" }
}

/// Polls `condition` every millisecond until it holds; throws `TimedOut` after `timeout`. The
/// default is generous on purpose: it bounds a hang, it does not time anything (a loaded CI
/// machine may take seconds for what takes milliseconds here).
public func eventually(
    _ what: String = "condition", timeout: Duration = .seconds(30), _ condition: () async throws -> Bool
) async throws {
    let deadline = ContinuousClock.now + max(timeout, hangBoundFloor)
    while true {
        if try await condition() { return }
        if ContinuousClock.now >= deadline { throw TimedOut(what: what) }
        try await Task.sleep(for: .milliseconds(1))
    }
}

/// Runs `body`, failing with `TimedOut` if it does not finish within `timeout`: the body is
/// cancelled then, and not waited for. So a body that ignores cancellation — `await task.value`
/// on a task collecting a stream that never ends, a read nothing will answer — fails the test
/// with the name of what it waited for instead of hanging it until the suite's time limit.
public func withTimeout<T: Sendable>(
    _ what: String = "operation", _ timeout: Duration = .seconds(10), _ body: @escaping @Sendable () async throws -> T
) async throws -> T {
    let work = Task { try await body() }
    return try await withTaskCancellationHandler {
        do {
            return try await withDeadline(what, timeout) { try await work.value }
        } catch {
            work.cancel()
            throw error
        }
    } onCancel: {
        work.cancel()
    }
}

/// Runs `body`, failing with `TimedOut` if it does not finish within `timeout`, whether or not
/// it honours cancellation: on a timeout the body is left running, abandoned, not cancelled
/// (`withTimeout` cancels it). For a wait on a process that may never answer (a control request
/// to a daemon whose threads are stuck).
public func withDeadline<T: Sendable>(
    _ what: String = "operation", _ timeout: Duration = .seconds(10), _ body: @escaping @Sendable () async throws -> T
) async throws -> T {
    let resumed = NIOLockedValueBox(false)
    let timer = NIOLockedValueBox<Task<Void, Never>?>(nil)
    return try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T, any Error>) in
        @Sendable func finish(_ result: Result<T, any Error>) {
            guard resumed.withLockedValue({ done in defer { done = true }; return !done }) else { return }
            continuation.resume(with: result)
            // The timer's sleep ends with the wait (many waits in a loop leave no sleepers).
            timer.withLockedValue { $0?.cancel() }
        }
        // The timer is kept before the body starts, so a body that finishes at once cancels it.
        timer.withLockedValue { slot in
            slot = Task {
                guard (try? await Task.sleep(for: max(timeout, hangBoundFloor))) != nil else { return }
                finish(.failure(TimedOut(what: what)))
            }
        }
        Task { finish(await Result { try await body() }) }
    }
}

extension Result where Failure == any Error {
    /// The result of an async throwing `body`.
    init(_ body: () async throws -> Success) async {
        do { self = .success(try await body()) } catch { self = .failure(error) }
    }
}

/// A tiny deterministic PRNG (SplitMix64) so randomized tests can print and replay their seed.
public struct SeededRandom: RandomNumberGenerator, Sendable {
    private var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// The UTF-8 bytes of a string.
public func bytes(_ text: String) -> [UInt8] { Array(text.utf8) }

/// A thread-safe list of strings (printed lines a test wants to inspect).
public final class NIOLockedValueBoxLines: Sendable {
    private let box = NIOConcurrencyHelpers.NIOLockedValueBox<[String]>([])
    public init() {}
    public func append(_ line: String) { box.withLockedValue { $0.append(line) } }
    public var all: [String] { box.withLockedValue { $0 } }
}
