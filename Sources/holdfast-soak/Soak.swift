import ArgumentParser
import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import NIOConcurrencyHelpers

#if canImport(Glibc)
import Glibc
#endif

/// `holdfast-soak` (`make soak SOAK_MINUTES=N`): a real `holdfast daemon` with the host side
/// in process, ~100 processes of mixed traffic coming and going, a migration every 2 s with a
/// random blackout, the bridge worker killed with SIGKILL now and then; at the end every
/// stream's bytes (SHA-256), every exit (exactly once, right code) and the roles' fds and RSS
/// against their values after a warm-up. Exit status 0 on PASS, 1 on any failure, 2 when it
/// cannot run (not root, no daemon binary).
@main
struct Soak: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "holdfast-soak",
        abstract: "Soak a real holdfast daemon: churning processes, migrations, bridge kills; check every byte and exit.",
        discussion: "Needs root: the daemon's broker runs as a uid of its own. See RELIABILITY.md.")

    @Option(help: "Minutes of soak after the warm-up.") var minutes: Double = 2
    @Option(
        help: """
            Seconds of warm-up (the same workload) before the baseline is measured (default: 30 \
            for a soak of up to 5 minutes, else a sixth of the soak, at most 300).
            """)
    var warmup: Int?
    @Option(help: "Processes kept live.") var processes = 100
    @Option(help: "Seed of the workload and the chaos (default: from the clock; printed).") var seed: UInt64?
    @Option(help: "A migration starts every this many milliseconds.") var migrationEvery = 2000
    @Option(help: "Shortest blackout, milliseconds.") var blackoutMin = 100
    @Option(help: "Longest blackout, milliseconds.") var blackoutMax = 1500
    @Option(help: "Shortest time between bridge worker kills, seconds (0: no kills).") var killMin = 15
    @Option(help: "Longest time between bridge worker kills, seconds.") var killMax = 45
    @Option(help: "Shortest time between stops (SIGSTOP, 50–500 ms, SIGCONT) of the broker, seconds (0: none).") var stopMin = 5
    @Option(help: "Longest time between stops of the broker, seconds.") var stopMax = 15
    @Option(help: "Shortest time between stops (SIGSTOP, 50–1500 ms, SIGCONT) of the supervisor, seconds (0: none).")
    var supervisorStopMin = 10
    @Option(help: "Longest time between stops of the supervisor, seconds.") var supervisorStopMax = 30
    @Option(help: "Shortest time between broker kills (SIGKILL), seconds (0: none).") var brokerKillMin = 20
    @Option(help: "Longest time between broker kills, seconds.") var brokerKillMax = 40
    @Option(help: "Shortest time between live upgrades (holdfast upgrade: the daemon re-executes its binary), seconds (0: none).")
    var upgradeMin = 30
    @Option(help: "Longest time between live upgrades, seconds.") var upgradeMax = 60
    @Option(help: "Every this many live upgrades, one onto a new binary that cannot take over (it starts on a configuration file that is not there, after its check): it must fall back to the previous one with nothing lost (0: never).")
    var fallbackEvery = 3
    @Option(help: "Anonymous RSS may grow by this many percent of the baseline's RSS...") var rssTolerancePercent = 10
    @Option(help: "...or by this many KiB, whichever is more.") var rssToleranceKiB = 2048
    @Option(help: "Print a progress line every this many seconds.") var progressEvery = 30
    @Option(help: "Split the soak into this many parts, the roles measured in a quiet moment after each (default: one part per 5 minutes).")
    var checkpoints: Int?
    @Option(help: "The holdfast binary (default: next to this one).") var holdfast: String?
    @Flag(help: "Keep the run directory (config, sockets, daemon log) even on success.") var keep = false
    @Option(help: "For inspecting the roles (gdb, /proc): pause this many seconds at each quiet moment, after measuring.")
    var pauseWhenQuiet = 0

    func validate() throws {
        guard minutes > 0, (warmup ?? 0) >= 0, processes > 0 else { throw ValidationError("minutes and processes must be positive") }
        guard blackoutMin > 0, blackoutMin <= blackoutMax, blackoutMax < migrationEvery else {
            throw ValidationError("need 0 < blackout-min <= blackout-max < migration-every")
        }
        guard killMin >= 0, killMin <= killMax else { throw ValidationError("need 0 <= kill-min <= kill-max") }
        guard stopMin >= 0, stopMin <= stopMax else { throw ValidationError("need 0 <= stop-min <= stop-max") }
        guard supervisorStopMin >= 0, supervisorStopMin <= supervisorStopMax else {
            throw ValidationError("need 0 <= supervisor-stop-min <= supervisor-stop-max")
        }
        guard brokerKillMin >= 0, brokerKillMin <= brokerKillMax else { throw ValidationError("need 0 <= broker-kill-min <= broker-kill-max") }
        guard upgradeMin >= 0, upgradeMin <= upgradeMax else { throw ValidationError("need 0 <= upgrade-min <= upgrade-max") }
        if let checkpoints, checkpoints < 1 { throw ValidationError("checkpoints must be at least 1") }
    }

    func run() async throws {
        guard geteuid() == 0 else {
            printError("holdfast-soak: needs root: it starts a real holdfast daemon, whose broker runs as a uid of its own (run: sudo make soak)")
            throw ExitCode(2)
        }
        let executable = holdfast ?? siblingExecutable("holdfast")
        guard access(executable, X_OK) == 0 else {
            printError("holdfast-soak: no holdfast binary at \(executable) (build it, or pass --holdfast PATH)")
            throw ExitCode(2)
        }
        raiseDescriptorLimit()
        SignalDisposition.ignore(SIGPIPE)
        let seed = self.seed ?? clockSeed()
        let directory = try makeRunDirectory()
        let host = try Host(directory: directory)
        let daemon = try Daemon.start(executable: executable, directory: directory)
        let settings = Settings(
            // The allocator and the broker's buffer pools take minutes of this workload to
            // reach their working set (RELIABILITY.md): a long soak warms up longer, so its RSS
            // is compared with a baseline that has.
            minutes: minutes, warmup: warmup ?? (minutes <= 5 ? 30 : min(300, Int(minutes * 10))), processes: processes, migrationEvery: migrationEvery, blackoutMin: blackoutMin,
            blackoutMax: blackoutMax, killMin: killMin, killMax: killMax, stopMin: stopMin, stopMax: stopMax,
            supervisorStopMin: supervisorStopMin, supervisorStopMax: supervisorStopMax, brokerKillMin: brokerKillMin, brokerKillMax: brokerKillMax, upgradeMin: upgradeMin, upgradeMax: upgradeMax, fallbackEvery: fallbackEvery, rssTolerancePercent: rssTolerancePercent,
            rssToleranceKiB: rssToleranceKiB, progressEvery: progressEvery, pauseWhenQuiet: pauseWhenQuiet, checkpoints: checkpoints ?? max(1, Int(minutes / 5)))
        // Where the OOM killer ends the `out-of-memory` processes; none without the kernel's log,
        // whose record each exit must be reported by.
        let outOfMemory = access("/dev/kmsg", R_OK) == 0 ? MemoryLimitedCgroup.make(name: "holdfast-soak-oom-\(getpid())", limit: Run.outOfMemoryLimit) : nil
        defer { outOfMemory?.remove() }
        let verdict = await Run(options: settings, seed: seed, host: host, daemon: daemon, outOfMemory: outOfMemory).drive()
        host.close()
        if verdict.passed && !keep {
            removeTree(directory)
        } else {
            printLine("run directory kept: \(directory) (config, daemon.log)")
        }
        if !verdict.passed { throw ExitCode(1) }
    }
}

