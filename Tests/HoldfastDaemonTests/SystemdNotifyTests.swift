import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite("The daemon under systemd: sd_notify and upgrades", .timeLimit(.minutes(5)))
struct SystemdNotifyTests {
    /// Starts the daemon as systemd would (NOTIFY_SOCKET, WATCHDOG_USEC of 400 ms) and checks the
    /// whole conversation: READY=1 only once both roles are up, watchdog pings, a status line
    /// when a role dies and comes back, STOPPING=1 on SIGTERM.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own")) func readyWatchdogStatusAndStoppingArriveInOrder() async throws {
        let directory = try TemporaryDirectory("holdfast-notify")
        defer { directory.remove() }
        let systemd = try NotifyListener(path: directory.file("notify.sock"))
        let daemon = try await DaemonFixture(
            environment: ["NOTIFY_SOCKET": systemd.notifySocket, "WATCHDOG_USEC": "400000"], shutdown: ("1s", "50s"))
        defer { daemon.cleanUp() }
        try await eventually("READY=1", timeout: .seconds(10)) { systemd.assignments.contains("READY=1") }
        let atReady = systemd.assignments
        #expect(atReady.filter { $0 == "READY=1" }.count == 1)
        let readyIndex = atReady.firstIndex(of: "READY=1")!
        #expect(atReady.prefix(readyIndex).contains("STATUS=Starting the broker and the bridge worker"))
        #expect(atReady[readyIndex + 1].hasPrefix("STATUS=Ready: broker and bridge worker up; bridge to unix:"), "\(atReady)")
        let status = try await daemon.status()
        #expect(status.roles.count == 2 && status.roles.allSatisfy { $0.pid != nil })

        // Roles must not inherit what only the main process may use.
        for role in status.roles {
            let environ = String(decoding: readFile("/proc/\(role.pid!)/environ") ?? [], as: UTF8.self)
            #expect(!environ.isEmpty, "\(role.name)'s environment is readable")
            #expect(!environ.contains("NOTIFY_SOCKET="), "\(role.name) does not inherit NOTIFY_SOCKET")
            #expect(!environ.contains("WATCHDOG_USEC="), "\(role.name) does not inherit WATCHDOG_USEC")
        }

        // WatchdogSec/2 = 200 ms: pings keep coming (counted, not timed: a loaded machine
        // stretches and bunches them).
        let before = systemd.assignments.filter { $0 == "WATCHDOG=1" }.count
        try await eventually("three more watchdog pings", timeout: .seconds(30)) {
            systemd.assignments.filter { $0 == "WATCHDOG=1" }.count >= before + 3
        }

        // A role dies and comes back: the status line says so.
        let bridge = try #require(try await daemon.rolePID("bridge"))
        kill(bridge, SIGKILL)
        try await eventually("a status line for the restart", timeout: .seconds(10)) {
            systemd.assignments.contains { $0.hasPrefix("STATUS=Ready: the bridge worker was restarted") }
        }
        let lines = systemd.assignments.filter { $0.hasPrefix("STATUS=") }
        #expect(lines.contains("STATUS=The bridge worker died (killed by signal 9 (SIGKILL)); restarting in 100ms"), "\(lines)")

