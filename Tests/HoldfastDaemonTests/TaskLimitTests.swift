import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import NIOConcurrencyHelpers
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A guest with no task left: a container's fork bomb, or a pids limit on the daemon's cgroup
/// (a unit's `TasksMax=`) reached. Every fork fails with EAGAIN until processes end. The
/// daemon cannot start anything then, but what runs must go on, and what could not be started
/// must be said for what it is and come back by itself.
@Suite("No task left in the guest: creates refused saying why, streams go on, roles come back", .timeLimit(.minutes(3)))
struct TaskLimitTests {
    @Test(.enabled(if: DaemonFixture.canRun && PidsLimit.available, "needs root and a pids cgroup controller"))
    func aGuestWithNoTaskLeftRefusesCreatesAndLosesNothing() async throws {
        // Made first, removed last: the daemon's processes leave it when they end.
        let limit = try PidsLimit()
        defer { limit.remove() }
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let id = "echo"
        let output = try daemon.streams.open(token: bytes("\(id)-out"), direction: .receive)
        let input = try daemon.streams.open(token: bytes("\(id)-in"), direction: .send)
        let received = accumulate(output)
        let exits = NIOLockedValueBox<[ExitReport]>([])
        let exitWatch = Task {
            for await exit in daemon.bridge.exits { exits.withLockedValue { $0.append(exit) } }
        }
        defer { exitWatch.cancel() }
        // `cat` forks nothing: it echoes whatever the host types, limit or not.
        _ = try await daemon.bridge.create(ProcessSpec(id: id, argv: ["cat"], stdin: daemon.spec("\(id)-in"), stdout: daemon.spec("\(id)-out")))
        for pid in [daemon.daemonPID, try await daemon.rolePID("broker"), try await daemon.rolePID("bridge")].compactMap({ $0 }) {
            try limit.add(pid)
        }
        var sent: [UInt8] = []
        var number = 0
        func type(_ lines: Int) async throws {
            for _ in 0..<lines {
                number += 1
                let line = bytes("typed \(number)\n")
                try await input.send(line)
                sent += line
            }
        }
        try await type(100)
        try await eventually("the first lines echoed") { received.bytes.count == sent.count }

        // No task left from here on: the limit under what the daemon's cgroup holds already.
        try limit.set("1")
        func pipes() async -> [Int32: String] { await settledDescriptorTable(pid: daemon.daemonPID).filter { $0.value.hasPrefix("pipe:") } }
        let pipesBefore = await pipes()
        do {
            let pid = try await daemon.bridge.create(ProcessSpec(id: "refused", argv: ["true"], stdout: daemon.spec("refused-out")))
            Issue.record("a create was served with no task left: pid \(pid)")
        } catch {
            #expect(error.code == .tooManyProcesses, "\(error)")
            #expect(error.message.contains("Resource temporarily unavailable (errno \(EAGAIN))"), "the fork's own errno: \(error)")
        }
        let pipesAfter = await pipes()
        #expect(pipesAfter == pipesBefore, "the refused create's pipes closed: \(pipesBefore) then \(pipesAfter)")
        #expect(try await !daemon.brokerStreams().contains { $0.process == "refused" }, "nothing of it at the broker")
        // A live upgrade cannot check its new binary: it says why (not that the binary is bad).
        let upgrade = try await runUpgrade(daemon, processes: daemon.processes)
        #expect(upgrade.status == .exited(1), "\(upgrade.output)")
        #expect(upgrade.output.contains("could not be started to be checked: cannot start") && upgrade.output.contains("no task left"), "\(upgrade.output)")
        try await type(100)
        try await eventually("lines typed with no task left echoed") { received.bytes.count == sent.count }

        // Both roles die and cannot be started again: the supervisor says why and keeps trying.
        let oldRoles = try await (broker: daemon.rolePID("broker").flatMap(ProcessIdentity.init), bridge: daemon.rolePID("bridge").flatMap(ProcessIdentity.init))
        for role in ["broker", "bridge"] { kill(try #require(try await daemon.rolePID(role)), SIGKILL) }
        for role in ["broker", "bridge"] {
            try await daemon.waitForLog("cannot start role error=cannot start /proc/self/exe: fork failed: Resource temporarily unavailable (errno \(EAGAIN)) pid=\(daemon.daemonPID) role=\(role)")
        }
        let report = try await daemon.status()
        #expect(report.roles.allSatisfy { $0.pid == nil }, "neither role runs: \(report.roles)")
        try await type(100)  // waits at the host for a broker

        // Tasks again: both roles come back by themselves, the stream resumes with every byte once.
        try limit.set("max")
        try await eventually("a new broker and a new bridge worker", timeout: .seconds(30)) {
            let broker = try await daemon.roleIsAnother("broker", than: oldRoles.broker)
            let bridge = try await daemon.roleIsAnother("bridge", than: oldRoles.bridge)
            return broker && bridge
        }
        try await type(100)
        #expect(await input.finish() == 0)
        try await eventually("the exit", timeout: .seconds(60)) { exits.withLockedValue { $0 }.contains { $0.id == id } }
        try await Task.sleep(for: .milliseconds(500))  // a repeat would come within moments
        let reported = exits.withLockedValue { $0 }.filter { $0.id == id }
        #expect(reported.count == 1 && reported.first?.exitCode == 0 && reported.first?.outputCutShort == nil, "one exit, 0: \(reported)")
        try await eventually("the echo's end") { output.statistics.ended }
        #expect(received.bytes == sent, "every typed line echoed once, in order: \(received.bytes.count) of \(sent.count) bytes")
        #expect(output.statistics.lost.bytes == 0)
        _ = try await daemon.bridge.create(ProcessSpec(id: "after", argv: ["true"]))
        try await eventually("a create served again, its exit") { exits.withLockedValue { $0 }.contains { $0.id == "after" && $0.exitCode == 0 } }
        #expect(!exits.withLockedValue { $0 }.contains { $0.id == "refused" }, "the refused create has no exit")
        #expect(try await daemon.stop() == .exited(0))
    }

    /// A runc create with no task left: runc could not be started, which is not a missing runc
    /// (`runtime-missing` said so before); the same create once there are tasks again runs.
    @Test(.enabled(if: DaemonFixture.canRun && PidsLimit.available && TestBundle.canRun, "needs root, a pids cgroup controller, runc and busybox-static"))
    func aRuncCreateWithNoTaskLeftIsRefusedForThatNotForAMissingRunc() async throws {
        let limit = try PidsLimit()
        defer { limit.remove() }
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let bundle = try TestBundle(in: daemon.directory, name: "hello", args: ["echo", "hello"], terminal: false)
        let output = collect(try daemon.streams.open(token: bytes("hello-out"), direction: .receive))
        let spec = ProcessSpec(id: "hello", argv: [], stdout: daemon.spec("hello-out"), runtime: .runc, bundle: bundle.path)
        try limit.add(daemon.daemonPID)
        try limit.set("1")
        do {
            let pid = try await daemon.bridge.create(spec)
            Issue.record("a runc create was served with no task left: pid \(pid)")
        } catch {
            #expect(error.code == .tooManyProcesses, "\(error)")
            #expect(error.message.contains("cannot start runc: fork failed: Resource temporarily unavailable"), "\(error)")
        }
        try limit.set("max")
        _ = try await daemon.bridge.create(spec)
        try await eventually("its exit", timeout: .seconds(30)) { exits.count("hello") == 1 }
        #expect(try await withTimeout("its stdout", .seconds(30)) { await output.value } == bytes("hello\n"))
        #expect(exits.all.first { $0.id == "hello" }?.exitCode == 0)
        #expect(try await daemon.stop() == .exited(0))
    }

    /// A runc container the host kills while the guest has no task to start runc with (a fork
    /// bomb's doing, often the container's own): the signal goes to the container's init
    /// directly, and its exit comes. Before, the kill was refused `too-many-processes` ("try
    /// again once processes end"): a runaway container could not be killed from the host.
    @Test(.enabled(if: DaemonFixture.canRun && PidsLimit.available && TestBundle.canRun, "needs root, a pids cgroup controller, runc and busybox-static"))
    func aRuncContainerIsKilledEvenWithNoTaskToStartRuncWith() async throws {
        let limit = try PidsLimit()
        defer { limit.remove() }
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let bundle = try TestBundle(in: daemon.directory, name: "web", args: ["sleep", "1000"], terminal: false)
        _ = try await daemon.bridge.create(ProcessSpec(id: "web", argv: [], runtime: .runc, bundle: bundle.path))
        try limit.add(daemon.daemonPID)
        try limit.set("1")
        try await daemon.bridge.signal("web", SIGKILL)
        try await eventually("its exit", timeout: .seconds(30)) { exits.count("web") == 1 }
        #expect(exits.all.first { $0.id == "web" }?.signal == SIGKILL, "\(exits.all)")
        try limit.set("max")
        // Its line reaches the file through the log's writer thread, maybe after the exit.
        try await daemon.waitForLog("the signal sent to the container's init directly")
        #expect(try await daemon.stop() == .exited(0))
    }
}

/// A pids cgroup of the test's own (cgroup v1's pids hierarchy, or the unified one's pids
/// controller), into which the test moves the daemon's processes: what they fork from then on is
/// counted in it, and `set` changes its limit.
struct PidsLimit: Sendable {
    let path: String

    private static var root: String? {
        if access("/sys/fs/cgroup/pids/cgroup.procs", W_OK) == 0 { return "/sys/fs/cgroup/pids" }
        let controllers = String(decoding: readFile("/sys/fs/cgroup/cgroup.subtree_control") ?? [], as: UTF8.self)
        return controllers.split(whereSeparator: \.isWhitespace).contains("pids") ? "/sys/fs/cgroup" : nil
    }

    static var available: Bool { geteuid() == 0 && root != nil }

    init() throws {
        guard let root = Self.root else { throw SystemError("no pids cgroup controller", errno: .noSuchFileOrDirectory) }
        path = "\(root)/holdfast-test-tasks-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        guard mkdir(path, 0o755) == 0 else { throw SystemError.last("mkdir(\(path))") }
    }

    func add(_ pid: pid_t) throws { try write("cgroup.procs", "\(pid)") }

    /// "max", or a count (under the cgroup's current count: no fork succeeds in it).
    func set(_ value: String) throws { try write("pids.max", value) }

    private func write(_ file: String, _ value: String) throws {
        let fd = open("\(path)/\(file)", O_WRONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError.last("open(\(path)/\(file))") }
        defer { close(fd) }
        let written = value.withCString { Glibc.write(fd, $0, strlen($0)) }
        guard written >= 0 else { throw SystemError.last("write(\(path)/\(file), \(value))") }
    }

    /// Removes the cgroup once the processes in it have ended (the fixture ends them by pid):
    /// whatever is still there is moved back to the root first.
    func remove() {
        try? set("max")
        for _ in 0..<100 {
            if rmdir(path) == 0 || errno == ENOENT { return }
            let procs = String(decoding: readFile("\(path)/cgroup.procs") ?? [], as: UTF8.self)
            let root = String(path[..<(path.lastIndex(of: "/") ?? path.endIndex)])
            for pid in procs.split(separator: "\n") {
                let fd = open("\(root)/cgroup.procs", O_WRONLY | O_CLOEXEC)
                if fd >= 0 {
                    _ = pid.withCString { Glibc.write(fd, $0, strlen($0)) }
                    close(fd)
                }
            }
            usleep(20_000)
        }
    }
}