/// The command's options, as plain values.
struct Settings: Sendable {
    var minutes: Double
    var warmup: Int
    var processes: Int
    var migrationEvery: Int
    var blackoutMin: Int
    var blackoutMax: Int
    var killMin: Int
    var killMax: Int
    var stopMin: Int
    var stopMax: Int
    var supervisorStopMin: Int
    var supervisorStopMax: Int
    var brokerKillMin: Int
    var brokerKillMax: Int
    var upgradeMin: Int
    var upgradeMax: Int
    var fallbackEvery: Int
    var rssTolerancePercent: Int
    var rssToleranceKiB: Int
    var progressEvery: Int
    var pauseWhenQuiet: Int
    var checkpoints: Int
}

/// One soak run: phases, measurements, verdict.
struct Run {
    let options: Settings
    let seed: UInt64
    let host: Host
    let daemon: Daemon
    let nextIndex = NIOLockedValueBox(0)
    let createdIDs = NIOLockedValueBox<[String]>([])
    /// Where `out-of-memory` processes go; nil: none are run.
    let outOfMemory: MemoryLimitedCgroup?
    static let outOfMemoryLimit = 48 << 20

    init(options: Settings, seed: UInt64, host: Host, daemon: Daemon, outOfMemory: MemoryLimitedCgroup?) {
        self.outOfMemory = outOfMemory
        self.options = options
        self.seed = seed
        self.host = host
        self.daemon = daemon
    }