        #expect(try await daemon.stop() == .exited(0))
        let all = systemd.assignments
        let stopping = try #require(all.firstIndex(of: "STOPPING=1"), "\(all)")
        // systemd is asked for the stop's own bound (shutdown.timeout 50 s + 15 s), so a timeout
        // past the unit's TimeoutStopSec= (45 s) is not cut short by its SIGKILL.
        #expect(all[stopping + 1] == "EXTEND_TIMEOUT_USEC=65000000", "\(all)")
        #expect(all[stopping + 2].hasPrefix("STATUS=Shutting down (SIGTERM)"))
        #expect(all.filter { $0 == "READY=1" }.count == 1, "READY=1 once, however often roles restart")
    }

    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own")) func aWatchdogMeantForAnotherProcessIsNotPinged() async throws {
        let directory = try TemporaryDirectory("holdfast-notify")
        defer { directory.remove() }
        let systemd = try NotifyListener(path: "@holdfast-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        let daemon = try await DaemonFixture(environment: [
            "NOTIFY_SOCKET": systemd.notifySocket, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1",
        ])
        defer { daemon.cleanUp() }
        try await eventually("READY=1 through an abstract socket", timeout: .seconds(10)) { systemd.assignments.contains("READY=1") }
        try await Task.sleep(for: .milliseconds(300))
        #expect(!systemd.assignments.contains("WATCHDOG=1"))
        #expect(try await daemon.stop() == .exited(0))
        #expect(systemd.assignments.contains("STOPPING=1"))
    }

    /// A package upgrade replaces /usr/bin/holdfast under a running daemon. A role that dies
    /// afterwards must come back as the binary the supervisor runs (it speaks its protocol),
    /// not as whatever file is at the path now.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own")) func aRoleRestartedAfterItsBinaryWasReplacedRunsTheOriginal() async throws {
        let directory = try TemporaryDirectory("holdfast-upgrade")
        defer { directory.remove() }
        chmod(directory.path, 0o755)
        let installed = directory.file("holdfast")
        try writeFile(installed, try #require(readFile(holdfastExecutable())), mode: 0o755)
        let daemon = try await DaemonFixture(executable: installed)
        defer { daemon.cleanUp() }
        // The upgrade: a new file at the same path (dpkg renames the new one into place).
        try writeFile(installed + ".new", bytes("#!/bin/sh\necho 'not the daemon' >&2\nexit 99\n"), mode: 0o755)
        #expect(rename(installed + ".new", installed) == 0)
        let old = try #require(try await daemon.rolePID("bridge"))
        let killed = ProcessIdentity(old)
        kill(old, SIGKILL)
        try await eventually("the bridge worker back and the bridge up", timeout: .seconds(10)) {
            let report = try await daemon.status()
            let pid = report.roles.first { $0.name == "bridge" }?.pid
            return pid.flatMap(ProcessIdentity.init).map { $0 != killed } == true && report.bridge == .up
        }
        let new = try #require(try await daemon.rolePID("bridge"))
        var buffer = [CChar](repeating: 0, count: 4096)
        let length = readlink("/proc/\(new)/exe", &buffer, buffer.count - 1)
        let exe = String(decoding: buffer[..<max(0, length)].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        #expect(exe == installed + " (deleted)", "the restarted role runs the replaced file's inode: \(exe)")
        #expect(!daemon.log.contains("not the daemon"))
        #expect(try await daemon.stop() == .exited(0))
    }

    /// What `systemctl restart holdfast` does to running containers, measured: SIGTERM to the
    /// supervisor (KillMode=mixed), then a new daemon. Every container process ends (a polite
    /// one on shutdown.signal, a stubborn one on SIGKILL after shutdown.grace); what they wrote
    /// before dying still reaches the host, and so do their exits (the bridge stops after them);
    /// the new daemon's hello lists no processes and no exits, with the same boot id and a new
    /// instance id.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own")) func aServiceRestartEndsEveryContainerProcessAndTheHostSeesThemGone() async throws {
        try await withBridgeDaemon { daemon, exits in
            #expect(await daemon.bridge.waitForGuest(timeout: .seconds(10)))
            let bootID = try #require(daemon.bridge.lastHello?.bootID)
            let marker = daemon.directory.file("trap-set")
            let politeOut = collect(try daemon.streams.open(token: bytes("polite-out"), direction: .receive))
            let polite = try await daemon.bridge.create(ProcessSpec(
                id: "polite",
                argv: ["sh", "-c", "trap 'echo got TERM; exit 3' TERM; echo started; touch \(marker)-polite; while :; do sleep 0.05; done"],
                stdout: daemon.spec("polite-out")))
            let stubborn = try await daemon.bridge.create(ProcessSpec(
                id: "stubborn", argv: ["sh", "-c", "trap '' TERM; touch \(marker)-stubborn; while :; do sleep 0.05; done"]))
            // Not before both shells have set their traps.
            try await eventually("both traps set") { access(marker + "-polite", F_OK) == 0 && access(marker + "-stubborn", F_OK) == 0 }

            let stopping = ContinuousClock.now
            #expect(try await daemon.stop() == .exited(0))
            let stopTook = ContinuousClock.now - stopping
            print("daemon stopped in \(stopTook) (shutdown.grace 1s in the fixture)")
            #expect(stopTook >= .milliseconds(900), "the stubborn process held the shutdown until SIGKILL after the grace period")
            #expect(kill(polite, 0) != 0 && kill(stubborn, 0) != 0, "both container processes are gone")
            #expect(await politeOut.value == bytes("started\ngot TERM\n"), "output written while stopping still reached the host")
            // The bridge stops after the processes: their exits reached the host, once each.
            try await eventually("both exits at the host") { exits.count("polite") == 1 && exits.count("stubborn") == 1 }
            #expect(exits.all.first { $0.id == "polite" }.map { [$0.exitCode, Int32($0.undelivered)] } == [3, 0])
            #expect(exits.all.first { $0.id == "stubborn" }?.signal == SIGKILL)
            let instance = try #require(daemon.bridge.lastHello?.instanceID)

            // The new daemon (what systemd starts next).
            let before = daemon.bridge.acceptedConnections
            let log = open(daemon.directory.file("daemon2.log"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            _ = try daemon.processes.start(
                [holdfastExecutable(), "daemon", "--config", daemon.directory.file("holdfast.yaml")], stdout: log, stderr: log)
            close(log)
            try await eventually("the new daemon's hello", timeout: .seconds(20)) { daemon.bridge.acceptedConnections > before }
            let hello = try #require(daemon.bridge.lastHello)
            #expect(hello.processes.isEmpty && hello.exits.isEmpty, "the new daemon knows nothing of them: \(hello)")
            #expect(hello.bootID == bootID, "same boot id")
            #expect(hello.instanceID != nil && hello.instanceID != instance, "a new instance id: the daemon restarted")
        }
    }
}
