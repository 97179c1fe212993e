import CoreMetrics
import HoldfastPosix
import HoldfastProtocol
import NIOConcurrencyHelpers
import Prometheus

/// The supervisor's own metrics (the bridge, the roles, processes), in its own registry; the
/// metrics endpoint serves them followed by the broker's.
final class SupervisorMetrics: Sendable {
    let registry = PrometheusCollectorRegistry()
    let bridgeConnects: CoreMetrics.Counter
    let bridgeUp: CoreMetrics.Gauge
    let started: [RuntimeName: CoreMetrics.Counter]
    let startFailures: CoreMetrics.Counter
    let exits: CoreMetrics.Counter
    let restarts: [String: CoreMetrics.Counter]
    /// 1 when the role answers: the broker gave this scrape its part, the bridge worker is not
    /// stopped or traced; 0 otherwise (what `status` marks `notAnswering`).
    let answering: [String: CoreMetrics.Gauge]
    let openFiles: CoreMetrics.Gauge
    let openFileLimit: CoreMetrics.Gauge
    let restartsFed = NIOLockedValueBox<[String: Int]>([:])
    /// Live upgrades and upgrades that fell back since the daemon started: fed from the counts
    /// the session carries across upgrades, like the restarts.
    let upgrades: CoreMetrics.Counter
    let upgradesFellBack: CoreMetrics.Counter
    let traceesLetGo: CoreMetrics.Counter
    let traceeStopsHeld: CoreMetrics.Counter
    let straySignals: CoreMetrics.Counter
    let signalsRefused: CoreMetrics.Counter
    let signalsRepeated: CoreMetrics.Counter
    /// Scrapes that asked the broker for its metrics, and those answered by the question already
    /// in flight (`Supervisor.sharedScrapeQuestion`).
    let brokerQuestions: CoreMetrics.Counter
    let brokerQuestionsShared: CoreMetrics.Counter
    /// OOM kills the exits of runc container processes counted (`ExitReport.oomKills`).
    let oomKills: CoreMetrics.Counter
    /// Exits of processes the OOM killer killed (`ExitReport.wasLikelyOOMKilled`), any runtime.
    let oomKilledExits: CoreMetrics.Counter
    let upgradesFed = NIOLockedValueBox<(upgrades: Int, fellBack: Int)>((0, 0))

    init() {
        let factory = PrometheusMetricsFactory(registry: registry)
        bridgeConnects = CoreMetrics.Counter(label: "holdfast_bridge_connects_total", factory: factory)
        bridgeUp = CoreMetrics.Gauge(label: "holdfast_bridge_up", factory: factory)
        var started: [RuntimeName: CoreMetrics.Counter] = [:]
        for runtime in RuntimeName.allCases {
            started[runtime] = CoreMetrics.Counter(
                label: "holdfast_processes_started_total", dimensions: [("runtime", runtime.rawValue)], factory: factory)
        }
        self.started = started
        startFailures = CoreMetrics.Counter(label: "holdfast_process_start_failures_total", factory: factory)
        exits = CoreMetrics.Counter(label: "holdfast_process_exits_total", factory: factory)
        var restarts: [String: CoreMetrics.Counter] = [:]
        for role in ["broker", "bridge"] {
            restarts[role] = CoreMetrics.Counter(label: "holdfast_role_restarts_total", dimensions: [("role", role)], factory: factory)
        }
        self.restarts = restarts
        var answering: [String: CoreMetrics.Gauge] = [:]
        for role in ["broker", "bridge"] {
            answering[role] = CoreMetrics.Gauge(label: "holdfast_role_answering", dimensions: [("role", role)], factory: factory)
        }
        self.answering = answering
        openFiles = CoreMetrics.Gauge(label: "holdfast_supervisor_open_fds", factory: factory)
        openFileLimit = CoreMetrics.Gauge(label: "holdfast_supervisor_fd_limit", factory: factory)
        upgrades = CoreMetrics.Counter(label: "holdfast_live_upgrades_total", factory: factory)
        upgradesFellBack = CoreMetrics.Counter(label: "holdfast_live_upgrade_fallbacks_total", factory: factory)
        traceesLetGo = CoreMetrics.Counter(label: "holdfast_tracee_stops_let_go_total", factory: factory)
        traceeStopsHeld = CoreMetrics.Counter(label: "holdfast_tracee_stops_held_total", factory: factory)
        straySignals = CoreMetrics.Counter(label: "holdfast_stray_signals_ignored_total", factory: factory)
        signalsRefused = CoreMetrics.Counter(label: "holdfast_signals_refused_total", factory: factory)
        signalsRepeated = CoreMetrics.Counter(label: "holdfast_signals_repeated_total", factory: factory)
        brokerQuestions = CoreMetrics.Counter(label: "holdfast_questions_to_broker_total", factory: factory)
        brokerQuestionsShared = CoreMetrics.Counter(label: "holdfast_questions_to_broker_shared_total", factory: factory)
        oomKills = CoreMetrics.Counter(label: "holdfast_container_oom_kills_total", factory: factory)
        oomKilledExits = CoreMetrics.Counter(label: "holdfast_processes_oom_killed_total", factory: factory)
        bridgeUp.record(0)
    }

    func bridge(up: Bool) {
        if up { bridgeConnects.increment() }
        bridgeUp.record(up ? 1 : 0)
    }

    func processStarted(_ runtime: RuntimeName) { started[runtime]?.increment() }
    func processStartFailed() { startFailures.increment() }
    func processExited() { exits.increment() }
    func traceeStopsLetGo(_ count: UInt64) { traceesLetGo.increment(by: Int64(clamping: count)) }
    func traceeStopsHeld(_ count: UInt64) { traceeStopsHeld.increment(by: Int64(clamping: count)) }
    func straySignalIgnored() { straySignals.increment() }
    func signalRefused() { signalsRefused.increment() }
    func signalRepeated() { signalsRepeated.increment() }
    func brokerQuestion(shared: Bool) { (shared ? brokerQuestionsShared : brokerQuestions).increment() }
    func oomKilled(_ count: UInt64) { oomKills.increment(by: Int64(clamping: count)) }
    func processOOMKilled() { oomKilledExits.increment() }

    /// The supervisor's metrics now; role restarts are read from the role table, its fds from
    /// /proc (it keeps several per process: creates are refused before they run out).
    func render(roles: [RoleStatus], answering answered: [String: Bool], upgrades upgradeCount: Int, fellBack fellBackCount: Int) -> String {
        for (role, gauge) in answering { gauge.record(answered[role] == true ? 1 : 0) }
        let (upgraded, fellBack) = upgradesFed.withLockedValue { fed -> (Int, Int) in
            defer { fed = (max(fed.upgrades, upgradeCount), max(fed.fellBack, fellBackCount)) }
            return (max(0, upgradeCount - fed.upgrades), max(0, fellBackCount - fed.fellBack))
        }
        if upgraded > 0 { upgrades.increment(by: Int64(upgraded)) }
        if fellBack > 0 { upgradesFellBack.increment(by: Int64(fellBack)) }
        openFiles.record(Int64(ProcessFigures.openDescriptors()))
        openFileLimit.record(Int64(clamping: ResourceLimits.openFileLimit.soft))
        for role in roles {
            let advance = restartsFed.withLockedValue { fed -> Int in
                defer { fed[role.name] = max(fed[role.name] ?? 0, role.restarts) }
                return max(0, role.restarts - (fed[role.name] ?? 0))
            }
            if advance > 0 { restarts[role.name]?.increment(by: Int64(advance)) }
        }
        return registry.emitToString()
    }
}