    struct Verdict {
        var passed: Bool
    }

    var chaos: ChaosSettings {
        ChaosSettings(
            period: .milliseconds(options.migrationEvery), blackoutMilliseconds: options.blackoutMin...options.blackoutMax,
            killEverySeconds: options.killMin > 0 ? options.killMin...options.killMax : nil,
            brokerStopEverySeconds: options.stopMin > 0 ? options.stopMin...options.stopMax : nil,
            supervisorStopEverySeconds: options.supervisorStopMin > 0 ? options.supervisorStopMin...options.supervisorStopMax : nil,
            brokerKillEverySeconds: options.brokerKillMin > 0 ? options.brokerKillMin...options.brokerKillMax : nil,
            upgradeEverySeconds: options.upgradeMin > 0 ? options.upgradeMin...options.upgradeMax : nil, fallbackEvery: options.fallbackEvery)
    }

    func drive() async -> Verdict {
        let started = ContinuousClock.now
        printLine(
            "holdfast-soak: seed \(seed), \(options.processes) processes live, \(format(options.minutes)) min soak after \(options.warmup) s warm-up; migration every \(options.migrationEvery) ms (blackout \(options.blackoutMin)–\(options.blackoutMax) ms); bridge worker SIGKILL every \(options.killMin > 0 ? "\(options.killMin)–\(options.killMax) s" : "never"); broker SIGSTOP/SIGCONT every \(options.stopMin > 0 ? "\(options.stopMin)–\(options.stopMax) s" : "never"); supervisor SIGSTOP/SIGCONT every \(options.supervisorStopMin > 0 ? "\(options.supervisorStopMin)–\(options.supervisorStopMax) s" : "never"); broker SIGKILL every \(options.brokerKillMin > 0 ? "\(options.brokerKillMin)–\(options.brokerKillMax) s" : "never"); live upgrade every \(options.upgradeMin > 0 ? "\(options.upgradeMin)–\(options.upgradeMax) s" : "never")"
        )
        printLine("daemon pid \(daemon.pid), run directory \(daemon.directory)")
        printLine(
            outOfMemory.map { "out-of-memory processes grow in \($0.path) (\(Run.outOfMemoryLimit >> 20) MiB) until the OOM killer ends them" }
                ?? "no out-of-memory processes: no memory cgroup to make, or no /dev/kmsg to read")
        guard await host.bridge.waitForGuest(timeout: .seconds(30)), let first = await measureOnceUp(timeout: .seconds(30)) else {
            host.ledger.fail("the daemon did not come up: its log ends with:\n\(daemon.logTail)")
            return await finish(started: started, start: nil, baseline: nil, end: nil, checkpoints: [])
        }
        printLine("daemon up: " + describe(first))

        if options.warmup > 0 {
            printLine("warm-up: \(options.warmup) s")
            await phase(seconds: Double(options.warmup), chaosSeed: seed &+ 1)
        }
        var baseline: RoleFootprints?
        if await quiesce(), let measured = await measureUntilEqual(to: nil) {
            baseline = measured
            checkLiveObjects(measured, at: "the baseline")
            printLine("baseline after warm-up: " + describe(measured))
            printLine("  broker memory: " + memoryBreakdown(measured.broker.pid) + mallocLine(measured))
            printLine("  supervisor memory: " + memoryBreakdown(measured.supervisor.pid) + supervisorMallocLine(measured))
            printLine("  bridge memory: " + memoryBreakdown(measured.bridge.pid))
            await pauseIfAsked(measured)
        } else {
            host.ledger.fail("no quiet moment after the warm-up to measure a baseline")
        }

        // The soak, in parts: after each the guest goes quiet and the roles are measured, so a
        // leak shows as a trend rather than one number.
        let parts = options.checkpoints
        printLine("soak: \(format(options.minutes)) min in \(parts) part(s), fds and RSS measured after each")
        let soakStarted = ContinuousClock.now
        var checkpoints: [Checkpoint] = []
        for part in 1...parts {
            await phase(seconds: options.minutes * 60 / Double(parts), chaosSeed: seed &+ 1 &+ UInt64(part))
            guard await quiesce() else {
                host.ledger.fail("the daemon did not become quiet after part \(part) of the soak")
                break
            }
            guard let measured = await measureUntilEqual(to: baseline) else {
                host.ledger.fail("could not measure the roles after part \(part) of the soak")
                break
            }
            checkpoints.append(Checkpoint(soakTime: ContinuousClock.now - soakStarted, footprints: measured))
            printLine("checkpoint \(part)/\(parts) (\(clock(ContinuousClock.now - soakStarted)) into the soak): " + describe(measured))
            printLine("  broker memory: " + memoryBreakdown(measured.broker.pid) + mallocLine(measured))
            printLine("  supervisor memory: " + memoryBreakdown(measured.supervisor.pid) + supervisorMallocLine(measured))
            printLine("  bridge memory: " + memoryBreakdown(measured.bridge.pid))
            await pauseIfAsked(measured)
            checkLiveObjects(measured, at: "checkpoint \(part)")
            if part < parts, let baseline {
                for ((role, now), (_, then)) in zip(measured.all, baseline.all) where !fdsAgree(baseline: then, now: now) {
                    host.ledger.fail("\(role): fds at checkpoint \(part) differ from the baseline (\(fdDifference(from: then, to: now)))")
                }
            }
        }
        return await finish(
            started: started, start: first, baseline: baseline, end: checkpoints.count == parts ? checkpoints.last?.footprints : nil,
            checkpoints: checkpoints)
    }

