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

@Suite("The daemon: supervisor, broker and bridge worker as real processes", .timeLimit(.minutes(5)))
struct DaemonTests {
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own")) func aKilledBridgeWorkerIsRestartedAndTheStreamLosesNothing() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let host = try daemon.streams.open(token: bytes("p1-stdout"), direction: .receive)
        let received = collect(host)
        _ = try await daemon.launch(ProcessSpec(
            id: "p1", argv: counterCommand(300),
            stdout: daemon.spec("p1-stdout")))
        try await Task.sleep(for: .milliseconds(300))
        let old = try #require(try await daemon.rolePID("bridge"))
        let killed = ProcessIdentity(old)
        kill(old, SIGKILL)
        let killedAt = ContinuousClock.now
        try await eventually("a new bridge worker") { try await daemon.roleIsAnother("bridge", than: killed) }
        // A figure, not an assertion (a starved machine stretches it): the back-off is 100 ms.
        print("bridge worker restarted in \(ContinuousClock.now - killedAt)")
        let report = try await daemon.wait("p1")
        #expect(report.exitCode == 0)
        #expect(report.undelivered == 0)
        #expect(await received.value == expectedLines(300), "every line once, in order")
        let status = try await daemon.status()
        #expect(status.roles.first { $0.name == "bridge" }?.restarts == 1)
        #expect(status.roles.first { $0.name == "broker" }?.restarts == 0, "the broker ran under its filter throughout")
        #expect(try await daemon.stop() == .exited(0))
    }

    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own")) func bridgeLossParksEveryStreamAndEverythingResumesWhenTheHostIsBack() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let ids = (1...4).map { "q\($0)" }
        var receivers: [String: Task<[UInt8], Never>] = [:]
        // Each process waits for `go` before it counts: on a starved machine the first one must
        // not be done before the last one's stream has connected.
        let go = daemon.directory.file("go")
        for id in ids {
            receivers[id] = collect(try daemon.streams.open(token: bytes("\(id)-out"), direction: .receive))
            let counter = counterCommand(400, prefix: id, pause: "0.01")[2]
            _ = try await daemon.launch(ProcessSpec(
                id: id, argv: ["sh", "-c", "while [ ! -e \(go) ]; do sleep 0.01; done; \(counter)"],
                stdout: daemon.spec("\(id)-out")))
        }
        try await eventually("every stream connected") {
            let streams = try await daemon.brokerStreams()
            return streams.count == ids.count && streams.allSatisfy { $0.state == .connected }
        }
        try writeFile(go, [])
        try await Task.sleep(for: .milliseconds(200))
        // A blackout: the bridge and every stream connection drop, and nothing is accepted.
        daemon.streams.setRefusing(true)
        daemon.bridge.drop(refusing: true)
        daemon.streams.dropAllConnections()
        try await eventually("every stream parked (disconnect-all)") {
            // A stream whose process finished meanwhile (a slow machine) is closed, not parked.
            // (Not the bridge's state, which may already be up again on a slow machine.) The
            // broker's own list: `status` shows none when the broker did not answer in time,
            // and every one of none is parked.
            try await daemon.brokerStreams().allSatisfy { $0.state != .connected }
        }
        try await Task.sleep(for: .milliseconds(500))
        daemon.streams.setRefusing(false)
        daemon.bridge.drop(refusing: false)
        try await eventually("every stream back", timeout: .seconds(10)) {
            let bridge = try await daemon.status().bridge
            let streams = try await daemon.brokerStreams()  // not `status`'s, empty when the broker was slow
            return bridge == .up && streams.allSatisfy { $0.state == .connected || $0.state == .closed }
        }
        for id in ids {
            let report = try await daemon.wait(id)
            #expect(report.exitCode == 0)
            #expect(report.undelivered == 0)
            #expect(await receivers[id]!.value == expectedLines(400, prefix: id), "\(id): nothing in the pipes was lost")
        }
        #expect(try await daemon.status().roles.first { $0.name == "broker" }?.restarts == 0)
        #expect(try await daemon.stop() == .exited(0))
    }

    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own")) func aThousandProcessLifecyclesLeaveNoDescriptorsBehind() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let sink = try CountingListener(path: daemon.directory.file("raw.sock"))
        defer { sink.close() }
        let address = "unix:" + daemon.directory.file("raw.sock")
        @Sendable func lifecycle(_ index: Int) async throws {
            let id = "life-\(index)"
            _ = try await daemon.launch(ProcessSpec(
                id: id, argv: ["sh", "-c", "echo out \(index); echo err \(index) >&2"],
                stdout: StreamSpec(address: address, mode: .raw), stderr: StreamSpec(address: address, mode: .raw)))
            let report = try await daemon.wait(id)
            #expect(report.exitCode == 0)
        }
        for index in 0..<20 { try await lifecycle(index) }  // warm-up: pools, threads, first allocations
        let supervisor = daemon.daemonPID
        let broker = try #require(try await daemon.rolePID("broker"))
        try await Task.sleep(for: .milliseconds(200))
        let baseline = (await settledDescriptorTable(pid: supervisor).count, await settledDescriptorTable(pid: broker).count, residentKiB(broker))
        try await withThrowingTaskGroup(of: Void.self) { group in
            for worker in 0..<8 {
                group.addTask {
                    for index in stride(from: 20 + worker, to: 1020, by: 8) { try await lifecycle(index) }
                }
            }
            try await group.waitForAll()
        }
        try await eventually("fd counts back at baseline", timeout: .seconds(10)) {
            openDescriptorCount(pid: supervisor) == baseline.0 && openDescriptorCount(pid: broker) == baseline.1
        }
        let after = (openDescriptorCount(pid: supervisor), openDescriptorCount(pid: broker), residentKiB(broker))
        print("1,000 lifecycles: supervisor fds \(baseline.0) → \(after.0), broker fds \(baseline.1) → \(after.1), broker RSS \(baseline.2) KiB → \(after.2) KiB; \(sink.connections) connections, \(sink.bytes) bytes")
        #expect(after.0 == baseline.0)
        #expect(after.1 == baseline.1)
        #expect(after.2 - baseline.2 < 16 * 1024, "broker RSS must not grow without bound")
        // The sink's reads, in this process, may trail the daemon's answers to the last waits.
        let written = (0..<1020).reduce(0) { $0 + "out \($1)\n".utf8.count + "err \($1)\n".utf8.count }
        try await eventually("every byte at the sink") { sink.bytes >= written }
        #expect(sink.bytes == written)
        let status = try await daemon.statusTheBrokerAnswered()
        #expect(status.processes.isEmpty)
        #expect(status.streams.isEmpty)
        #expect(status.roles.first { $0.name == "broker" }?.restarts == 0)

        // Nor in the supervisor's heap: a second thousand, after the first warmed it up for eight
        // at a time (measured: +250 KiB over the first, then −70 to +10 KiB a thousand). Only
        // creates over the bridge are remembered after their process, up to 4,096 of them.
        let heapBefore = try #require(status.mallocInUseKiB, "the status reports the supervisor's heap")
        func aThousand(from first: Int) async throws {
            try await withThrowingTaskGroup(of: Void.self) { group in
                for worker in 0..<8 {
                    group.addTask {
                        for index in stride(from: first + worker, to: first + 1000, by: 8) { try await lifecycle(index) }
                    }
                }
                try await group.waitForAll()
            }
        }
        // Measured once the supervisor is done with the last exits (their reports and drains
        // finish after the waits return): amid the full suite, a reading taken at once was up to
        // +153 KiB, and a few seconds later back at the level alone (−64 to +23 KiB). A leak
        // does not come back down.
        func settledHeap(near level: Int) async -> Int {
            var heap = Int.max
            try? await eventually("the supervisor's heap back near its level", timeout: .seconds(15)) {
                let status = try await daemon.status()
                heap = status.mallocInUseKiB ?? .max
                return status.processes.isEmpty && heap - level < 128
            }
            return heap
        }
        try await aThousand(from: 1020)
        let heapAfter = await settledHeap(near: heapBefore)
        print("a second 1,000 lifecycles: supervisor malloc in use \(heapBefore) KiB → \(heapAfter) KiB")
        if heapAfter - heapBefore >= 128 {
            // Amid a loaded full suite the level once stayed +196 and +214 KiB (alone: +8). A
            // leak grows with every thousand; a level that moved once does not: a third thousand
            // tells the two apart.
            try await aThousand(from: 2020)
            let third = await settledHeap(near: heapAfter)
            print("a third 1,000 lifecycles: supervisor malloc in use \(heapAfter) KiB → \(third) KiB")
            #expect(third - heapAfter < 128, "the supervisor's heap must not grow with processes it forgot")
        }
        #expect(try await daemon.stop() == .exited(0))
    }

    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own")) func liveBrokerIsUnderItsSeccompFilterAndUnprivileged() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let broker = try #require(try await daemon.rolePID("broker"))
        func status() -> String { String(decoding: readFile("/proc/\(broker)/status") ?? [], as: UTF8.self) }
        // The broker locks itself down right after it starts.
        try await eventually("the filter to be loaded") { status().contains("Seccomp:\t2") }
        let status = status()
        #expect(status.contains("Seccomp:\t2"), "filter mode")
        #expect(status.contains("NoNewPrivs:\t1"))
        let uid = daemon.brokerUID
        #expect(status.contains("Uid:\t\(uid)\t\(uid)\t\(uid)\t\(uid)"), "its own uid, for good")
        #expect(status.contains("Gid:\t\(uid)\t\(uid)\t\(uid)\t\(uid)"))
        #expect(status.contains("Groups:\t\(uid)"), "no supplementary group but its own")
        // Non-dumpable: the kernel gives its /proc entries to root.
        var info = stat()
        #expect(stat("/proc/\(broker)/fd", &info) == 0 && info.st_uid == 0, "/proc/PID/fd owned by root: the broker is not dumpable")
        #expect(try await daemon.stop() == .exited(0))
    }

    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own")) func gracefulShutdownStopsProcessesAndExitsZero() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let host = try daemon.streams.open(token: bytes("s-out"), direction: .receive)
        let received = collect(host)
        // A process that ignores SIGTERM: it gets SIGKILL after the 1 s grace period.
        let pid = try await daemon.launch(ProcessSpec(
            id: "stubborn", argv: ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.1; done"],
            stdout: daemon.spec("s-out")))
        try await eventually("output") { host.statistics.offset >= 6 }
        let started = ContinuousClock.now
        #expect(try await daemon.stop() == .exited(0))
        // A figure, not an assertion (a starved machine stretches it); the stop itself is
        // bounded (the fixture's wait), and exit 0 means the daemon was not killed.
        print("shutdown took \(ContinuousClock.now - started) (shutdown.timeout 5s)")
        #expect(kill(pid, 0) != 0, "the process is gone")
        #expect(await received.value == bytes("ready\n"))
    }

    @Test func badConfigurationStopsStartUpWithFileKeyAndReason() async throws {
        let directory = try TemporaryDirectory("holdfast-badconfig")
        defer { directory.remove() }
        let path = directory.file("holdfast.yaml")
        try writeFile(path, bytes("bridge:\n  address: vsock://nowhere:5\n"))
        let processes = TestProcesses()
        defer { processes.killAll() }
        let log = open(directory.file("log"), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        let pid = try processes.start([holdfastExecutable(), "daemon", "--config", path], stdout: log, stderr: log)
        close(log)
        #expect(try await processes.wait(pid) == .exited(2))
        let output = String(decoding: readFile(directory.file("log")) ?? [], as: UTF8.self)
        #expect(output.contains("\(path): bridge.address: 'vsock://nowhere:5'"))
    }
}

