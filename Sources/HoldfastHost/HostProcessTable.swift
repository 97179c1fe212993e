import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import NIOConcurrencyHelpers

/// host serve's processes and what became of them: the bridge's hellos and exits come in here
/// (in order), decide each process's outcome, and a process whose outcome and output are handed
/// over is forgotten — only its outcome kept, among the last `rememberedOutcomes`.
final class HostProcessTable: Sendable {
    static let rememberedOutcomes = 1024

    /// A finished process as `ps -a` and `logs` still show it.
    struct Finished: Sendable {
        var info: HostProcessInfo
        /// Its log, among the newest `logsKept` (nil once dropped, or if it printed nothing).
        var log: ProcessLog?
        /// The number of its directory in the state directory, if it has one (a number, not a
        /// path: a thousand outcomes kept should not cost a thousand path strings).
        var files: UInt64? = nil

        /// Puts `self` in `finished` for `id`; a directory of an earlier process of that id that
        /// is not this one's is to be removed.
        func replacing(_ id: String, in finished: inout [String: Finished], removing: inout [UInt64]) {
            if let earlier = finished.updateValue(self, forKey: id)?.files, earlier != files { removing.append(earlier) }
        }
    }

    private struct State: Sendable {
        var processes: [String: HostedProcess] = [:]
        var outcomes: [String: HostWaitResponse] = [:]
        var finished: [String: Finished] = [:]
        var outcomeOrder: [String] = []
        /// The finished processes whose log is kept, oldest first.
        var logOrder: [String] = []
        /// Exits of processes this table does not hold (a library user's own creates), newest
        /// last, bounded like `outcomes`.
        var otherExits: [ExitReport] = []
        /// The daemon the bridge's last hello came from.
        var guest: GuestIdentity?
        var listRound: UInt64 = 0
        var closed = false
        var trimScheduled = false
        /// File work decided under the lock, done after it: whole directories to remove (an
        /// outcome forgotten), and logs to drop (no longer among the `logsKept`).
        var filesToRemove: [UInt64] = []
        var logsToDrop: [UInt64] = []
        /// Says an exit was handled (`exitAcknowledgement: .byCaller`, with a state directory).
        var acknowledge: (@Sendable (String) -> Void)?

        /// Forgets the oldest outcomes (and their logs) past `kept`.
        mutating func forgetOldestOutcomes(keeping kept: Int) {
            guard outcomeOrder.count > kept else { return }
            let excess = outcomeOrder.count - kept
            for id in outcomeOrder.prefix(excess) where processes[id] == nil {
                outcomes.removeValue(forKey: id)
                let gone = finished.removeValue(forKey: id)
                if gone?.log != nil { logOrder.removeAll { $0 == id } }
                if let number = gone?.files { filesToRemove.append(number) }
            }
            outcomeOrder.removeFirst(excess)
        }

        /// Drops the logs of the oldest finished processes past `kept`.
        mutating func dropOldestLogs(keeping kept: Int) {
            guard logOrder.count > kept else { return }
            for id in logOrder.prefix(logOrder.count - kept) {
                finished[id]?.log = nil
                if let number = finished[id]?.files { logsToDrop.append(number) }
            }
            logOrder.removeFirst(logOrder.count - kept)
        }
    }

    private let state = NIOLockedValueBox(State())
    private let say: @Sendable (String) -> Void
    /// How many finished processes' logs are kept.
    let logsKept: Int
    /// Where outcomes and logs are kept across a restart (nil: in memory only).
    let stateDirectory: HostStateDirectory?

    init(logsKept: Int = 64, stateDirectory: HostStateDirectory? = nil, say: @escaping @Sendable (String) -> Void) {
        self.say = say
        self.logsKept = logsKept
        self.stateDirectory = stateDirectory
    }

    /// The daemon the bridge's last hello came from (nil before the first).
    var currentGuest: GuestIdentity? { state.withLockedValue { $0.guest } }

    /// How an exit is acknowledged to the guest once it is kept (with a state directory).
    func acknowledgeExits(with acknowledge: @escaping @Sendable (String) -> Void) {
        state.withLockedValue { $0.acknowledge = acknowledge }
    }

    /// Does the file work the last change decided (outside the lock).
    private func doFileWork() {
        guard let stateDirectory else { return }
        let (remove, drop) = state.withLockedValue { s -> ([UInt64], [UInt64]) in
            defer {
                s.filesToRemove.removeAll()
                s.logsToDrop.removeAll()
            }
            return (s.filesToRemove, s.logsToDrop)
        }
        for number in remove { stateDirectory.files(number).remove() }
        for number in drop { stateDirectory.files(number).removeLogs() }
    }