    /// `--pause-when-quiet`: time to look at the roles while nothing runs.
    func pauseIfAsked(_ footprints: RoleFootprints) async {
        guard options.pauseWhenQuiet > 0 else { return }
        printLine("paused \(options.pauseWhenQuiet) s: supervisor \(footprints.supervisor.pid), broker \(footprints.broker.pid), bridge \(footprints.bridge.pid)")
        try? await Task.sleep(for: .seconds(options.pauseWhenQuiet))
    }

    /// A quiet broker holds no process and no stream: one left over is a leak whatever the
    /// heap says (a stream object and its /dev/null were how the last two leaks showed).
    func checkLiveObjects(_ footprints: RoleFootprints, at moment: String) {
        guard let objects = footprints.brokerObjects else {
            host.ledger.fail("broker: no live-object counts in its stats at \(moment)")
            return
        }
        if objects.processes != 0 || objects.streams != 0 {
            host.ledger.fail("broker: \(objects.processes) process and \(objects.streams) stream objects alive at \(moment), with nothing running")
        }
        // Every process done and what it left ended: no process cgroup may be left.
        if case .success(let cgroups) = ProcessCgroups.open(tag: ProcessCgroups.tag(runDirectory: daemon.directory)) {
            let left = cgroups.cgroupNames()
            if !left.isEmpty { host.ledger.fail("supervisor: \(left.count) process cgroups left at \(moment), with nothing running: \(left.prefix(5))") }
        }
    }

    func supervisorMallocLine(_ footprints: RoleFootprints) -> String {
        footprints.supervisorMalloc.map { "; malloc in use \(mib($0.inUseKiB)), free \(mib($0.freeKiB))" } ?? "; malloc: no status"
    }

    func mallocLine(_ footprints: RoleFootprints) -> String {
        (footprints.brokerMalloc.map { "; malloc in use \(mib($0.inUseKiB)), free \(mib($0.freeKiB))" } ?? "; malloc: no stats")
            + (footprints.brokerObjects.map { "; live objects: \($0.processes) processes, \($0.streams) streams" } ?? "")
    }

    struct Checkpoint {
        var soakTime: Duration
        var footprints: RoleFootprints
    }

    // MARK: Phases

    /// Keeps `processes` processes live for `seconds`, with migrations and kills, then waits
    /// for every process of the phase to finish and be checked.
    func phase(seconds: Double, chaosSeed: UInt64) async {
        let end = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
        let phaseDone = NIOLockedValueBox(false)
        await withDiscardingTaskGroup { group in
            group.addTask { [host, daemon, chaos] in
                await Chaos.run(until: end, host: host, daemon: daemon, settings: chaos, seed: chaosSeed)
            }
            group.addTask { [host, daemon, options] in
                let began = ContinuousClock.now
                let every = Duration.seconds(max(1, options.progressEvery))
                var next = began + every
                while !phaseDone.withLockedValue({ $0 }) {
                    try? await Task.sleep(for: .milliseconds(250))
                    if ContinuousClock.now >= next {
                        let memory = await residentMemory(daemon)
                        printLine(progressLine(host: host, elapsed: ContinuousClock.now - began) + "  " + memory)
                        next += every
                    }
                }
            }
            while ContinuousClock.now < end {
                var added = 0
                while host.live < options.processes, added < 10 {
                    let index = nextIndex.withLockedValue { i -> Int in
                        i += 1
                        return i
                    }
                    let budget = Double(milliseconds(end - ContinuousClock.now)) / 1000 + 5
                    let plan = Workload.plan(index: index, seed: seed, budgetSeconds: budget, outOfMemoryInto: outOfMemory?.procs)
                    createdIDs.withLockedValue { $0.append(plan.id) }
                    host.started()
                    group.addTask { [host] in
                        await Worker.run(plan, host: host, handoffSocket: daemon.directory + "/broker.sock")
                        host.ended()
                    }
                    added += 1
                }
                try? await Task.sleep(for: .milliseconds(100))
            }
            printLine("phase over: no new processes; waiting for \(host.live) to finish")
            group.addTask { [host] in
                while host.live > 0 { try? await Task.sleep(for: .milliseconds(100)) }
                phaseDone.withLockedValue { $0 = true }
            }
        }
        printLine(progressLine(host: host, elapsed: nil))
    }

