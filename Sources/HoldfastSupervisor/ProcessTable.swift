import HoldfastPosix
import HoldfastProtocol

#if canImport(Glibc)
import Glibc
#endif

/// The supervisor's state, one value: every process it started (with the streams it handed to
/// the broker), the create ledger, the exits the host has not acknowledged, and the instance id
/// of this daemon. The supervisor keeps it under one lock, so a decision that reads several of
/// these (is the id free, reserve it; forget a process, remember its key) is one step.
///
/// `snapshot()` writes it down as a versioned, `Codable` value and `init(restoring:)` reads it
/// back: what a live upgrade hands to the next binary, and what a restarted broker is fed
/// from. Only what can outlive this process image is in it: creates still starting and the
/// tasks waiting for exits are not (an upgrade waits for the creates in progress first).
struct ProcessTable {
    /// A container process the supervisor started.
    struct Entry: Codable, Sendable, Equatable {
        /// A runc container's init: its runc id and bundle (signals go through `runc kill`;
        /// `runc delete` follows its exit; an exec reads the bundle).
        struct Container: Codable, Sendable, Equatable {
            var id: String
            var bundle: String
        }

        var id: String
        var pid: pid_t
        /// Created by the host over the bridge: its exit is kept until the host acknowledges it.
        var viaBridge: Bool
        var container: Container?
        /// The create's idempotency key: a repeat of that create answers with this process.
        var idempotencyKey: String?
        /// Started directly in a session of its own (pid == process group id): a stop can end
        /// the whole group, orphans holding its output included.
        var leadsProcessGroup: Bool
        /// Its cgroup (`ProcessCgroups`), for a direct process where the daemon has them: a stop
        /// kills everything in it, whatever left the process group. Absent from a state an
        /// earlier binary wrote (decoded as nil: the process group is used).
        var cgroup: String? = nil
        /// The streams handed to the broker with the process's stdio (secrets included: the
        /// snapshot is handed over in memory, never written to disk or logged).
        var streams: [StreamDescription]
        var phase: ProcessState = .running
        /// Known once the process exited; final once `phase` is `done` (output drained).
        var report: ExitReport?
        /// The idempotency keys of the last signals sent to it (`SignalLedger`): a repeat of
        /// one is not sent again. Absent from a state an earlier binary wrote.
        var signalKeys: [String]? = nil
        /// A runc container process's memory cgroup's OOM kill count as it started, read again at
        /// its exit (`ExitReport.oomKills`). Absent for a direct process, and from a state an
        /// earlier binary wrote.
        var oomCounter: OOMKillCounter? = nil

        var status: ProcessStatus {
            var status = ProcessStatus(id: id, pid: pid, state: phase, exitCode: report?.exitCode)
            if phase == .done, let report {
                status.undelivered = report.undelivered > 0 ? report.undelivered : nil
                status.lost = report.lost
                status.outputCutShort = report.outputCutShort
            }
            return status
        }
    }

    /// The written-down form. `version` changes whenever a field changes meaning; a reader
    /// refuses a version it does not know rather than guess.
    struct Snapshot: Codable, Sendable, Equatable {
        static let currentVersion = 1
        var version: Int
        var instanceID: String
        var processes: [Entry]
        var rememberedCreates: [CreateLedger.Remembered]
        var unacknowledgedExits: [ExitReport]
        /// Absent from a state an earlier binary wrote (none remembered).
        var rememberedSignals: [SignalLedger.Keyed]? = nil
    }

    /// New at every start (and kept across a live upgrade): tells the host a daemon restart
    /// from a lost connection.
    let instanceID: String
    private(set) var processes: [String: Entry] = [:]
    var creates = CreateLedger()
    /// Signals being sent now (not part of the snapshot: an upgrade waits for them first), and
    /// the keys of signals sent to processes forgotten since.
    var signals = SignalLedger()
    /// Exits of processes the host created, oldest first, kept until the host acknowledges them.
    private(set) var unacknowledgedExits: [ExitReport] = []
    /// Who waits for which process's exit report. Not part of the snapshot.
    private var waiters: [String: [CheckedContinuation<ExitReport?, Never>]] = [:]

    init(instanceID: String) {
        self.instanceID = instanceID
    }

    init(restoring snapshot: Snapshot) throws(HoldfastError) {
        guard snapshot.version == Snapshot.currentVersion else {
            throw HoldfastError(
                .incompatibleState,
                "the process table was written as version \(snapshot.version); this binary reads version \(Snapshot.currentVersion)")
        }
        instanceID = snapshot.instanceID
        for entry in snapshot.processes { processes[entry.id] = entry }
        creates = CreateLedger(restoring: snapshot.rememberedCreates)
        signals = SignalLedger(restoring: snapshot.rememberedSignals ?? [])
        unacknowledgedExits = snapshot.unacknowledgedExits
    }

