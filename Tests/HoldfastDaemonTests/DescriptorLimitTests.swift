import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The supervisor keeps about six fds per process and the broker about eight. Under systemd
/// (soft limit 1,024, hard 524,288) the daemon stopped at about 170 processes — and, worse, a
/// broker restart then failed for want of a socketpair, so no process was taken over. Here the
/// limits are scaled down so that a few dozen processes cross them.
@Suite("Open-file limits: processes past the service manager's soft limit, and a refusal before a restart could fail")
struct DescriptorLimitTests {
    /// Every process prints 1…500 once `go` exists; returns the output streams' collectors.
    static func startPrinters(_ daemon: DaemonFixture, ids: [String], go: String) async throws -> [String: Task<[UInt8], Never>] {
        var received: [String: Task<[UInt8], Never>] = [:]
        for id in ids {
            let output = try daemon.streams.open(token: bytes("\(id)-out"), direction: .receive)
            received[id] = collect(output)
            _ = try await daemon.launch(ProcessSpec(
                id: id, argv: ["sh", "-c", "while [ ! -e \(go) ]; do sleep 0.02; done; seq 1 500"], stdout: daemon.spec("\(id)-out")))
        }
        return received
    }

    static let printed = bytes((1...500).map { "\($0)\n" }.joined())

    /// Lets the printers go; each exits 0 and its output arrives exact.
    static func expectEveryPrinterExact(_ daemon: DaemonFixture, ids: [String], received: [String: Task<[UInt8], Never>], go: String) async throws {
        try writeFile(go, [])
        for id in ids {
            let report = try await daemon.wait(id)
            #expect(report.exitCode == 0, "\(id): \(report)")
            #expect(await received[id]!.value == Self.printed, "\(id)'s output, exact")
        }
    }

    /// Kills the broker and waits for the next one to have taken over `count` processes.
    static func killTheBroker(_ daemon: DaemonFixture, expecting count: Int) async throws {
        let broker = try #require(try await daemon.rolePID("broker"))
        let handedBefore = daemon.log.components(separatedBy: "streams handed to the restarted broker").count - 1
        kill(broker, SIGKILL)
        try await eventually("every process handed to the next broker") {
            daemon.log.components(separatedBy: "streams handed to the restarted broker").count - 1 - handedBefore == count
        }
        #expect(!daemon.log.contains("cannot copy a process's fds"), "\(daemon.log.suffix(2000))")
        #expect(!daemon.log.contains("cannot start role"), "\(daemon.log.suffix(2000))")
    }

    /// A soft limit of 64 (hard 4,096): 24 processes need more than that in the supervisor. Each
    /// is created, each keeps the soft limit of 64 for itself (what select()-era programs expect),
    /// and after a broker crash every one is taken over and its output arrives whole.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func processesPastTheSoftLimitKeepItAndSurviveABrokerCrash() async throws {
        let daemon = try await DaemonFixture(openFileLimit: (soft: 64, hard: 4096))
        defer { daemon.cleanUp() }
        let go = daemon.directory.file("go")
        let ids = (0..<24).map { "p\($0)" }
        let received = try await Self.startPrinters(daemon, ids: ids, go: go)
        #expect(OpenFileLimits.of(daemon.daemonPID) == OpenFileLimits(soft: 4096, hard: 4096), "the supervisor raised its own")
        let status = try await daemon.status()
        let pids = status.processes.filter { ids.contains($0.id) }.compactMap(\.pid)
        #expect(pids.count == ids.count)
        for pid in pids {
            #expect(OpenFileLimits.of(pid) == OpenFileLimits(soft: 64, hard: 4096), "a container process got the soft limit back")
        }
        #expect(openDescriptorCount(pid: daemon.daemonPID) > 64, "the supervisor holds more fds than the soft limit it was given")

