import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// The host side, in process: the bridge's host end and one resumable stream listener, with
/// the bookkeeping the soak's verdict is made of.
final class Host: Sendable {
    let bridge: BridgeServer
    let streams: StreamServer<AsyncFD>
    let exits: ExitBoard
    let reconnects = ReconnectTracker()
    let hellos: HelloLog
    let ledger = Ledger()
    /// Where a broker kill waits for a handed-over process's adopt or release (`HandoffAim`).
    let handoffAim = HandoffAim()
    private let liveCount = NIOLockedValueBox(0)

    init(directory: String) throws {
        // The VM's bridge key, written before the daemon starts (its config names the file).
        let key = try BridgeKeyFile.loadOrCreate(directory + "/bridge.key").key
        let bridge = try BridgeServer(listeningOn: .unix(path: directory + "/host-bridge.sock"), authentication: .key(key), unixMode: 0o666)
        let streams = try StreamServer(listeningOn: .unix(path: directory + "/streams.sock"), unixMode: 0o666)
        self.bridge = bridge
        self.streams = streams
        exits = ExitBoard(bridge)
        hellos = HelloLog(bridge)
        bridge.start()
        streams.start()
    }

    var streamAddress: String { streams.address.description }

    /// Opens a host stream whose connects and disconnects are tracked.
    /// Tokens are unique per process id, and ids are never reused in a soak.
    func open(_ token: String, _ direction: StreamDirection) throws -> ResumableStream<AsyncFD> {
        let reconnects = reconnects
        return try streams.open(token: Array(token.utf8), direction: direction, observer: { event in reconnects.event(token, event) })
    }

    func close(_ token: String) { streams.close(token: Array(token.utf8)) }

    /// Rings a moment before each blackout (`Chaos`): signallers aimed at it send then.
    let blackoutComing = ChangeSignal()

    /// Waits for the next blackout to be about to start (at most `within`).
    func nextBlackout(within: Duration) async {
        let generation = blackoutComing.generation
        await blackoutComing.wait(since: generation, timeout: within)
    }

    /// A migration as the guest sees it: the bridge and every stream connection drop at once,
    /// and nothing is accepted until `lightsOn`.
    func blackout() {
        reconnects.blackoutStarts()
        streams.setRefusing(true)
        bridge.drop(refusing: true)
        streams.dropAllConnections()
    }

    @discardableResult
    func lightsOn() -> ContinuousClock.Instant {
        let now = ContinuousClock.now
        reconnects.lightsOn(at: now)
        streams.setRefusing(false)
        bridge.drop(refusing: false)
        return now
    }

    var live: Int { liveCount.withLockedValue { $0 } }
    func started() { liveCount.withLockedValue { $0 += 1 } }
    func ended() { liveCount.withLockedValue { $0 -= 1 } }

    func close() {
        exits.cancel()
        hellos.cancel()
        bridge.close()
        streams.close()
    }
}

/// Every exit the host application sees (`BridgeServer.exits`), counted per id, and waits for
/// one.
final class ExitBoard: Sendable {
    private let state = NIOLockedValueBox(State())
    private let task = NIOLockedValueBox<Task<Void, Never>?>(nil)

    private struct State {
        var reports: [String: ExitReport] = [:]
        var deliveries: [String: Int] = [:]
        var waiters: [String: CheckedContinuation<ExitReport?, Never>] = [:]
    }

    init(_ bridge: BridgeServer) {
        let task = Task { [state] in
            for await report in bridge.exits {
                let waiter = state.withLockedValue { s -> CheckedContinuation<ExitReport?, Never>? in
                    s.deliveries[report.id, default: 0] += 1
                    guard s.reports[report.id] == nil else { return nil }
                    s.reports[report.id] = report
                    return s.waiters.removeValue(forKey: report.id)
                }
                waiter?.resume(returning: report)
            }
        }
        self.task.withLockedValue { $0 = task }
    }

