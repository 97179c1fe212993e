import HoldfastCore
import HoldfastLogging
import HoldfastPosix
import HoldfastProtocol
import HoldfastTools

#if canImport(Glibc)
import Glibc
#endif

struct ChaosSettings: Sendable {
    /// A migration starts this often.
    var period: Duration
    /// Each blackout lasts a random number of milliseconds in this range.
    var blackoutMilliseconds: ClosedRange<Int>
    /// The bridge worker is killed with SIGKILL every this many seconds (random in the range);
    /// nil: never.
    var killEverySeconds: ClosedRange<Int>?
    /// The broker is stopped (SIGSTOP) for a random 50–500 ms, then continued, every this many
    /// seconds (random in the range); nil: never.
    var brokerStopEverySeconds: ClosedRange<Int>?
    /// The supervisor is stopped (SIGSTOP) for a random 50–1500 ms, then continued, every this
    /// many seconds (random in the range); nil: never. What an operator's debugger, a cgroup
    /// freeze or a starved vCPU does to it: creates, exits, a broker's notifications and its
    /// restart all wait, and nothing may be lost or repeated for it.
    var supervisorStopEverySeconds: ClosedRange<Int>?
    /// The broker is killed with SIGKILL every this many seconds (random in the range); nil:
    /// never. Every stream must resume, every loss be reported exactly.
    var brokerKillEverySeconds: ClosedRange<Int>?
    /// A live upgrade (`holdfast upgrade`: the daemon re-executes its binary, keeping its pid,
    /// its processes and their streams; new roles) every this many seconds (random in the
    /// range); nil: never. Nothing may be lost or repeated, each exit reported once.
    var upgradeEverySeconds: ClosedRange<Int>?
    /// Every this many upgrades, one whose new image cannot take over and must fall back (0:
    /// never).
    var fallbackEvery: Int = 0
}

/// Role kills and live upgrades one at a time: an upgrade stops the roles and starts new ones,
/// and a kill of a role the upgrade is stopping would count as neither a crash nor a restart
/// (the soak checks each kill's restart). Migrations and broker stops overlap everything.
actor FaultGate {
    private var busy = false
    private var queue: [CheckedContinuation<Void, Never>] = []

    func exclusive(_ body: @Sendable () async -> Void) async {
        if busy {
            await withCheckedContinuation { queue.append($0) }
        }
        busy = true
        await body()
        if queue.isEmpty { busy = false } else { queue.removeFirst().resume() }
    }
}