    func snapshot() -> Snapshot {
        Snapshot(
            version: Snapshot.currentVersion, instanceID: instanceID, processes: processes.values.sorted { $0.id < $1.id },
            rememberedCreates: creates.rememberedInOrder, unacknowledgedExits: unacknowledgedExits,
            rememberedSignals: signals.rememberedInOrder)
    }

    // MARK: Reading

    subscript(id: String) -> Entry? { processes[id] }

    var entries: Dictionary<String, Entry>.Values { processes.values }

    /// Every process by id, with creates still in progress as `starting` (pid 0): a host that
    /// lost a create's reply sees that it arrived.
    var statuses: [ProcessStatus] {
        (processes.values.map(\.status) + creates.starting.keys.map { ProcessStatus(id: $0, pid: 0, state: .starting, exitCode: nil) })
            .sorted { $0.id < $1.id }
    }

    func ids(in phase: ProcessState) -> [String] { processes.values.filter { $0.phase == phase }.map(\.id) }

    /// The id of the process that runs (or ran) as `pid`, for a log line about that pid.
    func id(ofPID pid: pid_t) -> String? { processes.values.first { $0.pid == pid }?.id }

    // MARK: Changes

    /// Whether a signal to `id` is sent, waits for the same signal under way, or was sent.
    mutating func decideSignal(to id: String, key: String?) -> SignalLedger.Decision {
        signals.decide(process: id, key: key, sent: processes[id]?.signalKeys)
    }

    /// A keyed signal's sending is over; `sent`: it reached the process `pid` (a repeat is not
    /// sent). Kept with the process, or — forgotten meanwhile (a `runc kill` outlasted by the
    /// exit it caused and its acknowledgement), its id perhaps another process's by now — with
    /// the forgotten processes' keys.
    mutating func signalSettled(to id: String, pid: pid_t?, key: String?, sent: Bool) {
        guard let key else { return }
        signals.settled(process: id, key: key)
        guard sent else { return }
        guard var entry = processes[id], entry.pid == pid else {
            signals.forgotten(process: id, keys: [key])
            return
        }
        SignalLedger.keep(key, in: &entry.signalKeys)
        processes[id] = entry
    }

    /// A started process replaces its id's reservation in one step.
    mutating func started(_ entry: Entry) {
        processes[entry.id] = entry
        creates.release(id: entry.id)
    }

    /// The process exited; its output may still be draining.
    mutating func exited(_ id: String, _ report: ExitReport) {
        guard var entry = processes[id], entry.phase == .running else { return }
        entry.phase = .exited
        entry.report = report
        processes[id] = entry
    }

    /// Marks it done with its final report and queues the exit for the host if the host asked
    /// for the process. Returns the waiters to wake (outside the lock), nil if it was already
    /// done or is unknown.
    mutating func finish(_ id: String, _ report: ExitReport) -> [CheckedContinuation<ExitReport?, Never>]? {
        guard var entry = processes[id], entry.phase != .done else { return nil }
        entry.phase = .done
        entry.report = report
        processes[id] = entry
        if entry.viaBridge { unacknowledgedExits.append(report) }
        return waiters.removeValue(forKey: id) ?? []
    }

    /// What `wait(for:)` found.
    enum ExitWait {
        /// Done: its final report.
        case done(ExitReport)
        /// Registered: the continuation is resumed with the report once it is final.
        case waiting
        /// Not in the table (any more), or the id names a newer process than `pid`: nothing is
        /// registered, and nothing would ever resume it.
        case gone
    }

    /// Registers a waiter for the final report of `id` — the process `pid`, when given.
    ///
    /// A waiter registered for a process that is not in the table was never resumed: a
    /// `holdfast wait` that came just as the host's acknowledgement made the table forget the
    /// process (both take its exit) waited for ever.
    mutating func wait(for id: String, pid: pid_t? = nil, _ continuation: CheckedContinuation<ExitReport?, Never>) -> ExitWait {
        guard let entry = processes[id], pid == nil || entry.pid == pid else { return .gone }
        if entry.phase == .done, let report = entry.report { return .done(report) }
        waiters[id, default: []].append(continuation)
        return .waiting
    }

    /// Forgets a done process (its exit was taken by a waiter or acknowledged by the host) and
    /// remembers its create's key and its signals'. `pid` guards against forgetting a newer
    /// process of the id.
    mutating func forget(_ id: String, pid: pid_t) {
        guard let entry = processes[id], entry.pid == pid, entry.phase == .done else { return }
        processes.removeValue(forKey: id)
        creates.forgotten(id: id, key: entry.idempotencyKey, pid: entry.pid)
        signals.forgotten(process: id, keys: entry.signalKeys)
    }

    /// The host has the exit of `id`: forget the exit, and the process if the host created it.
    mutating func acknowledgeExit(_ id: String) {
        unacknowledgedExits.removeAll { $0.id == id }
        if let entry = processes[id], entry.viaBridge { forget(id, pid: entry.pid) }
    }
}