        try await Self.killTheBroker(daemon, expecting: ids.count)
        try await Self.expectEveryPrinterExact(daemon, ids: ids, received: received, go: go)
        // A live upgrade's new image starts with the raised limit: it is told the first one.
        let upgrade = try await runUpgrade(daemon, processes: daemon.processes)
        #expect(upgrade.status == .exited(0), "\(upgrade.output)")
        let after = try await daemon.launch(ProcessSpec(id: "after-upgrade", argv: ["sleep", "60"]))
        #expect(OpenFileLimits.of(after) == OpenFileLimits(soft: 64, hard: 4096), "a process started after an upgrade")
        #expect(OpenFileLimits.of(daemon.daemonPID) == OpenFileLimits(soft: 4096, hard: 4096))
        #expect(try await daemon.stop() == .exited(0))
    }

    /// A hard limit of 320 that the daemon cannot raise: creates go on until one is refused
    /// (`too-many-open-files`, naming the limit and what to do) while enough is kept for a
    /// broker restart; the restart then takes every process over, each output whole; once they
    /// have ended, a create succeeds again.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func createsAreRefusedBeforeABrokerRestartCouldFail() async throws {
        let daemon = try await DaemonFixture(openFileLimit: (soft: 320, hard: 320))
        defer { daemon.cleanUp() }
        let go = daemon.directory.file("go")
        var ids: [String] = []
        var received: [String: Task<[UInt8], Never>] = [:]
        var refusal: HoldfastError?
        for index in 0..<200 {
            let id = "p\(index)"
            do {
                received.merge(try await Self.startPrinters(daemon, ids: [id], go: go)) { $1 }
                ids.append(id)
            } catch let error as HoldfastError {
                refusal = error
                break
            }
        }
        let refused = try #require(refusal, "200 processes at a limit of 320 fds were all created")
        #expect(refused.code == .tooManyOpenFiles, "\(refused)")
        #expect(refused.message.contains("of its limit of 320") && refused.message.contains("LimitNOFILE"), "\(refused)")
        #expect(ids.count >= 10, "\(ids.count) processes before the refusal")
        print("created \(ids.count) processes at a hard limit of 320 fds; then: \(refused)")

        try await Self.killTheBroker(daemon, expecting: ids.count)
        try await Self.expectEveryPrinterExact(daemon, ids: ids, received: received, go: go)
        // Their fds are given back once they ended: room again.
        try await eventually("a create succeeds again") {
            do {
                _ = try await daemon.launch(ProcessSpec(id: "after", argv: ["true"]))
                return true
            } catch let error as HoldfastError where error.code == .tooManyOpenFiles {
                return false
            }
        }
        #expect(try await daemon.stop() == .exited(0))
    }

    /// At a limit where the broker runs out before the supervisor (full stdio costs it more fds
    /// per process), a create is refused before its program runs: the refused one never ran.
    /// Before, the broker refused it only at the adopt — its program had run (a file touched, 1
    /// MiB of output possible), then it was killed, and the answer was the same as a refusal
    /// before the start, so a host's retry ran it again.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aCreateTheBrokerHasNoRoomForIsRefusedBeforeItsProgramRuns() async throws {
        let daemon = try await DaemonFixture(openFileLimit: (soft: 1024, hard: 1024))
        defer { daemon.cleanUp() }
        var refusal: HoldfastError?
        var refusedID = ""
        for index in 0..<150 {
            let id = "f\(index)"
            let ran = daemon.directory.file("ran-\(id)")
            do {
                _ = try daemon.streams.open(token: bytes("\(id)-in"), direction: .send)
                _ = try daemon.streams.open(token: bytes("\(id)-out"), direction: .receive)
                _ = try daemon.streams.open(token: bytes("\(id)-err"), direction: .receive)
                var spec = ProcessSpec(
                    id: id, argv: ["sh", "-c", "touch \(ran); exec cat"], stdin: daemon.spec("\(id)-in"), stdout: daemon.spec("\(id)-out"),
                    stderr: daemon.spec("\(id)-err"))
                spec.idempotencyKey = "key-\(id)"
                _ = try await daemon.launch(spec)
            } catch let error as HoldfastError {
                refusal = error
                refusedID = id
                break
            }
        }
        let refused = try #require(refusal, "150 full-stdio processes at a limit of 1,024 fds were all created")
        #expect(refused.code == .tooManyOpenFiles && refused.message.contains("the broker holds"), "\(refused)")
        #expect(refused.message.contains("nothing was started"), "\(refused)")
        try await Task.sleep(for: .milliseconds(300))
        #expect(access(daemon.directory.file("ran-\(refusedID)"), F_OK) != 0, "the refused create's program never ran")
        // A repeat of a create that did start (its reply lost, say) is answered as one, not
        // refused for want of fds: it started nothing new.
        var again = ProcessSpec(id: "f0", argv: ["sh", "-c", "exec cat"])
        again.idempotencyKey = "key-f0"
        let control = try await daemon.control()
        let answer = try await control.call(SupervisorRequest.launch(again), reply: LaunchResponse.self)
        #expect(answer.repeated == true, "\(answer)")
        print("created \(refusedID.dropFirst()) full-stdio processes at a limit of 1,024 fds; then: \(refused)")
        #expect(try await daemon.stop() == .exited(0))
    }
}

/// A process's limits on open files, from /proc/PID/limits.
struct OpenFileLimits: Equatable {
    var soft: UInt64
    var hard: UInt64

    static func of(_ pid: pid_t) -> OpenFileLimits? {
        guard let text = readFile("/proc/\(pid)/limits").map({ String(decoding: $0, as: UTF8.self) }),
            let line = text.split(separator: "\n").first(where: { $0.hasPrefix("Max open files") })
        else { return nil }
        let fields = line.dropFirst("Max open files".count).split(separator: " ")
        guard fields.count >= 2, let soft = UInt64(fields[0]), let hard = UInt64(fields[1]) else { return nil }
        return OpenFileLimits(soft: soft, hard: hard)
    }
}
