import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import NIOConcurrencyHelpers
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// What an unprivileged process in the guest must not be able to do to the broker — take its
/// fds, trace it, read its memory, signal it — and what the daemon refuses so that it cannot:
/// a broker uid another process uses, a run directory another user could write in, a second
/// daemon on the same directory. And each rule of the broker's seccomp filter, refused and
/// allowed, from a process that loads the same profile.
@Suite("The broker's uid is its own, its filter is tight, its run directory is ours", .timeLimit(.minutes(5)))
struct BrokerLockdownTests {
    static let nobody: uid_t = 65534

    // MARK: The seccomp filter, rule by rule

    enum Outcome: Sendable, Equatable, CustomStringConvertible {
        /// SIGSYS: the filter's default action.
        case killed
        /// The call fails with this errno; the process carries on.
        case refused(Int32)
        case allowed

        var description: String {
            switch self {
            case .killed: return "killed"
            case .refused(let error): return "refused with errno \(error)"
            case .allowed: return "allowed"
            }
        }
    }

    /// Every rule the broker's filter has beyond the plain allow-list, each way.
    static let rules: [(attempt: String, outcome: Outcome)] = [
        ("ioctl-window-size", .allowed), ("ioctl-fionread", .allowed), ("ioctl-other", .refused(ENOTTY)),
        ("ioctl-between", .refused(ENOTTY)),
        ("tgkill-self", .allowed), ("tgkill-other", .killed), ("kill-other", .killed),
        ("prlimit-read-self", .allowed), ("prlimit-write-self", .killed), ("prlimit-other", .killed),
        ("sched-setaffinity", .killed),
        ("setpriority", .allowed), ("setpriority-other", .killed), ("setpriority-group", .killed),
        ("bind", .killed), ("listen", .killed), ("socket-unix", .allowed),
        ("mmap-exec", .refused(EPERM)), ("mprotect-exec", .refused(EPERM)), ("mmap-writable", .allowed),
        ("set-dumpable", .killed),
    ]