    /// Writes the process's outcome down as it stands now (with a state directory); false if
    /// that failed.
    private func keep(_ process: HostedProcess, quietly: Bool = false) -> Bool {
        guard let files = process.files else { return true }
        do throws(HoldfastError) {
            try files.writeOutcome { process.knownOutcome }
            return true
        } catch {
            if !quietly {
                say("warning: process \(process.id): its outcome cannot be kept in the state directory (\(error)); the guest is not told it arrived until it can be (tried again every 5 s)")
            }
            return false
        }
    }

    /// Acknowledges exit `id` once `kept` succeeds, trying every 5 s while it fails (the bridge
    /// delivers an exit once per connection: a failed keep is not given a second chance by
    /// the guest until it reconnects).
    /// `kept(retry)`: `retry` is false on the first try only.
    private func acknowledge(_ id: String, once kept: @escaping @Sendable (_ retry: Bool) -> Bool) {
        if kept(false) {
            acknowledge(id)
            return
        }
        Task { [self] in
            while !state.withLockedValue({ $0.closed }) {
                try? await Task.sleep(for: .seconds(5))
                if kept(true) {
                    acknowledge(id)
                    return
                }
            }
        }
    }

    private func acknowledge(_ id: String) {
        state.withLockedValue { $0.acknowledge }?(id)
    }

    // MARK: What the guest says

    /// The bridge's hellos and exits, in order (synchronously on its reader: no waiting here).
    func guestSaid(_ event: BridgeServer.Event) {
        switch event {
        case .hello(let hello):
            say("guest connected: boot \(hello.bootID.prefix(8)), \(hello.processes.count) processes, \(hello.exits.count) unacknowledged exits")
            let newer = GuestIdentity(hello)
            let lost = state.withLockedValue { s -> [(HostedProcess, LostProcess)] in
                s.guest = newer
                return s.processes.values.compactMap { process in
                    let guest = process.state.withLockedValue { $0.guest }
                    return guest?.loss(to: newer, process: process.id).map { (process, $0) }
                }
            }
            for (process, loss) in lost { end(process, HostWaitResponse(lost: loss)) }
        case .exit(let report):
            say(
                "process \(report.id) exited: code \(report.exitCode)\(report.undelivered > 0 ? ", \(report.undelivered) bytes undelivered" : "")"
                    + "\((report.lost ?? 0) > 0 ? ", \(report.lost ?? 0) bytes lost with the guest's broker" : "")"
                    + "\((report.inputRepeated ?? 0) > 0 ? ", up to \(report.inputRepeated ?? 0) stdin bytes may have reached it twice (a broker crash)" : "")"
                    + "\(report.wasLikelyOOMKilled ? ", killed by the OOM killer" : "")"
                    + "\((report.oomKills ?? 0) > 0 ? " (\(report.oomKills ?? 0) OOM kills in its container)" : "")")
            enum Holder {
                case process(HostedProcess)
                /// Already kept: delivered again after a restart of host serve between keeping
                /// it and its acknowledgement.
                case kept
                case nobody
                /// host serve is stopping: its processes are no longer held.
                case closing
            }
            let holder = state.withLockedValue { s -> Holder in
                if s.closed { return .closing }
                if let process = s.processes[report.id] { return .process(process) }
                // By id and code: a field the guest adds on a later delivery must not make it
                // another exit, whose keeping would replace this one's directory, log and all.
                if let kept = s.outcomes[report.id]?.exit, kept.id == report.id, kept.exitCode == report.exitCode { return .kept }
                s.otherExits.append(report)
                if s.otherExits.count > Self.rememberedOutcomes { s.otherExits.removeFirst(s.otherExits.count - Self.rememberedOutcomes) }
                return .nobody
            }
            switch holder {
            case .process(let process):
                end(process, HostWaitResponse(exit: report), keeping: false)
                acknowledge(report.id) { [self] retry in keep(process, quietly: retry) }
            case .kept:
                acknowledge(report.id)
            case .nobody:
                acknowledge(report.id) { [self] retry in remember(otherExit: report, quietly: retry) }
            case .closing:
                // Not acknowledged: the guest gives it to the next host serve.
                return
            }
        }
    }