/// Migrations on a fixed period with random blackouts, and SIGKILLs of the bridge worker at
/// random times between them.
enum Chaos {
    static func run(
        until end: ContinuousClock.Instant, host: Host, daemon: Daemon, settings: ChaosSettings, seed: UInt64
    ) async {
        var rng = SeededGenerator(seed: seed)
        let gate = FaultGate()
        // The first kill comes early in the phase, so the warm-up has one too: a process's
        // first sleep on a clock makes the runtime open a timerfd for that clock, and the
        // supervisor's restart back-off sleeps on one it may not have used yet. The baseline
        // must be taken after every such path ran once, or the first one in the soak would look
        // like a leaked fd.
        let phase = milliseconds(end - ContinuousClock.now) / 1000
        var nextKill = settings.killEverySeconds.map {
            ContinuousClock.now + .milliseconds(Int.random(in: 1000...max(1000, min($0.lowerBound, phase / 4) * 1000), using: &rng))
        }
        let stops = settings.brokerStopEverySeconds.map { range in
            Task { [rng] in
                var rng = rng
                _ = rng.next()
                while true {
                    try await Task.sleep(for: .seconds(Int.random(in: range, using: &rng)))
                    guard ContinuousClock.now + .seconds(2) < end else { return }
                    await stopBroker(for: .milliseconds(Int.random(in: 50...500, using: &rng)), host: host, daemon: daemon)
                }
            }
        }
        defer { stops?.cancel() }
        let supervisorStops = settings.supervisorStopEverySeconds.map { range in
            Task { [rng] in
                var rng = rng
                for _ in 0..<4 { _ = rng.next() }
                while true {
                    try await Task.sleep(for: .seconds(Int.random(in: range, using: &rng)))
                    guard ContinuousClock.now + .seconds(3) < end else { return }
                    await stopSupervisor(for: .milliseconds(Int.random(in: 50...1500, using: &rng)), host: host, daemon: daemon)
                }
            }
        }
        defer { supervisorStops?.cancel() }
        // Like the bridge kills: the first early in the phase (so the warm-up's baseline is
        // taken after a restarted broker's paths ran once), none in its last seconds.
        let brokerKills = settings.brokerKillEverySeconds.map { range in
            Task { [rng] in
                var rng = rng
                _ = rng.next()
                _ = rng.next()
                try await Task.sleep(for: .milliseconds(Int.random(in: 1000...max(1000, min(range.lowerBound, phase / 4) * 1000), using: &rng)))
                var made = 0
                while ContinuousClock.now + settings.period * 3 < end {
                    made += 1
                    // Every third kill waits for a handed-over process's adopt (every sixth, its
                    // release) to go out: a broker that dies inside an adopt (the runtime settles
                    // it through the next broker's `list`) or before a release (asked again of
                    // the next one); random times almost never hit one. An adopt's kill lands
                    // 0–3 ms after it (the adopt waits for the supervisor's word on its
                    // deposit); a release is answered within a millisecond, sooner than a kill
                    // a moment later lands, so its kill comes as it goes out (nil delay).
                    let aimed: (HandoffAim.Request, Duration?)? =
                        made % 3 != 0
                        ? nil
                        : made % 6 == 0
                            ? (.release, nil)
                            : (.adopt, .microseconds(Int.random(in: 0...3000, using: &rng)))
                    await gate.exclusive { await killBroker(host: host, daemon: daemon, aimedAt: aimed) }
                    try await Task.sleep(for: .seconds(Int.random(in: range, using: &rng)))
                }
            }
        }
        defer { brokerKills?.cancel() }
        // Like the kills: the first early in the phase (the baseline is then taken with the
        // image an upgrade starts, its fds and heap), none in its last cycles. Awaited, not
        // only cancelled, at the end: an upgrade under way finishes before a quiet moment.
        let upgrades = settings.upgradeEverySeconds.map { range in
            Task { [rng] in
                var rng = rng
                for _ in 0..<3 { _ = rng.next() }
                try await Task.sleep(for: .milliseconds(Int.random(in: 1000...max(1000, min(range.lowerBound, phase / 4) * 1000), using: &rng)))
                var made = 0
                while ContinuousClock.now + settings.period * 3 < end {
                    made += 1
                    let fallBack = settings.fallbackEvery > 0 && made % settings.fallbackEvery == 0
                    // Its own task: a cancelled phase must not cut an upgrade's wait short.
                    await Task { await gate.exclusive { await upgrade(host: host, daemon: daemon, fallBack: fallBack) } }.value
                    try await Task.sleep(for: .seconds(Int.random(in: range, using: &rng)))
                }
            }
        }
        var cycle = ContinuousClock.now
        while cycle < end {
            let blackout = Duration.milliseconds(Int.random(in: settings.blackoutMilliseconds, using: &rng))
            // Signals aimed at this blackout go out now: it drops the bridge 0–3 ms later, as
            // their replies come (a signal lost that way once failed the soak).
            host.blackoutComing.notify()
            try? await Task.sleep(for: .microseconds(Int.random(in: 0...3000, using: &rng)))
            let off = ContinuousClock.now
            host.blackout()
            try? await Task.sleep(for: blackout)
            let on = host.lightsOn()
            if on - off - blackout > .seconds(2) {
                printLine("note: a blackout of \(milliseconds(blackout)) ms lasted \(milliseconds(on - off)) ms (this process was starved) at \(DaemonLogHandler.timestamp())")
            }
            host.ledger.update {
                $0.migrations += 1
                $0.blackoutTotal += blackout
                $0.blackoutOverruns.append(on - off - blackout)
                $0.migrationEnds.append(on)
            }
            // The host is back for the rest of the period, as planned, however late this task
            // woke: on a starved machine the blackout's sleep overruns, and ending the cycle on
            // the clock would start the next blackout at once — lights on for no time, every
            // dial refused, and a soak that measured its own machine, not the guest.
            let cycleEnd = max(cycle + settings.period, on + (settings.period - blackout))
            // No kill in the last cycles of a phase: the restarted worker must see a migration
            // (and its redial back-off) before it is measured, as the one at the baseline had.
            if let due = nextKill, let range = settings.killEverySeconds, ContinuousClock.now >= due,
                ContinuousClock.now + settings.period * 3 < end
            {
                // Somewhere in the lights-on part of this cycle.
                let room = milliseconds(cycleEnd - ContinuousClock.now) - 100
                if room > 0 { try? await Task.sleep(for: .milliseconds(Int.random(in: 0...room, using: &rng))) }
                await gate.exclusive { await killBridge(host: host, daemon: daemon) }
                nextKill = ContinuousClock.now + .seconds(Int.random(in: range, using: &rng))
            }
            try? await Task.sleep(until: cycleEnd, clock: .continuous)
            cycle = cycleEnd
        }
        upgrades?.cancel()
        _ = await upgrades?.result
    }