    /// Runs `holdfast seccomp-probe` and returns how it ended and what it printed.
    static func probe(_ attempt: String, action: String = "kill") async throws -> (HoldfastPosix.ExitStatus, String) {
        let directory = try TemporaryDirectory("holdfast-probe")
        defer { directory.remove() }
        let processes = TestProcesses()
        defer { processes.killAll() }
        let out = open(directory.file("out"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        let pid = try processes.start([holdfastExecutable(), "seccomp-probe", "--action", action, attempt], stdout: out, stderr: out)
        close(out)
        let status = try await processes.wait(pid, timeout: .seconds(30))
        return (status, String(decoding: readFile(directory.file("out")) ?? [], as: UTF8.self))
    }

    // One probe at a time: 19 processes started at once would starve the daemons of the tests
    // running beside these.
    @Test(.serialized, arguments: zip(Self.rules.map(\.attempt), Self.rules.map(\.outcome)))
    func eachRuleOfTheBrokersFilter(attempt: String, outcome: Outcome) async throws {
        let (status, printed) = try await Self.probe(attempt)
        switch outcome {
        case .killed:
            #expect(status == .signaled(SIGSYS), "\(attempt) must be fatal under the filter: \(status), \(printed)")
        case .refused(let error):
            #expect(status == .exited(1) && printed.contains("refused: errno \(error)"), "\(attempt): \(status), \(printed)")
        case .allowed:
            #expect(status == .exited(0) && printed.contains("ok"), "\(attempt) is what the broker needs: \(status), \(printed)")
        }
    }

    /// `broker.seccomp: log` lets every call through (and audits it): refusals answer no error.
    @Test(.serialized, arguments: ["ioctl-other", "mmap-exec", "bind", "setpriority-other"])
    func underLogEveryRuleOnlyAudits(attempt: String) async throws {
        let (status, printed) = try await Self.probe(attempt, action: "log")
        #expect(status == .exited(0), "\(attempt) under log: \(status), \(printed)")
    }

    // MARK: Another uid against the broker

    /// An unprivileged process of another uid (`nobody`, and a uid of the reserved range) tries
    /// what an attacker in the guest did: `pidfd_getfd` on every fd of the broker (a root
    /// container's stdin among them), `ptrace` attach, /proc/PID/mem, SIGSTOP and SIGKILL.
    /// Every attempt is refused, the broker keeps its pid, and a counter streamed to the host
    /// and lines typed into a process's stdin arrive exactly.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon and the other uids"))
    func anotherUIDCannotTakeTraceReadOrSignalTheBroker() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let bystander = try await ContainmentTests.startBystander(daemon)
        let typed = try daemon.streams.open(token: bytes("victim-in"), direction: .send)
        let echoed = collect(try daemon.streams.open(token: bytes("victim-out"), direction: .receive))
        _ = try await daemon.launch(ProcessSpec(
            id: "victim", argv: ["cat"], stdin: daemon.spec("victim-in"), stdout: daemon.spec("victim-out")))
        let before = try await ContainmentTests.roles(daemon)
        let broker = try #require(before["broker"]?.pid)
        let lines = expectedLines(200, prefix: "typed")
        try await typed.send(Array(lines.prefix(lines.count / 2)))

        var attackers = [Self.nobody, ReservedUIDs.unused()]
        attackers.removeAll { $0 == daemon.brokerUID }
        for uid in attackers {
            let out = daemon.directory.file("reach-\(uid).out")
            let fd = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            let probe = try readableByOthers(holdfastExecutable(), copyInto: daemon.directory.path)
            let pid = try daemon.processes.start([probe, "reach-probe", "--pid", String(broker)], stdout: fd, stderr: fd, user: uid)
            close(fd)
            let status = try await daemon.processes.wait(pid, timeout: .seconds(30))
            let printed = String(decoding: readFile(out) ?? [], as: UTF8.self)
            print("reach-probe as uid \(uid) on the broker (pid \(broker), uid \(daemon.brokerUID)):\n\(printed)")
            #expect(status == .exited(0), "every attempt refused: \(printed)")
            for attempt in ["pidfd_getfd", "ptrace(PTRACE_ATTACH)", "kill(0)", "kill(SIGSTOP)", "kill(SIGKILL)"] {
                #expect(printed.contains("\(attempt): refused, errno \(EPERM)\n"), "\(attempt) as uid \(uid): EPERM")
            }
            for attempt in ["open /proc/PID/mem for reading", "open /proc/PID/mem for writing"] {
                #expect(
                    printed.contains("\(attempt): refused, errno \(EACCES)\n") || printed.contains("\(attempt): refused, errno \(EPERM)\n"),
                    "\(attempt) as uid \(uid)")
            }
        }
        try await typed.send(Array(lines.suffix(from: lines.count / 2)))
        _ = await typed.finish()
        #expect(await echoed.value == lines, "the victim's stdin and stdout, byte for byte")
        #expect((try await daemon.wait("victim")).exitCode == 0)
        try await ContainmentTests.expectIntact(daemon, roles: before, bystander: bystander)
        #expect(try await daemon.stop() == .exited(0))
    }

    /// Runs `holdfast reach-probe --pid target` as `uid` and returns what it printed.
    static func reach(_ processes: TestProcesses, _ target: pid_t, as uid: uid_t, in directory: TemporaryDirectory) async throws -> String {
        let out = directory.file("reach-\(uid)-\(target).out")
        let fd = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        // The checkout may be in a directory only its owner can enter (a 0700 home).
        let probe = try readableByOthers(holdfastExecutable(), copyInto: directory.path)
        let pid = try processes.start([probe, "reach-probe", "--pid", String(target)], stdout: fd, stderr: fd, user: uid)
        close(fd)
        _ = try await processes.wait(pid, timeout: .seconds(30))
        return String(decoding: readFile(out) ?? [], as: UTF8.self)
    }

    /// Yama (kernel.yama.ptrace_scope ≥ 1) restricts ptrace and pidfd_getfd between processes
    /// of one uid on its own; without it only dumpability and uids decide.
    static var yamaRestrictsPtrace: Bool {
        guard let text = readFile("/proc/sys/kernel/yama/ptrace_scope") else { return false }
        return String(decoding: text, as: UTF8.self).hasPrefix("0") == false
    }