    /// Waits (bounded) until the guest holds no process and no stream, as seen over the bridge.
    func quiesce() async -> Bool {
        let deadline = ContinuousClock.now + .seconds(120)
        var last = ""
        while ContinuousClock.now < deadline {
            if let list = try? await host.bridge.list(timeout: .seconds(10)) {
                if list.processes.isEmpty, list.streams.isEmpty, host.streams.statistics.streams == 0 {
                    try? await Task.sleep(for: .seconds(2))  // acknowledgement timers, closing sockets
                    return true
                }
                last = "\(list.processes.count) processes (\(list.processes.prefix(5).map { "\($0.id) \($0.state)" })), \(list.streams.count) streams"
            }
            try? await Task.sleep(for: .milliseconds(500))
        }
        printLine("not quiet after 120 s: the guest still has \(last)")
        return false
    }

    /// The roles' fds and RSS, once two samples half a second apart agree on the fds (the
    /// status request's own connection must be gone first).
    func measure() async -> RoleFootprints? {
        guard let status = try? await daemon.status(timeout: .seconds(10)),
            let broker = status.roles.first(where: { $0.name == "broker" })?.pid,
            let bridge = status.roles.first(where: { $0.name == "bridge" })?.pid
        else { return nil }
        try? await Task.sleep(for: .seconds(1))
        var previous: RoleFootprints?
        for _ in 0..<20 {
            guard let supervisorNow = Footprint.of(daemon.pid), let brokerNow = Footprint.of(broker), let bridgeNow = Footprint.of(bridge)
            else { return nil }
            var current = RoleFootprints(supervisor: supervisorNow, broker: brokerNow, bridge: bridgeNow)
            if let previous, previous.all.map(\.1.kinds) == current.all.map(\.1.kinds) {
                if let status = try? await daemon.status(timeout: .seconds(10)), let inUse = status.mallocInUseKiB, let free = status.mallocFreeKiB {
                    current.supervisorMalloc = (inUse, free)
                }
                if let stats = try? await host.bridge.stats(timeout: .seconds(10)) {
                    if let inUse = stats.mallocInUseKiB, let free = stats.mallocFreeKiB { current.brokerMalloc = (inUse, free) }
                    if let processes = stats.liveProcessObjects, let streams = stats.liveStreamObjects {
                        current.brokerObjects = (processes, streams)
                    }
                }
                return current
            }
            previous = current
            try? await Task.sleep(for: .milliseconds(500))
        }
        return previous
    }

    /// The first measurement, once the status names both roles' pids: the bridge worker may
    /// greet the host before the supervisor has started the broker (a fresh clone's soak
    /// measured in that gap once and failed with "the daemon did not come up").
    func measureOnceUp(timeout: Duration) async -> RoleFootprints? {
        let deadline = ContinuousClock.now + timeout
        repeat {
            if let measured = await measure() { return measured }
            try? await Task.sleep(for: .milliseconds(200))
        } while ContinuousClock.now < deadline
        return nil
    }

    /// Measures until the fds equal the baseline's and the broker has no live process or
    /// stream object, for at most 30 s (a socket may still be closing); returns the last
    /// measurement (with no baseline, until the broker has no live object).
    func measureUntilEqual(to baseline: RoleFootprints?) async -> RoleFootprints? {
        let deadline = ContinuousClock.now + .seconds(30)
        var last: RoleFootprints?
        repeat {
            last = await measure()
            guard let current = last else { return nil }
            let settled = current.brokerObjects.map { $0.processes == 0 && $0.streams == 0 } ?? true
            let fdsBack = baseline.map { zip($0.all, current.all).allSatisfy({ fdsAgree(baseline: $0.1, now: $1.1) }) } ?? true
            if settled, fdsBack { return current }
            try? await Task.sleep(for: .seconds(1))
        } while ContinuousClock.now < deadline
        return last
    }
}
