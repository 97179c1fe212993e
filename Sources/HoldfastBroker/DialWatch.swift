import HoldfastCore
import Logging
import NIOConcurrencyHelpers

/// Watches one stream's dials, so a stream that cannot connect says why and does not wait for
/// the next bridge-up to try again:
/// - a failed dial is logged with its reason once per cause (`DialFailureReport`: a cycle of 60
///   refusals is one warning, a new cause another), and `holdfast status` shows the last one
///   while it is parked;
/// - when a redial cycle gives up while the bridge is up (the host is there, this stream's
///   listener is not, or refuses the broker's user), another cycle starts after a back-off that
///   doubles from `firstRetry` up to `maxRetry` — the bridge going down stops that, the bridge
///   coming back redials every stream anyway.
final class DialWatch: Sendable {
    static let firstRetry: Duration = .seconds(1)
    static let maxRetry: Duration = .seconds(30)

    private struct State: Sendable {
        var slot: (any ManagedSlot)?
        var failures = DialFailureReport()
        var retries = 0
        var retry: Task<Void, Never>?
        var closed = false
    }

    private let process: String
    private let stream: String
    private let address: String
    private let broker: Broker
    private let state = NIOLockedValueBox(State())

    init(process: String, stream: String, address: String, broker: Broker) {
        self.process = process
        self.stream = stream
        self.address = address
        self.broker = broker
    }

    /// The slot to redial. The reference goes when the slot closes (it holds this watch in its
    /// observer: the cycle is broken there).
    func watch(_ slot: any ManagedSlot) {
        state.withLockedValue { if !$0.closed { $0.slot = slot } }
    }

    /// The delay before the `retry`-th extra cycle (0-based).
    static func backOff(_ retry: Int) -> Duration {
        var delay = firstRetry
        for _ in 0..<min(retry, 16) where delay < maxRetry { delay = min(delay * 2, maxRetry) }
        return delay
    }

    func event(_ event: SlotEvent) {
        switch event {
        case .dialFailed(_, let reason):
            if state.withLockedValue({ $0.failures.failed(reason) }) {
                broker.logger.warning("stream dial failed: parked until a dial succeeds", metadata: metadata(["error": "\(reason)"]))
            }
        case .connected:
            let failures = state.withLockedValue { s -> Int? in
                s.retries = 0
                s.retry?.cancel()
                s.retry = nil
                return s.failures.connected()
            }
            if let failures {
                broker.logger.info("stream connected after failed dials", metadata: metadata(["failedDials": "\(failures)"]))
            }
        case .gaveUp:
            guard broker.isBridgeUp else { return }
            let delay = state.withLockedValue { s -> Duration? in
                guard !s.closed, s.slot != nil else { return nil }
                defer { s.retries += 1 }
                return Self.backOff(s.retries)
            }
            guard let delay else { return }
            let task = Task { [self] in
                try? await Task.sleep(for: delay)
                guard !Task.isCancelled, broker.isBridgeUp else { return }
                let slot = state.withLockedValue { $0.closed ? nil : $0.slot }
                slot?.redialNow()
            }
            state.withLockedValue { s in
                s.retry?.cancel()
                s.retry = task
            }
        case .closed, .abandoned:
            state.withLockedValue { s in
                s.closed = true
                s.slot = nil
                s.retry?.cancel()
                s.retry = nil
            }
        case .dialing, .disconnected:
            break
        }
    }

    private func metadata(_ extra: Logger.Metadata) -> Logger.Metadata {
        var all: Logger.Metadata = ["process": "\(process)", "stream": "\(stream)", "address": "\(address)"]
        all.merge(extra) { $1 }
        return all
    }
}