    /// Why the uid must be the broker's own, layer by layer. A process of the same uid takes a
    /// dumpable process's fds, traces it, writes its memory and kills it (the attack on a broker
    /// run as `nobody`); the broker, non-dumpable, refuses it everything but signals — which
    /// only a uid of its own (or `broker.allow_shared_uid: false`, the default) keeps out.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: processes as other uids"))
    func aSharedUIDReachesADumpableProcessAndCanStillSignalANonDumpableBroker() async throws {
        let directory = try TemporaryDirectory("holdfast-same-uid")
        defer { directory.remove() }
        chmod(directory.path, 0o755)
        let processes = TestProcesses()
        defer { processes.killAll() }
        let uid = ReservedUIDs.unused()
        let dumpable = try processes.start(["sleep", "300"], user: uid)
        let printed = try await Self.reach(processes, dumpable, as: uid, in: directory)
        print("reach-probe as the same uid on a dumpable process:\n\(printed)")
        if !Self.yamaRestrictsPtrace {
            for attempt in ["pidfd_getfd(fd 0)", "ptrace(PTRACE_ATTACH)", "open /proc/PID/mem for writing"] {
                #expect(printed.contains("\(attempt): SUCCEEDED"), "\(attempt) on a dumpable process of the same uid")
            }
        }
        #expect(printed.contains("kill(SIGKILL): SUCCEEDED"))
        #expect(try await processes.wait(dumpable, timeout: .seconds(30)) == .signaled(SIGKILL))

        // The broker, told to share its uid: nothing but signals gets through.
        let daemon = try await DaemonFixture(environment: ["HOLDFAST_BROKER_ALLOW_SHARED_UID": "true"])
        defer { daemon.cleanUp() }
        let broker = try #require(try await daemon.rolePID("broker"))
        let killedBroker = ProcessIdentity(broker)
        let onBroker = try await Self.reach(daemon.processes, broker, as: daemon.brokerUID, in: directory)
        print("reach-probe as the broker's own uid on the broker:\n\(onBroker)")
        for attempt in ["pidfd_getfd", "ptrace(PTRACE_ATTACH)"] {
            #expect(onBroker.contains("\(attempt): refused, errno \(EPERM)\n"), "\(attempt): the broker is not dumpable")
        }
        for attempt in ["open /proc/PID/mem for reading", "open /proc/PID/mem for writing"] {
            #expect(onBroker.contains("\(attempt): refused"), "\(attempt): the broker is not dumpable")
        }
        #expect(onBroker.contains("kill(SIGKILL): SUCCEEDED"), "a shared uid can kill the broker: why it must be its own")
        try await eventually("the killed broker restarted") {
            try await daemon.roleIsAnother("broker", than: killedBroker)
        }
        #expect(try await daemon.stop() == .exited(0))
    }

    // MARK: A broker uid another process uses

    /// A daemon configuration for the refusal tests: the run directory and the broker's uid.
    static func writeConfig(_ directory: TemporaryDirectory, run: String, brokerUID: uid_t) throws -> String {
        // A bridge key of root's beside the config (not in the run directory under test).
        _ = try BridgeKeyFile.loadOrCreate(directory.file("bridge.key"))
        let config = """
            run_directory: \(run)
            bridge:
              address: "unix:{run}/host-bridge.sock"
              key_file: "\(directory.file("bridge.key"))"
            broker:
              user: "uid:\(brokerUID)"
            shutdown:
              grace: 1s
              timeout: 5s
            """
        try writeFile(directory.file("holdfast.yaml"), bytes(config))
        return directory.file("holdfast.yaml")
    }