@Suite("The broker's handoff socket and seccomp profile", .timeLimit(.minutes(5)))
struct BrokerBoundaryTests {
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own")) func aPeerWhoseUIDIsNotAllowedIsRefused() async throws {
        let daemon = try await DaemonFixture(extraConfig: "handoff:\n  mode: \"0666\"\n  allowed_uids: [0]\n")
        defer { daemon.cleanUp() }
        let script = """
            import socket, struct, json, os, sys
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(sys.argv[1])
            r, w = os.pipe()
            body = json.dumps({"process": "intruder", "streams": [{"kind": "stdout", "fd": 0, "address": "unix:/tmp/x", "mode": "raw"}]}).encode()
            socket.send_fds(s, [struct.pack(">IIQ", 0x0101, len(body), 1) + body], [r])
            reply = s.recv(65536)
            kind, length, ident = struct.unpack(">IIQ", reply[:16])
            print(hex(kind), json.loads(reply[16:])["code"])
            """
        try writeFile(daemon.directory.file("intruder.py"), bytes(script))
        let out = daemon.directory.file("intruder.out")
        let outFD = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o666)
        var options = SpawnOptions(executable: "python3", arguments: ["python3", daemon.directory.file("intruder.py"), daemon.directory.file("broker.sock")])
        options.user = (65534, 65534, [65534])
        options.stdout = outFD
        options.stderr = outFD
        let pid = try Spawner.spawn(options)
        daemon.processes.adopt(pid)
        close(outFD)
        #expect(try await daemon.processes.wait(pid) == .exited(0))
        let printed = String(decoding: readFile(out) ?? [], as: UTF8.self)
        #expect(printed.contains("0x2 permission-denied"), "printed: \(printed)")
        try await eventually("the refusal in the log") { daemon.log.contains("handoff peer refused") && daemon.log.contains("uid=65534") }
        #expect(try await daemon.brokerStreams().isEmpty, "nothing was adopted")
        #expect(try await daemon.stop() == .exited(0))
    }

    /// Hostile messages on the handoff socket from an admitted peer: 300 fds (more than the
    /// kernel lets one message carry), the most it does carry (253), fds with an empty payload,
    /// fds on a request that takes none. Each gets a refusal or a clear send error; the broker
    /// keeps running and holds not one fd more than before.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own")) func hostileHandoffMessagesAreRefusedAndLeaveNoDescriptors() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let broker = try #require(try await daemon.rolePID("broker"))
        let script = """
            import socket, struct, json, os, sys
            path = sys.argv[1]
            def frame(kind, body, ident):
                data = json.dumps(body).encode()
                return struct.pack(">IIQ", kind, len(data), ident) + data
            def exchange(payload, fds):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                s.connect(path)
                try:
                    socket.send_fds(s, [payload], fds)
                except OSError as error:
                    return "send refused: errno %d" % error.errno
                reply = s.recv(65536)
                if not reply:
                    return "closed"
                kind, length, ident = struct.unpack(">IIQ", reply[:16])
                return "%s %s" % (hex(kind), json.loads(reply[16:]).get("code"))
            pipes = [os.pipe() for _ in range(150)]
            fds = [fd for pair in pipes for fd in pair]
            adopt = {"process": "flood", "streams": [{"kind": "stdout", "fd": 0, "address": "unix:/tmp/none", "mode": "raw"}]}
            print("300:", exchange(frame(0x0101, adopt, 1), fds))
            print("253:", exchange(frame(0x0101, adopt, 2), fds[:253]))
            print("empty:", exchange(b"", fds[:3]))
            print("list+fds:", exchange(frame(0x0103, {}, 3), fds[:2]))
            """
        try writeFile(daemon.directory.file("hostile.py"), bytes(script))
        // Warm up: one refused message first, so lazily made fds exist before the baseline.
        func runScript() async throws -> String {
            let out = daemon.directory.file("hostile.out")
            let outFD = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            let pid = try daemon.processes.start(
                ["python3", daemon.directory.file("hostile.py"), daemon.directory.file("broker.sock")], stdout: outFD, stderr: outFD)
            close(outFD)
            #expect(try await daemon.processes.wait(pid, timeout: .seconds(30)) == .exited(0))
            return String(decoding: readFile(out) ?? [], as: UTF8.self)
        }
        _ = try await runScript()
        try await Task.sleep(for: .milliseconds(200))
        let baseline = await settledDescriptorTable(pid: broker)
        let printed = try await runScript()
        #expect(printed.contains("300: send refused: errno 22"), "the kernel carries at most 253 fds: \(printed)")
        #expect(printed.contains("253: 0x2 "), "too many fds: refused \(printed)")
        #expect(printed.contains("empty: "), "\(printed)")
        #expect(!printed.contains("empty: 0x1"), "fds without a request are not accepted: \(printed)")
        #expect(printed.contains("list+fds: 0x2 bad-request"), "\(printed)")
        do {
            try await eventually("the broker's fds back at the baseline") { descriptorTable(pid: broker).count == baseline.count }
        } catch {
            Issue.record("broker fds \(baseline.count) → \(descriptorTable(pid: broker).count): \(descriptorsAdded(baseline, descriptorTable(pid: broker)))")
        }
        #expect(try await daemon.rolePID("broker") == broker, "the broker did not restart")
        #expect(try await daemon.brokerStreams().isEmpty)
        print("hostile handoff: \(printed)")
        #expect(try await daemon.stop() == .exited(0))
    }

    @Test(arguments: ["execve", "fork", "ptrace", "open-write"])
    func theBrokerProfileKillsForbiddenOperations(attempt: String) async throws {
        let processes = TestProcesses()
        defer { processes.killAll() }
        let pid = try processes.start([holdfastExecutable(), "seccomp-probe", attempt], stdout: -1, stderr: -1)
        #expect(try await processes.wait(pid) == .signaled(SIGSYS), "\(attempt) must be fatal under the filter")
    }

    @Test(arguments: ["open-read", "socket-unix"])
    func theBrokerProfileAllowsWhatTheBrokerNeeds(attempt: String) async throws {
        let processes = TestProcesses()
        defer { processes.killAll() }
        let pid = try processes.start([holdfastExecutable(), "seccomp-probe", attempt], stdout: -1, stderr: -1)
        #expect(try await processes.wait(pid) == .exited(0))
    }

    @Test func logActionAllowsAndReports() async throws {
        let processes = TestProcesses()
        defer { processes.killAll() }
        let pid = try processes.start([holdfastExecutable(), "seccomp-probe", "--action", "log", "open-write"], stdout: -1, stderr: -1)
        #expect(try await processes.wait(pid) == .exited(0), "log lets it through (and the kernel logs it)")
        // The file it made is its own (SeccompProbe: `/tmp/holdfast-seccomp-probe-PID`).
        unlink("/tmp/holdfast-seccomp-probe-\(pid)")
    }
}

func residentKiB(_ pid: pid_t) -> Int {
    let text = String(decoding: readFile("/proc/\(pid)/status") ?? [], as: UTF8.self)
    for line in text.split(separator: "\n") where line.hasPrefix("VmRSS:") {
        return Int(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "0") ?? 0
    }
    return 0
}