    func has(_ id: String) -> Bool { state.withLockedValue { $0.reports[id] != nil } }

    /// How many times each id was delivered.
    var deliveries: [String: Int] { state.withLockedValue { $0.deliveries } }

    /// The exit of `id`, or nil if none came within `timeout`.
    func wait(_ id: String, timeout: Duration) async -> ExitReport? {
        let timer = Task { [state] in
            try await Task.sleep(for: timeout)
            state.withLockedValue { $0.waiters.removeValue(forKey: id) }?.resume(returning: nil)
        }
        defer { timer.cancel() }
        return await withCheckedContinuation { continuation in
            let ready = state.withLockedValue { s -> ExitReport?? in
                if let report = s.reports[id] { return .some(report) }
                s.waiters[id] = continuation
                return .none
            }
            if let ready { continuation.resume(returning: ready) }
        }
    }

    func cancel() { task.withLockedValue { $0 }?.cancel() }
}

/// When each bridge hello arrived (a new bridge connection: after a migration or a restart of
/// the bridge worker).
final class HelloLog: Sendable {
    private let instants = NIOLockedValueBox<[ContinuousClock.Instant]>([])
    private let task = NIOLockedValueBox<Task<Void, Never>?>(nil)

    init(_ bridge: BridgeServer) {
        let task = Task { [instants] in
            for await _ in bridge.hellos {
                let now = ContinuousClock.now
                instants.withLockedValue { $0.append(now) }
            }
        }
        self.task.withLockedValue { $0 = task }
    }

    var all: [ContinuousClock.Instant] { instants.withLockedValue { $0 } }

    /// The first hello at or after `instant`, within `limit`.
    func first(after instant: ContinuousClock.Instant, within limit: Duration) -> Duration? {
        let all = self.all
        var low = 0
        var high = all.count
        while low < high {
            let middle = (low + high) / 2
            if all[middle] < instant { low = middle + 1 } else { high = middle }
        }
        guard low < all.count, all[low] - instant <= limit else { return nil }
        return all[low] - instant
    }

    func cancel() { task.withLockedValue { $0 }?.cancel() }
}

/// Host streams' connections: reconnects, and how long after the end of a blackout each stream
/// that the blackout cut was connected again.
final class ReconnectTracker: Sendable {
    private let state = NIOLockedValueBox(State())

    private struct State {
        var connectedNow: Set<String> = []
        var everConnected: Set<String> = []
        var awaiting: Set<String> = []
        var lightsOnAt: ContinuousClock.Instant?
        var connects = 0
        var reconnects = 0
        var latencies: [Duration] = []
        var notBackBeforeNextBlackout = 0
    }

    func event(_ token: String, _ event: SlotEvent) {
        let now = ContinuousClock.now
        state.withLockedValue { s in
            switch event {
            case .connected:
                s.connects += 1
                if !s.everConnected.insert(token).inserted { s.reconnects += 1 }
                s.connectedNow.insert(token)
                // A handshake that was under way when the blackout began may land during it:
                // no latency to speak of.
                if s.awaiting.remove(token) != nil, let since = s.lightsOnAt { s.latencies.append(now - since) }
            case .disconnected:
                s.connectedNow.remove(token)
            case .closed, .abandoned:
                s.connectedNow.remove(token)
                s.everConnected.remove(token)
                s.awaiting.remove(token)
            case .dialing, .dialFailed, .gaveUp:
                break
            }
        }
    }

    /// Every stream connected now is about to be cut.
    func blackoutStarts() {
        state.withLockedValue { s in
            s.notBackBeforeNextBlackout += s.awaiting.count
            s.awaiting = s.connectedNow
            s.lightsOnAt = nil
        }
    }

    func lightsOn(at instant: ContinuousClock.Instant) {
        state.withLockedValue { $0.lightsOnAt = instant }
    }