    /// Starts `holdfast daemon --config FILE`, its output in `log`.
    static func startDaemon(_ processes: TestProcesses, config: String, log: String) throws -> pid_t {
        let fd = open(log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        defer { close(fd) }
        return try processes.start([holdfastExecutable(), "daemon", "--config", config], stdout: fd, stderr: fd)
    }

    @Test(.enabled(if: DaemonFixture.canRun, "needs root: a process as the broker's uid"))
    func theDaemonRefusesABrokerUIDAnotherProcessRunsAs() async throws {
        let directory = try TemporaryDirectory("holdfast-shared-uid")
        defer { directory.remove() }
        chmod(directory.path, 0o755)
        let processes = TestProcesses()
        defer { processes.killAll() }
        let uid = ReservedUIDs.unused()
        let squatter = try processes.start(["sleep", "300"], user: uid)
        #expect(ProcessScan.processes(withUID: uid) == [squatter])
        let config = try Self.writeConfig(directory, run: directory.file("run"), brokerUID: uid)
        let daemon = try Self.startDaemon(processes, config: config, log: directory.file("log"))
        // The refusal takes well under a second; the bound is for the runner: amid the full
        // suite on two cores, the task that reaps the daemon waited behind other tests' work
        // for over 30 s once (measured: the daemon itself had exited after 0.08–0.3 s).
        func logs() -> String {
            ["log", "log2"].map { "\($0): " + String(decoding: readFile(directory.file($0)) ?? [], as: UTF8.self) }.joined(separator: "\n")
        }
        do {
            #expect(try await processes.wait(daemon, timeout: .seconds(120)) == .exited(2), "refused like a bad configuration")
        } catch {
            Issue.record("\(error)\n\(logs())")
            return
        }
        let log = String(decoding: readFile(directory.file("log")) ?? [], as: UTF8.self)
        #expect(log.contains("refusing to start: broker.user 'uid:\(uid)' (uid \(uid)) is not the broker's own: pid \(squatter) (sleep)"), "\(log)")
        #expect(kill(squatter, 0) == 0, "the other process was left alone")

        // Once it is gone, the same configuration starts, and the broker has the uid.
        processes.kill(squatter)
        let second = try Self.startDaemon(processes, config: config, log: directory.file("log2"))
        try await eventually("the broker under its uid") {
            let broker = ProcessScan.processes(withUID: uid)
            return broker.count == 1 && ProcessScan.uids(of: broker[0]) == [uid, uid, uid, uid]
        }
        kill(second, SIGTERM)
        do {
            #expect(try await processes.wait(second, timeout: .seconds(120)) == .exited(0))
        } catch {
            Issue.record("\(error)\n\(logs())")
        }
    }

    /// The check runs before every restart too: a broker that died is not started again while
    /// another process has its uid, and is as soon as that process is gone.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: a process as the broker's uid"))
    func aBrokerIsNotRestartedWhileAnotherProcessHasItsUID() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let first = try #require(try await daemon.rolePID("broker"))
        let squatter = try daemon.processes.start(["sleep", "300"], user: daemon.brokerUID)
        kill(first, SIGKILL)
        try await eventually("the restart refused, naming the other process") {
            daemon.log.contains("cannot start role") && daemon.log.contains("pid \(squatter) (sleep)")
        }
        #expect(try await daemon.rolePID("broker") == nil, "no broker while the uid is shared")
        daemon.processes.kill(squatter)
        try await eventually("the broker back once the uid is free") {
            let pid = try await daemon.rolePID("broker")
            return pid != nil && pid != first
        }
        let broker = try #require(try await daemon.rolePID("broker"))
        let uid = daemon.brokerUID
        #expect(ProcessScan.uids(of: broker) == [uid, uid, uid, uid])
        #expect(try await daemon.stop() == .exited(0))
    }

