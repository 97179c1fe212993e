import CoreMetrics
import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import NIOConcurrencyHelpers
import Prometheus

/// The broker's metrics in its own Prometheus registry, through swift-metrics.
///
/// Each broker owns its registry and passes its factory explicitly: no process-wide
/// `MetricsSystem.bootstrap`, so tests can run many brokers in one process. The supervisor asks
/// for the text (`metrics` request) and serves it with its own on the metrics endpoint; the
/// broker itself opens no listening socket (its seccomp profile stays as it is).
///
/// Stream events (dials, reconnect latency) are counted as they happen, from the streams'
/// observers; byte and state figures are read at scrape time from the same totals `stats` uses,
/// and counters are advanced by the difference since the last scrape.
public final class BrokerMetrics: Sendable {
    let registry = PrometheusCollectorRegistry()
    private let bytesToHost: CoreMetrics.Counter
    private let bytesFromHost: CoreMetrics.Counter
    private let reconnects: CoreMetrics.Counter
    private let undelivered: CoreMetrics.Counter
    private let lost: CoreMetrics.Counter
    private let dialAttempts: CoreMetrics.Counter
    private let dialFailures: CoreMetrics.Counter
    private let redialsGivenUp: CoreMetrics.Counter
    private let reconnectLatency: CoreMetrics.Timer
    private let streams: [StreamState: CoreMetrics.Gauge]
    private let processes: CoreMetrics.Gauge
    private let openDescriptors: CoreMetrics.Gauge
    private let residentBytes: CoreMetrics.Gauge
    private let mallocInUseBytes: CoreMetrics.Gauge
    private let reactorStalls: CoreMetrics.Counter
    private let strandedReactorThreads: CoreMetrics.Gauge
    private let handoffConnections: CoreMetrics.Gauge
    private let handoffTurnedAway: CoreMetrics.Counter
    private let keptReleases: CoreMetrics.Gauge
    private let ioShortages: CoreMetrics.Counter
    private let fed = NIOLockedValueBox(Fed())

    private struct Fed {
        var bytesToHost: UInt64 = 0
        var bytesFromHost: UInt64 = 0
        var reconnects: UInt64 = 0
        var undelivered: UInt64 = 0
        var lost: UInt64 = 0
        var reactorStalls = 0
        var handoffTurnedAway: UInt64 = 0
        var ioShortages: UInt64 = 0
    }