    var figures: (connects: Int, reconnects: Int, latencies: [Duration], notBack: Int) {
        state.withLockedValue { ($0.connects, $0.reconnects, $0.latencies, $0.notBackBeforeNextBlackout) }
    }
}

/// The soak's counters and failures.
final class Ledger: Sendable {
    struct Counters: Sendable {
        var started: [Kind: Int] = [:]
        var finished = 0
        var signalsSent = 0
        /// Of those, sent the moment before a blackout (`Plan.signalAtABlackout`).
        var signalsAtABlackout = 0
        /// `out-of-memory` exits reported `oomKilled`, and SIGKILL exits of others reported
        /// `oomKilled: false` (the kernel's log read, no OOM kill of theirs).
        var oomKillsReported = 0
        var sigkillsToldApart = 0
        var bytesToHost: UInt64 = 0
        var bytesToGuest: UInt64 = 0
        var streamsChecked = 0
        var streamsPassed = 0
        var exitsChecked = 0
        var migrations = 0
        var blackoutTotal: Duration = .zero
        /// How much longer than planned each blackout was (blackout to lights on): more than a
        /// moment when the soak's own process was starved (its sleep overran).
        var blackoutOverruns: [Duration] = []
        var migrationEnds: [ContinuousClock.Instant] = []
        var kills: [ContinuousClock.Instant] = []
        var brokerStops = 0
        var supervisorStops = 0
        var brokerKills: [ContinuousClock.Instant] = []
        /// Broker kills that waited for an adopt or a release to go out and landed a moment
        /// after it.
        var brokerKillsAtAnAdopt = 0
        var brokerKillsAtARelease = 0
        /// Each live upgrade's time, request to the new image serving with both roles.
        var upgrades: [Duration] = []
        /// Each upgrade onto a binary that could not take over and fell back, request to the
        /// failure's answer (the previous image serving again).
        var fallbacks: [Duration] = []
        /// Bytes the streams reported lost to broker kills (GAP frames), and their exits' count.
        var lostBytes: UInt64 = 0
        var processesWithLoss = 0
        /// `handed-over` adopts whose broker went away before answering, settled by the next one's `list`.
        var adoptsSettled = 0
        /// `handed-over` processes taken back midway (`release`), and releases asked again of
        /// the next broker because theirs went away before answering.
        var released = 0
        var releasesAskedAgain = 0
        var failureCount = 0
        var failures: [String] = []
    }

    private let counters = NIOLockedValueBox(Counters())

    func update(_ body: (inout Counters) -> Void) { counters.withLockedValue { body(&$0) } }
    var snapshot: Counters { counters.withLockedValue { $0 } }

    func fail(_ message: String) {
        counters.withLockedValue { c in
            c.failureCount += 1
            if c.failures.count < 200 { c.failures.append(message) }
        }
        printLine("FAIL: \(message)")
    }
}

/// One line to stdout, at once (many tasks print).
func printLine(_ line: String) {
    let text = line + "\n"
    _ = text.withCString { write(1, $0, strlen($0)) }
}

/// Waits for a task that cannot be cancelled, at most `timeout`; false if it is still running.
func finished(_ task: Task<Void, Never>, within timeout: Duration) async -> Bool {
    let outcome = NIOLockedValueBox<CheckedContinuation<Bool, Never>?>(nil)
    let timer = NIOLockedValueBox<Task<Void, Never>?>(nil)
    let result = await withCheckedContinuation { (continuation: CheckedContinuation<Bool, Never>) in
        outcome.withLockedValue { $0 = continuation }
        timer.withLockedValue {
            $0 = Task {
                try? await Task.sleep(for: timeout)
                outcome.withLockedValue { c in
                    defer { c = nil }
                    return c
                }?.resume(returning: false)
            }
        }
        Task {
            await task.value
            outcome.withLockedValue { c in
                defer { c = nil }
                return c
            }?.resume(returning: true)
        }
    }
    timer.withLockedValue { $0 }?.cancel()
    return result
}