    /// Nor does the supervisor start a container process as the broker's uid: a runc bundle
    /// whose process runs as it, directly or mapped from a user namespace, is refused before
    /// runc runs.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root"))
    func noContainerProcessIsStartedAsTheBrokersUID() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let uid = daemon.brokerUID
        let bundles: [(String, String)] = [
            ("as-the-broker", #"{"process": {"user": {"uid": \#(uid), "gid": 0}, "args": ["true"]}}"#),
            ("mapped-to-the-broker", #"{"process": {"user": {"uid": 0}}, "linux": {"uidMappings": [{"containerID": 0, "hostID": \#(uid), "size": 1}]}}"#),
            // Its process runs as another uid, but in the guest's pid namespace with the
            // broker's uid in its user namespace: its root could take it (setuid) and signal
            // the broker.
            (
                "mapping-the-broker",
                #"{"process": {"user": {"uid": 0}}, "linux": {"uidMappings": [{"containerID": 0, "hostID": \#(uid - 5), "size": 10}]}}"#
            ),
        ]
        for (name, config) in bundles {
            mkdir(daemon.directory.file(name), 0o755)
            try writeFile(daemon.directory.file(name + "/config.json"), bytes(config))
            do {
                _ = try await daemon.launch(ProcessSpec(id: name, argv: [], runtime: .runc, bundle: daemon.directory.file(name)))
                Issue.record("\(name): started as the broker's uid")
            } catch let error as HoldfastError {
                #expect(error.code == .badUser && error.message.contains("the broker's"), "\(name): \(error)")
            }
        }
        // A direct process given the broker's uid as a bare number (no entry in the password
        // database: a number is taken as it is) is refused the same way.
        do {
            _ = try await daemon.launch(ProcessSpec(id: "direct-as-the-broker", argv: ["true"], user: String(uid)))
            Issue.record("a direct process started as the broker's uid")
        } catch let error as HoldfastError {
            #expect(error.code == .badUser && error.message.contains("the broker's"), "\(error)")
        }
        #expect(try await daemon.status().processes.isEmpty)
        #expect(try await daemon.stop() == .exited(0))
    }

    // MARK: The run directory

    /// The attack that worked: `nobody` made the run directory beforehand (mode 0777) and put a
    /// fake control.sock in it. The daemon and `host serve` refuse the directory (exit 2, the
    /// reason), leave the socket alone, and root's `holdfast status` refuses to talk to it.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the directory belongs to another user"))
    func aHostileRunDirectoryIsRefusedAndItsSocketNeverReached() async throws {
        let base = try TemporaryDirectory("holdfast-hostile")
        defer { base.remove() }
        let run = base.file("run")
        mkdir(run, 0o777)
        chmod(run, 0o777)
        chown(run, Self.nobody, Self.nobody)
        // The attacker's control socket, listening, counting who connects.
        let fake = try Listener(binding: .unix(path: run + "/control.sock"), kind: .seqpacket, unixMode: 0o777)
        defer { fake.close() }
        chown(run + "/control.sock", Self.nobody, Self.nobody)
        let connections = NIOLockedValueBox(0)
        let accepting = Task {
            while let connection = try? await fake.accept() {
                connections.withLockedValue { $0 += 1 }
                connection.close()
            }
        }
        defer { accepting.cancel() }
        var before = stat()
        lstat(run + "/control.sock", &before)
        let processes = TestProcesses()
        defer { processes.killAll() }

        let config = try Self.writeConfig(base, run: run, brokerUID: ReservedUIDs.unused())
        let daemon = try Self.startDaemon(processes, config: config, log: base.file("daemon.log"))
        #expect(try await processes.wait(daemon, timeout: .seconds(30)) == .exited(2))
        let daemonLog = String(decoding: readFile(base.file("daemon.log")) ?? [], as: UTF8.self)
        #expect(daemonLog.contains("refusing to start: run directory: \(run) is owned by uid 65534 (nobody), not by uid 0 (root)"), "\(daemonLog)")

        let serveLog = open(base.file("serve.log"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        let serve = try processes.start(
            [holdfastExecutable(), "host", "serve"], stdout: serveLog, stderr: serveLog,
            environment: SpawnOptions.inheritedEnvironment() + ["HOLDFAST_RUN_DIR=\(run)"])
        close(serveLog)
        #expect(try await processes.wait(serve, timeout: .seconds(30)) == .exited(2))
        let served = String(decoding: readFile(base.file("serve.log")) ?? [], as: UTF8.self)
        #expect(served.contains("holdfast host serve: refusing to start: \(run) is owned by uid 65534 (nobody)"), "\(served)")

        let statusLog = open(base.file("status.log"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        let status = try processes.start(
            [holdfastExecutable(), "status", "--socket", run + "/control.sock"], stdout: statusLog, stderr: statusLog)
        close(statusLog)
        #expect(try await processes.wait(status, timeout: .seconds(30)) == .exited(1))
        let said = String(decoding: readFile(base.file("status.log")) ?? [], as: UTF8.self)
        #expect(said.contains("not asking \(run)/control.sock: \(run) is owned by uid 65534 (nobody)"), "\(said)")

        var after = stat()
        #expect(lstat(run + "/control.sock", &after) == 0 && after.st_ino == before.st_ino && after.st_uid == Self.nobody, "not unlinked")
        #expect(connections.withLockedValue { $0 } == 0, "nothing of root's reached the attacker's socket")
        #expect(access(run + "/holdfast.lock", F_OK) != 0 && access(run + "/host.lock", F_OK) != 0, "nothing was made in it")
    }

    /// A socket another user put at one of the daemon's paths (in a directory that is fine) is
    /// not unlinked: start-up stops and says whose it is.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the socket belongs to another user"))
    func aSocketAnotherUserPutInTheRunDirectoryIsNotUnlinked() async throws {
        let base = try TemporaryDirectory("holdfast-foreign-socket")
        defer { base.remove() }
        let run = base.file("run")
        mkdir(run, 0o755)
        makeStaleSocket(run + "/control.sock")
        chown(run + "/control.sock", Self.nobody, Self.nobody)
        var before = stat()
        lstat(run + "/control.sock", &before)
        let processes = TestProcesses()
        defer { processes.killAll() }
        let config = try Self.writeConfig(base, run: run, brokerUID: ReservedUIDs.unused())
        let daemon = try Self.startDaemon(processes, config: config, log: base.file("daemon.log"))
        #expect(try await processes.wait(daemon, timeout: .seconds(30)) == .exited(2))
        let log = String(decoding: readFile(base.file("daemon.log")) ?? [], as: UTF8.self)
        #expect(log.contains("\(run)/control.sock: a socket owned by uid 65534 (nobody), not made by us: not removed"), "\(log)")
        var after = stat()
        #expect(lstat(run + "/control.sock", &after) == 0 && after.st_ino == before.st_ino && after.st_uid == Self.nobody)
    }

    /// A second daemon with a run directory of its own (`HOLDFAST_RUN_DIR` exported, say) and
    /// the same `broker.user`: refused, saying another daemon runs and naming its broker —
    /// before, the message spoke of a uid "not the broker's own", as for a stray process.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root"))
    func aSecondDaemonWithAnotherRunDirectoryIsRefusedAsAnotherDaemon() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let broker = try #require(try await daemon.rolePID("broker"))
        let base = try TemporaryDirectory("holdfast-second")
        defer { base.remove() }
        let config = try Self.writeConfig(base, run: base.file("run"), brokerUID: daemon.brokerUID)
        let second = try Self.startDaemon(daemon.processes, config: config, log: base.file("second.log"))
        #expect(try await daemon.processes.wait(second, timeout: .seconds(30)) == .exited(2))
        let log = String(decoding: readFile(base.file("second.log")) ?? [], as: UTF8.self)
        #expect(log.contains("another holdfast daemon runs (pid \(broker)"), "\(log)")
        #expect(try await daemon.rolePID("broker") == broker, "the first daemon's broker untouched")
        #expect(try await daemon.stop() == .exited(0))
    }

    /// One daemon per run directory: a second is refused with the first one's pid, and the
    /// first is untouched (its sockets still answer). The same for `host serve`.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root"))
    func aSecondDaemonOrHostServeOnTheSameDirectoryIsRefusedNamingTheFirst() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let second = try Self.startDaemon(daemon.processes, config: daemon.directory.file("holdfast.yaml"), log: daemon.directory.file("second.log"))
        #expect(try await daemon.processes.wait(second, timeout: .seconds(30)) == .exited(2))
        let log = String(decoding: readFile(daemon.directory.file("second.log")) ?? [], as: UTF8.self)
        #expect(log.contains("already running on \(daemon.directory.path), pid \(daemon.daemonPID)"), "\(log)")
        #expect(try await daemon.status().pid == daemon.daemonPID, "the first daemon still answers on its control socket")

        // host serve: the first holds host.lock in the same directory; the second is refused.
        let serve = { (name: String) throws -> pid_t in
            let fd = open(daemon.directory.file(name), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            defer { close(fd) }
            return try daemon.processes.start(
                [holdfastExecutable(), "host", "serve", "--bridge", "unix:" + daemon.directory.file("serve-bridge.sock"),
                 "--streams", "unix:" + daemon.directory.file("serve-streams.sock"), "--control", daemon.directory.file("host.sock")],
                stdout: fd, stderr: fd)
        }
        let firstServe = try serve("serve1.log")
        try await eventually("the first host serve listening") { access(daemon.directory.file("host.sock"), F_OK) == 0 }
        let secondServe = try serve("serve2.log")
        #expect(try await daemon.processes.wait(secondServe, timeout: .seconds(30)) == .exited(2))
        let served = String(decoding: readFile(daemon.directory.file("serve2.log")) ?? [], as: UTF8.self)
        #expect(served.contains("already running on \(daemon.directory.path), pid \(firstServe)"), "\(served)")
        #expect(kill(firstServe, 0) == 0 && UnixSocketFile.state(daemon.directory.file("host.sock")) == .live, "the first one serves on")
        #expect(try await daemon.stop() == .exited(0))
    }
}