    /// Finds the bridge worker through the daemon's control socket (as `holdfast status` does)
    /// and kills it with SIGKILL.
    static func killBridge(host: Host, daemon: Daemon) async {
        let status: StatusReport
        do {
            status = try await daemon.status(timeout: .seconds(10))
        } catch {
            host.ledger.fail("status over the control socket failed: \(error)")
            return
        }
        guard let pid = status.roles.first(where: { $0.name == "bridge" })?.pid else {
            printLine("note: the bridge worker is restarting; no kill this time")
            return
        }
        kill(pid, SIGKILL)
        let now = ContinuousClock.now
        host.ledger.update { $0.kills.append(now) }
    }
}

extension Chaos {
    /// What an operator's Ctrl-Z, a debugger or a cgroup freeze does to the broker: SIGSTOP,
    /// a pause, SIGCONT. Every stream must carry on, nothing restarted.
    static func stopBroker(for pause: Duration, host: Host, daemon: Daemon) async {
        guard let status = try? await daemon.status(timeout: .seconds(10)),
            let pid = status.roles.first(where: { $0.name == "broker" })?.pid
        else { return }
        kill(pid, SIGSTOP)
        try? await Task.sleep(for: pause)
        kill(pid, SIGCONT)
        host.ledger.update { $0.brokerStops += 1 }
    }

    /// The same done to the supervisor, by its pid (a live upgrade keeps it). Every create,
    /// exit and stream must carry on, nothing restarted for it.
    static func stopSupervisor(for pause: Duration, host: Host, daemon: Daemon) async {
        kill(daemon.pid, SIGSTOP)
        try? await Task.sleep(for: pause)
        kill(daemon.pid, SIGCONT)
        host.ledger.update { $0.supervisorStops += 1 }
    }

    /// A broker crash: SIGKILL. The supervisor holds every fd and checkpoint; the next broker
    /// takes every stream over.
    ///
    /// `aimedAt`: the kill waits (up to 10 s) for a handed-over process's next request of that
    /// kind (adopt, release) to go out, and lands this long after it (nil: as it goes out,
    /// before it is written).
    static func killBroker(host: Host, daemon: Daemon, aimedAt: (request: HandoffAim.Request, delay: Duration?)? = nil) async {
        guard let status = try? await daemon.status(timeout: .seconds(10)),
            let pid = status.roles.first(where: { $0.name == "broker" })?.pid
        else {
            printLine("note: the broker is restarting; no kill this time")
            return
        }
        var landed: HandoffAim.Request?
        if let aimedAt, await host.handoffAim.next(aimedAt.request, within: .seconds(10), killAtOnce: aimedAt.delay == nil ? pid : nil) {
            landed = aimedAt.request
            if let delay = aimedAt.delay { try? await Task.sleep(for: delay) }
        }
        kill(pid, SIGKILL)  // (a second SIGKILL of a dead or dying process changes nothing)
        let now = ContinuousClock.now
        host.ledger.update {
            $0.brokerKills.append(now)
            switch landed {
            case .adopt: $0.brokerKillsAtAnAdopt += 1
            case .release: $0.brokerKillsAtARelease += 1
            case nil: break
            }
        }
    }
}

extension Chaos {
    /// A package upgrade's `systemctl reload`: `holdfast upgrade` over the control socket, the
    /// daemon re-executing the binary at its path (the same one here: the whole hand-over runs
    /// all the same), waited for until the new image serves with both roles.
    ///
    /// `fallBack`: the new binary is one that cannot take over (`Daemon.installBinaryThatFallsBack`):
    /// the upgrade must fail saying the previous binary took over again, and nothing be lost.
    static func upgrade(host: Host, daemon: Daemon, fallBack: Bool = false) async {
        if fallBack {
            do {
                try daemon.installBinaryThatFallsBack()
            } catch {
                host.ledger.fail("cannot install the binary that falls back: \(error)")
                return
            }
        }
        defer {
            if fallBack {
                do { try daemon.restoreBinary() } catch { host.ledger.fail("cannot put the daemon's binary back: \(error)") }
            }
        }
        let started = ContinuousClock.now
        do {
            let outcome = try await UpgradeClient.upgrade(socket: daemon.controlSocket, timeout: .seconds(60))
            if fallBack {
                host.ledger.fail("an upgrade onto a binary that cannot take over succeeded: \(outcome.after.version)")
            } else {
                host.ledger.update { $0.upgrades.append(outcome.took) }
            }
        } catch let failure where fallBack && failure.description.contains("could not take over") && failure.description.contains("took over again") {
            host.ledger.update { $0.fallbacks.append(ContinuousClock.now - started) }
        } catch {
            host.ledger.fail("live upgrade\(fallBack ? " meant to fall back" : ""): \(error)")
        }
    }
}

func milliseconds(_ duration: Duration) -> Int {
    Int(duration.components.seconds * 1000 + duration.components.attoseconds / 1_000_000_000_000_000)
}

