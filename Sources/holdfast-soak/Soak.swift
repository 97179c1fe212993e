import ArgumentParser
import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
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
    @Option(help: "RSS may grow by this many percent over the baseline...") var rssTolerancePercent = 10
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
            blackoutMax: blackoutMax, killMin: killMin, killMax: killMax, stopMin: stopMin, stopMax: stopMax, rssTolerancePercent: rssTolerancePercent,
            rssToleranceKiB: rssToleranceKiB, progressEvery: progressEvery, pauseWhenQuiet: pauseWhenQuiet, checkpoints: checkpoints ?? max(1, Int(minutes / 5)))
        let verdict = await Run(options: settings, seed: seed, host: host, daemon: daemon).drive()
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
    private let nextIndex = NIOLockedValueBox(0)
    private let createdIDs = NIOLockedValueBox<[String]>([])

    init(options: Settings, seed: UInt64, host: Host, daemon: Daemon) {
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
            brokerStopEverySeconds: options.stopMin > 0 ? options.stopMin...options.stopMax : nil)
    }

    func drive() async -> Verdict {
        let started = ContinuousClock.now
        printLine(
            "holdfast-soak: seed \(seed), \(options.processes) processes live, \(format(options.minutes)) min soak after \(options.warmup) s warm-up; migration every \(options.migrationEvery) ms (blackout \(options.blackoutMin)–\(options.blackoutMax) ms); bridge worker SIGKILL every \(options.killMin > 0 ? "\(options.killMin)–\(options.killMax) s" : "never"); broker SIGSTOP/SIGCONT every \(options.stopMin > 0 ? "\(options.stopMin)–\(options.stopMax) s" : "never")"
        )
        printLine("daemon pid \(daemon.pid), run directory \(daemon.directory)")
        guard await host.bridge.waitForGuest(timeout: .seconds(30)), let first = await measure() else {
            host.ledger.fail("the daemon did not come up: its log ends with:\n\(daemon.logTail)")
            return await finish(started: started, start: nil, baseline: nil, end: nil, checkpoints: [])
        }
        printLine("daemon up: " + describe(first))

        if options.warmup > 0 {
            printLine("warm-up: \(options.warmup) s")
            await phase(seconds: Double(options.warmup), chaosSeed: seed &+ 1)
        }
        var baseline: RoleFootprints?
        if await quiesce(), let measured = await measure() {
            baseline = measured
            printLine("baseline after warm-up: " + describe(measured))
            printLine("  broker memory: " + memoryBreakdown(measured.broker.pid) + mallocLine(measured))
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
            await pauseIfAsked(measured)
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
                    let plan = Workload.plan(index: index, seed: seed, budgetSeconds: budget)
                    createdIDs.withLockedValue { $0.append(plan.id) }
                    host.started()
                    group.addTask { [host] in
                        await Worker.run(plan, host: host)
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

    /// Measures until the fds equal the baseline's, for at most 30 s (a socket may still be
    /// closing); returns the last measurement.
    func measureUntilEqual(to baseline: RoleFootprints?) async -> RoleFootprints? {
        let deadline = ContinuousClock.now + .seconds(30)
        var last: RoleFootprints?
        repeat {
            last = await measure()
            guard let baseline, let current = last else { return last }
            if zip(baseline.all, current.all).allSatisfy({ fdsAgree(baseline: $0.1, now: $1.1) }) { return current }
            try? await Task.sleep(for: .seconds(1))
        } while ContinuousClock.now < deadline
        return last
    }

    // MARK: Verdict

    func finish(
        started: ContinuousClock.Instant, start: RoleFootprints?, baseline: RoleFootprints?, end: RoleFootprints?,
        checkpoints: [Checkpoint]
    ) async -> Verdict {
        let ledger = host.ledger
        // Every exit exactly once.
        let deliveries = host.exits.deliveries
        let created = Set(createdIDs.withLockedValue { $0 })
        let counters = ledger.snapshot
        let startedCount = counters.started.values.reduce(0, +)
        let duplicates = deliveries.filter { $0.value > 1 }
        let strangers = deliveries.keys.filter { !created.contains($0) }
        for (id, count) in duplicates.sorted(by: { $0.key < $1.key }).prefix(20) { ledger.fail("\(id): exit delivered \(count) times") }
        for id in strangers.sorted().prefix(20) { ledger.fail("\(id): an exit for a process the soak never created") }

        // The daemon's roles.
        let status = try? await daemon.status(timeout: .seconds(10))
        let brokerRestarts = status?.roles.first { $0.name == "broker" }?.restarts
        let bridgeRestarts = status?.roles.first { $0.name == "bridge" }?.restarts
        if status == nil { ledger.fail("no status from the daemon at the end") }
        if let brokerRestarts, brokerRestarts != 0 { ledger.fail("the broker restarted \(brokerRestarts) times (it holds every stream)") }
        if let bridgeRestarts, bridgeRestarts != counters.kills.count {
            ledger.fail("the bridge worker restarted \(bridgeRestarts) times for \(counters.kills.count) kills")
        }
        if let status, status.pid != daemon.pid { ledger.fail("the supervisor is pid \(status.pid), started as \(daemon.pid)") }

        // fds exactly, RSS within the tolerance.
        var roleRows: [String] = []
        for (index, role) in ["supervisor", "broker", "bridge"].enumerated() {
            let s = start?.all[index].1
            let b = baseline?.all[index].1
            let e = end?.all[index].1
            var verdict = "ok"
            if let b, let e {
                let allowed = b.residentKiB + max(b.residentKiB * options.rssTolerancePercent / 100, options.rssToleranceKiB)
                if !fdsAgree(baseline: b, now: e) {
                    verdict = "FDS CHANGED"
                    ledger.fail(
                        "\(role): \(e.descriptors) fds after the soak, \(b.descriptors) at the baseline (\(fdDifference(from: b, to: e))); pid \(b.pid) then \(e.pid); now \(e.table.sorted { $0.key < $1.key }.map { "\($0.key):\($0.value)" }.joined(separator: " "))"
                    )
                }
                if e.residentKiB > allowed {
                    verdict = verdict == "ok" ? "RSS GREW" : verdict + ", RSS GREW"
                    ledger.fail("\(role): RSS \(e.residentKiB) KiB after the soak, baseline \(b.residentKiB) KiB (allowed up to \(allowed) KiB)")
                }
                // The broker holds every stream: what its malloc has handed out must come back
                // (a leak), whatever the allocator keeps resident.
                if role == "broker", let then = baseline?.brokerMalloc, let now = end?.brokerMalloc {
                    let allowedInUse = then.inUseKiB + max(then.inUseKiB * options.rssTolerancePercent / 100, 1024)
                    if now.inUseKiB > allowedInUse {
                        verdict = verdict == "ok" ? "MALLOC GREW" : verdict + ", MALLOC GREW"
                        ledger.fail("broker: malloc in use \(now.inUseKiB) KiB after the soak, baseline \(then.inUseKiB) KiB (allowed up to \(allowedInUse) KiB)")
                    }
                } else if role == "broker" {
                    ledger.fail("broker: no malloc figures from its stats at the baseline or the end")
                }
            } else {
                verdict = "not measured"
            }
            func fds(_ f: Footprint?) -> String { f.map { String($0.descriptors) } ?? "-" }
            func rss(_ f: Footprint?) -> String { f.map { mib($0.residentKiB) } ?? "-" }
            roleRows.append("| \(role) | \(fds(s)) | \(fds(b)) | \(fds(e)) | \(rss(s)) | \(rss(b)) | \(rss(e)) | \(verdict) |")
        }

        // Stop the daemon: it must shut down cleanly.
        let stopped = await daemon.stop(timeout: .seconds(30))
        if stopped.killed || stopped.status != .exited(0) {
            ledger.fail("the daemon did not shut down cleanly: \(stopped.status.map { "\($0)" } ?? "unknown"), killed \(stopped.killed)")
        }

        // Latencies.
        let final = ledger.snapshot
        let bridgeAfterMigration = final.migrationEnds.compactMap { host.hellos.first(after: $0, within: .seconds(30)) }
        let bridgeAfterKill = final.kills.compactMap { host.hellos.first(after: $0, within: .seconds(30)) }
        let streamFigures = host.reconnects.figures
        let total = ContinuousClock.now - started
        let soakTime = options.minutes * 60
        let passed = final.failureCount == 0
        let kinds = Kind.allCases.map { "\($0.rawValue) \(final.started[$0] ?? 0)" }.joined(separator: ", ")
        let exitsOnce = deliveries.filter { created.contains($0.key) && $0.value == 1 }.count

        var rows: [(String, String)] = [
            ("verdict", passed ? "**PASS**" : "**FAIL** (\(final.failureCount) failures)"),
            ("time", "\(format(soakTime / 60)) min soak after a \(options.warmup) s warm-up; \(clock(total)) in all (counts below cover both)"),
            ("seed", "\(seed)"),
            ("processes run", "\(startedCount) (\(kinds)); \(options.processes) kept live"),
            ("exits delivered exactly once", "\(exitsOnce) of \(startedCount); duplicates \(duplicates.count); exits checked (code, signal, nothing undelivered) \(final.exitsChecked)"),
            ("streams checked (bytes and sha256)", "\(final.streamsChecked), passed \(final.streamsPassed)"),
            ("bytes guest → host (stdout, stderr, tty)", bytes(final.bytesToHost)),
            ("bytes host → guest (stdin, tty input)", bytes(final.bytesToGuest)),
            ("migrations", "\(final.migrations), one every \(options.migrationEvery) ms, blackout \(options.blackoutMin)–\(options.blackoutMax) ms (mean \(final.migrations > 0 ? String(milliseconds(final.blackoutTotal) / final.migrations) : "-") ms)"),
            ("bridge worker kills (SIGKILL)", "\(final.kills.count); restarts the daemon counted: \(bridgeRestarts.map(String.init) ?? "?")"),
            ("broker stops (SIGSTOP, 50–500 ms, SIGCONT)", "\(final.brokerStops)"),
            ("broker restarts", brokerRestarts.map(String.init) ?? "?"),
            ("bridge connections accepted", "\(host.bridge.acceptedConnections)"),
            ("stream connections (host side)", "\(streamFigures.connects), of which reconnects \(streamFigures.reconnects)"),
            ("bridge back after a migration (end of blackout → hello)", latency(bridgeAfterMigration)),
            ("bridge back after a kill (SIGKILL → hello)", latency(bridgeAfterKill)),
            ("stream back after a migration (end of blackout → connected)", latency(streamFigures.latencies)),
            ("streams cut by a migration and not back before the next", "\(streamFigures.notBack)"),
            ("creates sent again (bridge lost before the reply; same idempotency key)", "\(host.bridge.repeatedCreates)"),
            ("signals sent over the bridge", "\(final.signalsSent)"),
            ("daemon shutdown (SIGTERM)", stopped.status.map { "\($0)" } ?? "no status"),
            ("failures", "\(final.failureCount)"),
        ]
        if final.failureCount > 0, final.failures.count < final.failureCount {
            rows.append(("failures listed", "first \(final.failures.count)"))
        }
        printLine("")
        printLine("## holdfast soak: \(passed ? "PASS" : "FAIL")")
        printLine("")
        printLine("| measure | value |")
        printLine("|---|---|")
        for (name, value) in rows { printLine("| \(name) | \(value) |") }
        printLine("")
        printLine(
            "| role | fds start | fds baseline | fds end | RSS start | RSS baseline | RSS end | check (fds equal, kind by kind; RSS ≤ baseline + max(\(options.rssTolerancePercent) %, \(mib(options.rssToleranceKiB))); broker malloc in use ≤ baseline + max(\(options.rssTolerancePercent) %, 1 MiB)) |"
        )
        printLine("|---|---:|---:|---:|---:|---:|---:|---|")
        for row in roleRows { printLine(row) }
        if checkpoints.count > 1 || (checkpoints.count == 1 && baseline != nil) {
            printLine("")
            printLine("| quiet moment | soak time | supervisor fds, RSS | broker fds, RSS | bridge fds, RSS | broker malloc in use, free |")
            printLine("|---|---:|---:|---:|---:|---:|")
            func cells(_ f: RoleFootprints) -> String {
                f.all.map { "\($0.1.descriptors), \(mib($0.1.residentKiB))" }.joined(separator: " | ") + " | "
                    + (f.brokerMalloc.map { "\(mib($0.inUseKiB)), \(mib($0.freeKiB))" } ?? "-")
            }
            if let baseline { printLine("| baseline (after the warm-up) | 0m00s | \(cells(baseline)) |") }
            for (index, checkpoint) in checkpoints.enumerated() {
                printLine("| checkpoint \(index + 1) | \(clock(checkpoint.soakTime)) | \(cells(checkpoint.footprints)) |")
            }
        }
        if !final.failures.isEmpty {
            printLine("")
            printLine("failures:")
            for failure in final.failures { printLine("- \(failure)") }
            printLine("daemon log tail:\n\(daemon.logTail)")
        }
        return Verdict(passed: passed)
    }
}

// MARK: - Helpers

func progressLine(host: Host, elapsed: Duration?) -> String {
    let c = host.ledger.snapshot
    let started = c.started.values.reduce(0, +)
    let prefix = elapsed.map { "[\(clock($0))]" } ?? "[phase end]"
    return "\(prefix) live \(host.live)  started \(started)  finished \(c.finished)  to host \(bytes(c.bytesToHost))  to guest \(bytes(c.bytesToGuest))  migrations \(c.migrations)  kills \(c.kills.count)  reconnects \(host.reconnects.figures.reconnects)  failures \(c.failureCount)"
}

/// "RSS supervisor 29 MiB, broker 35 MiB, bridge 24 MiB", for the progress lines.
func residentMemory(_ daemon: Daemon) async -> String {
    guard let status = try? await daemon.status(timeout: .seconds(5)) else { return "RSS: no status" }
    let pids = [("supervisor", daemon.pid)] + status.roles.compactMap { role in role.pid.map { (role.name, $0) } }
    return "RSS " + pids.map { "\($0.0) \(Footprint.of($0.1).map { mib($0.residentKiB) } ?? "-")" }.joined(separator: ", ")
}

func describe(_ footprints: RoleFootprints) -> String {
    footprints.all.map { role, footprint in
        let kinds = footprint.kinds.sorted { $0.key < $1.key }.map { "\($0.value) \($0.key)" }.joined(separator: ", ")
        return "\(role) (pid \(footprint.pid)) \(footprint.descriptors) fds [\(kinds)] \(mib(footprint.residentKiB))"
    }.joined(separator: "; ")
}

func latency(_ samples: [Duration]) -> String {
    guard !samples.isEmpty else { return "no samples" }
    let sorted = samples.map { Double(milliseconds($0 * 1000)) / 1000 }.sorted()
    let mean = sorted.reduce(0, +) / Double(sorted.count)
    func at(_ percentile: Double) -> Double { sorted[min(sorted.count - 1, Int(Double(sorted.count) * percentile))] }
    return "mean \(format(mean)) ms, p50 \(format(at(0.5))) ms, p99 \(format(at(0.99))) ms, max \(format(sorted.last!)) ms (\(sorted.count) samples)"
}

func format(_ value: Double) -> String {
    let scaled = (value * 10).rounded() / 10
    return scaled == scaled.rounded() ? String(Int(scaled)) : String(scaled)
}

func bytes(_ count: UInt64) -> String {
    let value = Double(count)
    if count >= 1 << 30 { return format(value / Double(1 << 30)) + " GiB" }
    if count >= 1 << 20 { return format(value / Double(1 << 20)) + " MiB" }
    if count >= 1 << 10 { return format(value / Double(1 << 10)) + " KiB" }
    return "\(count) B"
}

func mib(_ kib: Int) -> String { format(Double(kib) / 1024) + " MiB" }

func clock(_ duration: Duration) -> String {
    let seconds = Int(duration.components.seconds)
    let rest = String(seconds % 60)
    return "\(seconds / 60)m" + (rest.count < 2 ? "0" : "") + rest + "s"
}

func printError(_ line: String) {
    let text = line + "\n"
    _ = text.withCString { write(2, $0, strlen($0)) }
}

/// An executable built next to this one.
func siblingExecutable(_ name: String) -> String {
    var buffer = [CChar](repeating: 0, count: 4096)
    let length = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    let me = String(decoding: buffer[..<max(0, length)].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    return me.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/") + "/" + name
}

func raiseDescriptorLimit() {
    var limit = rlimit()
    getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
    limit.rlim_cur = limit.rlim_max
    setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
}

/// A fresh directory under /tmp the broker (unprivileged) can reach.
func makeRunDirectory() throws -> String {
    var template = Array("/tmp/holdfast-soak.XXXXXX".utf8CString)
    guard template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) != nil }) else {
        throw SystemError.last("mkdtemp")
    }
    let directory = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    chmod(directory, 0o755)
    return directory
}

/// Removes a run directory: its files (config, log, sockets) and the runc work directory.
func removeTree(_ path: String) {
    guard let directory = opendir(path) else { return }
    var entries: [String] = []
    while let entry = readdir(directory) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        if name != "." && name != ".." { entries.append(name) }
    }
    closedir(directory)
    for name in entries {
        let child = path + "/" + name
        var info = stat()
        if lstat(child, &info) == 0, (info.st_mode & S_IFMT) == S_IFDIR { removeTree(child) } else { unlink(child) }
    }
    rmdir(path)
}

/// A number that differs between runs, for a default seed.
func clockSeed() -> UInt64 {
    var now = timespec()
    clock_gettime(CLOCK_REALTIME, &now)
    return UInt64(truncatingIfNeeded: Int(now.tv_sec) &* 1_000_003 &+ Int(now.tv_nsec))
}