    /// From 1 ms (a reconnect on a live host) to a minute (a long blackout).
    static let latencyBuckets: [Duration] = [
        .milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50),
        .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1), .seconds(2), .seconds(5), .seconds(10),
        .seconds(30), .seconds(60),
    ]

    public init() {
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.durationHistogramBuckets["holdfast_stream_reconnect_seconds"] = Self.latencyBuckets
        bytesToHost = CoreMetrics.Counter(label: "holdfast_stream_bytes_total", dimensions: [("direction", "to_host")], factory: factory)
        bytesFromHost = CoreMetrics.Counter(label: "holdfast_stream_bytes_total", dimensions: [("direction", "from_host")], factory: factory)
        reconnects = CoreMetrics.Counter(label: "holdfast_stream_reconnects_total", factory: factory)
        undelivered = CoreMetrics.Counter(label: "holdfast_stream_undelivered_bytes_total", factory: factory)
        // Bytes a crashed broker took, found (and reported to the host as gaps) by its successor.
        lost = CoreMetrics.Counter(label: "holdfast_stream_lost_bytes_total", factory: factory)
        dialAttempts = CoreMetrics.Counter(label: "holdfast_stream_dial_attempts_total", factory: factory)
        dialFailures = CoreMetrics.Counter(label: "holdfast_stream_dial_failures_total", factory: factory)
        redialsGivenUp = CoreMetrics.Counter(label: "holdfast_stream_redials_given_up_total", factory: factory)
        reconnectLatency = CoreMetrics.Timer(label: "holdfast_stream_reconnect_seconds", factory: factory)
        var streams: [StreamState: CoreMetrics.Gauge] = [:]
        for state in StreamState.allCases {
            streams[state] = CoreMetrics.Gauge(label: "holdfast_streams", dimensions: [("state", state.rawValue)], factory: factory)
        }
        self.streams = streams
        processes = CoreMetrics.Gauge(label: "holdfast_broker_processes", factory: factory)
        openDescriptors = CoreMetrics.Gauge(label: "holdfast_broker_open_fds", factory: factory)
        residentBytes = CoreMetrics.Gauge(label: "holdfast_broker_resident_bytes", factory: factory)
        mallocInUseBytes = CoreMetrics.Gauge(label: "holdfast_broker_malloc_in_use_bytes", factory: factory)
        // The I/O thread found stuck in one syscall, taken over by a new thread (README, "Trust").
        reactorStalls = CoreMetrics.Counter(label: "holdfast_broker_reactor_stalls_total", factory: factory)
        strandedReactorThreads = CoreMetrics.Gauge(label: "holdfast_broker_reactor_stranded_threads", factory: factory)
        // The handoff socket's admitted connections, and those refused or closed at once
        // (README, "Handing stdio to Holdfast from another runtime").
        handoffConnections = CoreMetrics.Gauge(label: "holdfast_broker_handoff_connections", factory: factory)
        handoffTurnedAway = CoreMetrics.Counter(label: "holdfast_broker_handoff_connections_refused_total", factory: factory)
        // Releases kept for their peers (docs/PROTOCOL.md, "release").
        keptReleases = CoreMetrics.Gauge(label: "holdfast_broker_kept_releases", factory: factory)
        ioShortages = CoreMetrics.Counter(label: "holdfast_broker_io_shortages_total", factory: factory)
    }

    /// An observer for one stream's slot: dial attempts and failures, redial cycles given up,
    /// and the time from losing a connection to the next one.
    func slotObserver() -> @Sendable (SlotEvent) -> Void {
        let lostAt = NIOLockedValueBox<UInt64?>(nil)
        return { [self] event in
            switch event {
            case .dialing:
                dialAttempts.increment()
            case .dialFailed:
                dialFailures.increment()
            case .gaveUp:
                redialsGivenUp.increment()
            case .disconnected:
                lostAt.withLockedValue { if $0 == nil { $0 = monotonicNanoseconds() } }
            case .connected:
                if let since = lostAt.withLockedValue({ at -> UInt64? in defer { at = nil }; return at }) {
                    reconnectLatency.recordNanoseconds(Int64(clamping: monotonicNanoseconds() &- since))
                }
            case .closed, .abandoned:
                break
            }
        }
    }

    /// The Prometheus text of every broker metric, figures read now.
    func render(stats: BrokerStats, states: [StreamState]) -> String {
        let lostBytes = stats.lostBytes ?? 0
        let advance = fed.withLockedValue { last -> (UInt64, UInt64, UInt64, UInt64, UInt64) in
            // Field by field: a new `Fed` here zeroed the counters fed below (reactor stalls,
            // handoff connections turned away, I/O shortages), which then added their whole
            // total again at every scrape.
            defer {
                last.bytesToHost = max(last.bytesToHost, stats.bytesToHost)
                last.bytesFromHost = max(last.bytesFromHost, stats.bytesFromHost)
                last.reconnects = max(last.reconnects, stats.reconnects)
                last.undelivered = max(last.undelivered, stats.undelivered)
                last.lost = max(last.lost, lostBytes)
            }
            return (
                stats.bytesToHost &- min(stats.bytesToHost, last.bytesToHost),
                stats.bytesFromHost &- min(stats.bytesFromHost, last.bytesFromHost),
                stats.reconnects &- min(stats.reconnects, last.reconnects),
                stats.undelivered &- min(stats.undelivered, last.undelivered),
                lostBytes &- min(lostBytes, last.lost)
            )
        }
        bytesToHost.increment(by: Int64(clamping: advance.0))
        bytesFromHost.increment(by: Int64(clamping: advance.1))
        reconnects.increment(by: Int64(clamping: advance.2))
        undelivered.increment(by: Int64(clamping: advance.3))
        lost.increment(by: Int64(clamping: advance.4))
        for state in StreamState.allCases {
            streams[state]?.record(Double(states.filter { $0 == state }.count))
        }
        processes.record(Double(stats.processes))
        openDescriptors.record(Double(stats.openDescriptors))
        residentBytes.record(Double(stats.residentKiB * 1024))
        if let inUse = stats.mallocInUseKiB { mallocInUseBytes.record(Double(inUse * 1024)) }
        let stalls = stats.reactorStalls ?? 0
        let newStalls = fed.withLockedValue { last -> Int in
            defer { last.reactorStalls = max(last.reactorStalls, stalls) }
            return max(0, stalls - last.reactorStalls)
        }
        reactorStalls.increment(by: Int64(newStalls))
        strandedReactorThreads.record(Double(stats.strandedReactorThreads ?? 0))
        handoffConnections.record(Double(stats.handoffConnections ?? 0))
        let turnedAway = stats.handoffTurnedAway ?? 0
        let newlyTurnedAway = fed.withLockedValue { last -> UInt64 in
            defer { last.handoffTurnedAway = max(last.handoffTurnedAway, turnedAway) }
            return turnedAway &- min(turnedAway, last.handoffTurnedAway)
        }
        handoffTurnedAway.increment(by: Int64(clamping: newlyTurnedAway))
        keptReleases.record(Double(stats.keptReleases ?? 0))
        let shortages = stats.ioShortages ?? 0
        let newShortages = fed.withLockedValue { last -> UInt64 in
            defer { last.ioShortages = max(last.ioShortages, shortages) }
            return shortages &- min(shortages, last.ioShortages)
        }
        ioShortages.increment(by: Int64(clamping: newShortages))
        return registry.emitToString()
    }
}