    /// The exit of a process this host serve does not hold — one an earlier host serve started
    /// (it was restarted), or another client of the bridge — is kept as an outcome, for `wait`
    /// and `ps -a` to give. The guest forgets an exit once it is acknowledged, as this one is:
    /// kept only in the log line above, a restart lost every exit that came after it.
    /// Returns whether it was kept (written to the state directory, if there is one).
    private func remember(otherExit report: ExitReport, quietly: Bool = false) -> Bool {
        let info = HostProcessInfo(
            id: report.id, pid: nil, state: .exited, exitCode: report.exitCode, command: nil,
            oomKilled: report.wasLikelyOOMKilled ? true : nil)
        let outcome = HostWaitResponse(exit: report)
        var files: ProcessFiles?
        if let stateDirectory {
            do {
                let made = try stateDirectory.newProcess()
                files = made
                // The outcome before the record: a directory without a record is removed at
                // the next start, one with a record and no outcome would be taken for a create
                // never answered.
                try made.write(outcome)
                try made.write(HostProcessRecord(id: report.id, command: nil, tty: false, streams: []))
                made.markFinished()
            } catch {
                files?.remove()
                if !quietly {
                    say("warning: the exit of process \(report.id) cannot be kept in the state directory (\(error)); the guest is not told it arrived until it can be (tried again every 5 s)")
                }
                return false
            }
        }
        let superseded = state.withLockedValue { s -> Bool in
            guard s.processes[report.id] == nil else { return true }
            if s.outcomes.updateValue(outcome, forKey: report.id) == nil { s.outcomeOrder.append(report.id) }
            Finished(info: info, log: nil, files: files?.number).replacing(report.id, in: &s.finished, removing: &s.filesToRemove)
            s.forgetOldestOutcomes(keeping: Self.rememberedOutcomes)
            return false
        }
        if superseded { files?.remove() }
        doFileWork()
        return true
    }

    /// The process's outcome is known (the first one stands); written down unless the caller
    /// does (`keeping` false).
    func end(_ process: HostedProcess, _ outcome: HostWaitResponse, keeping: Bool = true) {
        guard process.end(with: outcome) else { return }
        if keeping { _ = keep(process) }
        if let lost = outcome.lost { say("process \(process.id) lost: \(lost.message)") }
        if let finished = process.finishIfEnding() { forget(process, finished) }
    }

    /// An output relay of `process` is done; the last one may finish the process.
    func outputFinished(_ process: HostedProcess) {
        if let outcome = process.outputFinished() { forget(process, outcome) }
    }

    /// The process's outcome and output are handed over: keep only the outcome (bounded).
    private func forget(_ process: HostedProcess, _ outcome: HostWaitResponse) {
        let info = process.info
        let log = process.log.byteCount > 0 ? process.log : nil
        let logsKept = logsKept
        // host serve is closing: its processes are not finished, only left (their streams closed
        // here), and the next host serve on the state directory takes them up as they were.
        guard !state.withLockedValue({ $0.closed }) else { return }
        if let files = process.files {
            // The outcome as handed over (with the streams host serve ended), then marked done.
            if keep(process) { files.markFinished() }
        }
        let idle = state.withLockedValue { s -> Bool in
            if s.processes[process.id] === process { s.processes.removeValue(forKey: process.id) }
            if s.outcomes.updateValue(outcome, forKey: process.id) == nil { s.outcomeOrder.append(process.id) }
            Finished(info: info, log: log, files: process.files?.number).replacing(process.id, in: &s.finished, removing: &s.filesToRemove)
            s.logOrder.removeAll { $0 == process.id }
            if log != nil { s.logOrder.append(process.id) }
            s.dropOldestLogs(keeping: logsKept)
            s.forgetOldestOutcomes(keeping: Self.rememberedOutcomes)
            guard s.processes.isEmpty, !s.trimScheduled else { return false }
            s.trimScheduled = true
            return true
        }
        doFileWork()
        if idle { Task { await trimWhenIdle() } }
    }

    /// A process a new host serve found in its state directory still running (or draining):
    /// held again, as the record left it.
    func restore(_ process: HostedProcess, pid: Int32?, guest: GuestIdentity?, outcome: HostWaitResponse?) {
        state.withLockedValue { $0.processes[process.id] = process }
        process.state.withLockedValue { p in
            p.guest = guest
            p.pid = pid
            // One whose create is unanswered is not in the guest's list until it is sent again:
            // no list may prove it gone before that (`created` sets the round).
            p.createdInRound = pid == nil ? .max : 0
            if pid != nil, case .starting = p.phase { p.phase = .running }
        }
        if let outcome { end(process, outcome, keeping: false) }
    }

    /// A finished process a new host serve found in its state directory: its outcome (and log)
    /// remembered as before the restart.
    func restoreFinished(_ info: HostProcessInfo, outcome: HostWaitResponse, log: ProcessLog?, files: ProcessFiles) {
        let logsKept = logsKept
        state.withLockedValue { s in
            if s.outcomes.updateValue(outcome, forKey: info.id) == nil { s.outcomeOrder.append(info.id) }
            Finished(info: info, log: log, files: files.number).replacing(info.id, in: &s.finished, removing: &s.filesToRemove)
            s.logOrder.removeAll { $0 == info.id }
            if log != nil { s.logOrder.append(info.id) }
            s.dropOldestLogs(keeping: logsKept)
            s.forgetOldestOutcomes(keeping: Self.rememberedOutcomes)
        }
        doFileWork()
    }

