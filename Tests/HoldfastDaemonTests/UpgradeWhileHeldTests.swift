import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite("Live upgrade: a broker still taking the streams over, a container holding its pipe lock", .timeLimit(.minutes(5)))
struct UpgradeWhileHeldTests {
    /// A container holds its stdin pipe's lock and a broker thread waits for it in the kernel: a
    /// broker stopped then could not finish exiting until the holder lets go, and the upgrade
    /// waited that long (58 s here, the holder letting go after 60 s; for ever for one that never
    /// does, the daemon refusing creates meanwhile). Now the upgrade waits 10 s, then does not
    /// happen and says why; the broker serves on untouched; once the holder let go, the upgrade
    /// goes through and the holder's stdin arrives whole.
    /// An upgrade that comes while a restarted broker is still being handed the streams waits
    /// for it, and it quiesces: found by the soak, where such an upgrade found no broker to ask,
    /// and the broker was SIGKILLed after 5 s instead ("did not quiesce cleanly").
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func anUpgradeDuringABrokersTakeOverWaitsForItAndItQuiesces() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let go = daemon.directory.file("go")
        var outputs: [String: Task<[UInt8], Never>] = [:]
        for index in 0..<16 {
            let id = "t\(index)"
            outputs[id] = collect(try daemon.streams.open(token: bytes("\(id)-out"), direction: .receive))
            _ = try await daemon.launch(ProcessSpec(
                id: id, argv: ["sh", "-c", "while [ ! -e \(go) ]; do sleep 0.2; done; echo \(id) done"], stdout: daemon.spec("\(id)-out")))
        }
        let broker = try #require(try await daemon.rolePID("broker"))
        var offset = (readFile(daemon.logPath) ?? []).count
        kill(broker, SIGKILL)
        // Its successor, stopped as soon as it was handed its first process: the take-over is
        // under way, and stays so while the upgrade begins.
        var successor: pid_t?
        let deadline = ContinuousClock.now + .seconds(30)
        while successor == nil && ContinuousClock.now < deadline {
            let tail = BrokerCrashReadoptionTests.logTail(daemon.logPath, from: offset)
            offset = tail.end
            if let line = tail.text.split(separator: "\n").first(where: { $0.contains("resumed streams the previous broker held") }),
                let field = line.split(separator: " ").first(where: { $0.hasPrefix("pid=") })
            {
                successor = pid_t(field.dropFirst(4))
                if let successor { kill(successor, SIGSTOP) }
            } else {
                // A millisecond's sleep, not a busy usleep: this loop runs on the concurrency
                // pool, whose threads the daemon fixture's and other tests' tasks need.
                try await Task.sleep(for: .milliseconds(1))
            }
        }
        let stopped = try #require(successor, "the successor was handed a process within 30 s")
        let pinned = PinnedProcess(stopped)
        defer { pinned?.signal(SIGCONT) }
        let upgrade = Task { try await runUpgrade(daemon, processes: daemon.processes) }
        try await Task.sleep(for: .seconds(1))
        kill(stopped, SIGCONT)
        let outcome = try await upgrade.value
        #expect(outcome.status == .exited(0), "\(outcome.output)")
        try await daemon.waitForLog("quiesced for a live upgrade: every stream settled")
        #expect(!daemon.log.contains("did not quiesce cleanly"))
        try writeFile(go, [])
        for (id, output) in outputs {
            #expect(await output.value == bytes("\(id) done\n"), "\(id)'s output exact")
            #expect(try await daemon.wait(id).exitCode == 0)
        }
        #expect(try await daemon.stop() == .exited(0))
    }

    @Test(.enabled(if: DaemonFixture.canRun && ContainmentTests.hasPython, "needs root (a kernel-mode userfaultfd fault) and python3"))
    func anUpgradeDoesNotWaitForAProcessThatHoldsItsPipesLock() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let holder = try await StdinHolder.start(in: daemon)
        try await holder.input.send(bytes("second\n"))
        try await eventually("the broker's watchdog to take over") { daemon.log.contains("I/O thread stuck in the kernel") }
        let brokerPID = try #require(try await daemon.rolePID("broker"))
        let broker = try #require(ProcessIdentity(brokerPID))

        let refused = try await runUpgrade(daemon, processes: daemon.processes)
        print("the upgrade while the lock is held: \(refused.status): \(refused.output)")
        #expect(refused.status == .exited(1), "\(refused.output)")
        #expect(refused.output.contains("for a pipe lock a container process holds"), "\(refused.output)")
        #expect(try await daemon.status().upgrades ?? 0 == 0)
        let another = try await daemon.roleIsAnother("broker", than: broker)
        #expect(broker.isAlive && !another, "the same broker serves on")
        let bystander = collect(try daemon.streams.open(token: bytes("by-out"), direction: .receive))
        _ = try await daemon.launch(ProcessSpec(id: "by", argv: counterCommand(100, prefix: "by"), stdout: daemon.spec("by-out")))
        #expect(try await daemon.wait("by").exitCode == 0)
        #expect(await bystander.value == expectedLines(100, prefix: "by"), "a process started after it streams every line")

        // Let go: the upgrade's own wait sees the thread come back.
        try writeFile(holder.release, [])
        let upgraded = try await runUpgrade(daemon, processes: daemon.processes)
        #expect(upgraded.status == .exited(0), "once the holder let go: \(upgraded.output)")
        #expect(await holder.input.finish() == 0)
        #expect(try await daemon.wait("holder").exitCode == 0)
        #expect(await holder.output() == bytes("ready\nholding\necho:first\nsecond\n"), "the holder's stdin whole")
        #expect(try await daemon.stop() == .exited(0))
    }
}