    /// Once nothing has run for a second: small allocations freed by many threads leave pages
    /// free in every thread's malloc arena, resident until trimmed (the broker does the same).
    private func trimWhenIdle() async {
        try? await Task.sleep(for: .seconds(1))
        let idle = state.withLockedValue { s -> Bool in
            s.trimScheduled = false
            return s.processes.isEmpty
        }
        if idle { Memory.returnFreePagesToTheSystem() }
    }

    // MARK: Processes coming and going

    func isTaken(_ id: String) -> Bool {
        state.withLockedValue { $0.processes[id] != nil }
    }

    /// Registers a process before its create goes out (its exit may come before the reply).
    /// False if the id is taken or the table closed.
    func register(_ process: HostedProcess) -> Bool {
        state.withLockedValue { s in
            guard !s.closed, s.processes[process.id] == nil else { return false }
            s.processes[process.id] = process
            return true
        }
    }

    /// The create failed: the process never ran.
    func unregister(_ process: HostedProcess) {
        state.withLockedValue { s in
            if s.processes[process.id] === process { s.processes.removeValue(forKey: process.id) }
        }
    }

    /// The create returned: `guest` runs the process. If another daemon said hello meanwhile,
    /// the process is already lost.
    func created(_ process: HostedProcess, pid: Int32, by guest: GuestIdentity) {
        let loss = state.withLockedValue { s -> LostProcess? in
            process.state.withLockedValue { p in
                p.guest = guest
                p.pid = pid
                p.createdInRound = s.listRound
                if case .starting = p.phase { p.phase = .running }
            }
            return s.guest.flatMap { guest.loss(to: $0, process: process.id) }
        }
        if let loss { end(process, HostWaitResponse(lost: loss)) }
    }

    /// The process held now, or the outcome of one forgotten; nil once the table is closed.
    func lookup(_ id: String) -> (process: HostedProcess?, outcome: HostWaitResponse?)? {
        state.withLockedValue { $0.closed ? nil : ($0.processes[id], $0.outcomes[id]) }
    }

    /// The log of a process held now, or of a finished one whose log is kept. The outer nil:
    /// no such process; the inner: it had one, but its log was dropped (or it printed nothing).
    func log(of id: String) -> ProcessLog?? {
        state.withLockedValue { s in
            if let process = s.processes[id] { return .some(process.log) }
            if let finished = s.finished[id] { return .some(finished.log) }
            return nil
        }
    }

    /// What `ps` shows of the processes held now and, with `finished`, of those remembered.
    func infos(finished: Bool) -> [HostProcessInfo] {
        let (live, done) = state.withLockedValue { s in
            (Array(s.processes.values), finished ? s.finished.filter { s.processes[$0.key] == nil }.map(\.value.info) : [])
        }
        return live.map(\.info) + done
    }

    /// Host serve is closing: every process held, to abandon.
    func close() -> [HostedProcess] {
        state.withLockedValue { s in
            s.closed = true
            defer { s.processes.removeAll() }
            return Array(s.processes.values)
        }
    }

    // MARK: The guest's process list

    /// Starts a list round: whether any process waits for an outcome, and the round's number.
    func beginListRound() -> (anyWaiting: Bool, round: UInt64) {
        state.withLockedValue { s in
            s.listRound &+= 1
            return (s.processes.values.contains { $0.isUnresolved }, s.listRound)
        }
    }

    /// A complete list from `answering`, asked in `round`: a process that daemon runs, created
    /// before the round began, not in the list and with no outcome, is lost. (An exit is
    /// recorded before it is acknowledged, and the guest forgets a process only on that
    /// acknowledgement: a process that exited is never taken for a lost one.)
    func listed(_ present: Set<String>, by answering: GuestIdentity, round: UInt64) {
        let vanished = state.withLockedValue { s in
            s.processes.values.filter { process in
                guard !present.contains(process.id), process.isUnresolved else { return false }
                return process.state.withLockedValue { $0.guest == answering && $0.createdInRound < round }
            }
        }
        for process in vanished {
            end(process, HostWaitResponse(lost: LostProcess(
                reason: .vanished, message: "process \(process.id) is no longer in the guest's process list and no exit came")))
        }
    }

    // MARK: Inspection

    /// Every exit delivered, each once (an exit of a process this table did not hold is in
    /// `otherExits`, and kept as an outcome too: counted once, from there).
    var exitsSeen: [ExitReport] {
        state.withLockedValue { s in
            let others = Set(s.otherExits.map(\.id))
            return s.outcomes.filter { !others.contains($0.key) }.values.compactMap(\.exit) + s.otherExits
        }
    }

    var counts: (processes: Int, outcomes: Int) {
        state.withLockedValue { ($0.processes.count, $0.outcomes.count) }
    }
}
