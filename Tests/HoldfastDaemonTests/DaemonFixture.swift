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

/// The `holdfast` binary built next to the test bundle.
func holdfastExecutable() -> String {
    var buffer = [CChar](repeating: 0, count: 4096)
    let length = readlink("/proc/self/exe", &buffer, buffer.count - 1)
    let me = String(decoding: buffer[..<max(0, length)].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    let directory = me.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
    // The test bundle may sit inside `holdfastPackageTests.xctest` or next to it.
    for candidate in [directory + "/holdfast", directory + "/../holdfast"] where access(candidate, X_OK) == 0 {
        return candidate
    }
    return directory + "/holdfast"
}

/// A running `holdfast daemon` in a private run directory, with a test bridge host and a
/// resumable stream server beside it. Everything it starts is ended by pid.
final class DaemonFixture: Sendable {
    let directory: TemporaryDirectory
    let processes = TestProcesses()
    let bridge: BridgeServer
    let streams: StreamServer<AsyncFD>
    let logPath: String
    /// With `logToPipe`: the read end of the pipe the daemon's stdout and stderr go to instead of
    /// `logPath` (a 4 KiB pipe, as a journal stream nobody reads would be). The test reads it, or
    /// does not; `cleanUp` closes it.
    let logPipe: Int32?
    private let logPipeWriteEnd: Int32?
    /// The VM's bridge key, provisioned as a VM builder would (`{run}/bridge.key`, 0600); nil
    /// for a fixture started with `authenticated: false`.
    let key: BridgeKey?
    /// What the host's BridgeServer warned about (refused connections).
    let hostWarnings = NIOLockedValueBox<[String]>([])
    /// With `bridgeThroughProxy`: what sits between the guest and the BridgeServer, which then
    /// listens on `real-bridge.sock`.
    let proxy: BridgeProxy?
    /// The broker's uid: one no other process uses (`ReservedUIDs`), as the daemon requires.
    let brokerUID: uid_t
    private let daemon = NIOLockedValueBox<pid_t?>(nil)
    private let command: [String]
    private let environment: [String]
    /// The daemon's limits on open files as its service manager would set them (nil: ours).
    private let openFileLimit: (soft: UInt64, hard: UInt64?)?
    /// The daemon's OOM score adjustment as its service manager would set it (nil: ours).
    private let oomScoreAdjustment: Int32?

    static var canRun: Bool { geteuid() == 0 }

    /// `environment` is added to the inherited one (a name in both: this value); `executable`
    /// replaces the built binary.
    /// `drainTimeout` and `shutdown` (grace, timeout) are the config's values, YAML durations.
    init(
        extraConfig: String = "", environment: [String: String] = [:], executable: String? = nil, drainTimeout: String = "10s",
        shutdown: (grace: String, timeout: String) = ("1s", "5s"), brokerUser: uid_t? = nil, authenticated: Bool = true,
        bridgeThroughProxy: Bool = false, brokerRestartBackoffMax: String = "5s", openFileLimit: (soft: UInt64, hard: UInt64?)? = nil,
        oomScoreAdjustment: Int32? = nil, logToPipe: Bool = false, ringCapacity: String? = nil, bridgeOverTCP: Bool = false
    ) async throws {
        if logToPipe {
            let ends = try PipeEnds.make()
            PipeEnds.setCapacity(of: ends.write, to: 4096)
            (logPipe, logPipeWriteEnd) = (ends.read, ends.write)
        } else {
            (logPipe, logPipeWriteEnd) = (nil, nil)
        }
        self.openFileLimit = openFileLimit
        self.oomScoreAdjustment = oomScoreAdjustment
        brokerUID = brokerUser ?? ReservedUIDs.unused()
        directory = try TemporaryDirectory("holdfast-daemon")
        chmod(directory.path, 0o755)  // the broker, unprivileged, must reach the sockets in here
        key = authenticated ? try BridgeKeyFile.loadOrCreate(directory.file("bridge.key")).key : nil
        let warnings = hostWarnings
        let bridgePath = directory.file(bridgeThroughProxy ? "real-bridge.sock" : "host-bridge.sock")
        // Over TCP on loopback (`bridgeOverTCP`): as over vsock, the guest's source port tells
        // the host what dialled (`ReservedPorts`).
        bridge = try BridgeServer(
            listeningOn: bridgeOverTCP ? .tcp(host: "127.0.0.1", port: 0) : .unix(path: bridgePath), authentication: key.map { .key($0) } ?? .none,
            unixMode: 0o666, warn: { message in warnings.withLockedValue { $0.append(message) } })
        bridge.start()
        proxy = bridgeThroughProxy ? try BridgeProxy(listeningOn: directory.file("host-bridge.sock"), forwardingTo: bridgePath) : nil
        streams = try StreamServer(listeningOn: .unix(path: directory.file("streams.sock")), unixMode: 0o666)
        streams.start()
        logPath = directory.file("daemon.log")
        let config = """
            run_directory: \(directory.path)
            bridge:
              address: "\(bridgeOverTCP ? "\(bridge.boundAddress)" : "unix:{run}/host-bridge.sock")"
              \(authenticated ? "key_file: \"{run}/bridge.key\"" : "authentication: none")
              reconnect_initial: 50ms
              reconnect_max: 200ms
            broker:
              user: "uid:\(brokerUID)"
              seccomp: kill
              restart_backoff_max: \(brokerRestartBackoffMax)
            streams:
              # 60 s of redialing: a starved CI machine can take seconds per status poll.
              redial_attempts: 3000
              redial_interval: 20ms
              connect_timeout: 1s
              drain_timeout: \(drainTimeout)
            \(ringCapacity.map { "  ring_capacity: \($0)" } ?? "")
            shutdown:
              grace: \(shutdown.grace)
              timeout: \(shutdown.timeout)
            \(extraConfig)
            """
        try writeFile(directory.file("holdfast.yaml"), bytes(config))
        command = [executable ?? holdfastExecutable(), "daemon", "--config", directory.file("holdfast.yaml")]
        self.environment = SpawnOptions.inheritedEnvironment().filter { environment[String($0.prefix { $0 != "=" })] == nil }
            + environment.map { "\($0.key)=\($0.value)" }
        do {
            try await launch(truncatingLog: true)
        } catch {
            // A daemon that did not come up (a bad configuration) leaves nothing behind either:
            // its process, its listeners and its directory.
            cleanUp()
            throw error
        }
    }

    /// Starts the daemon again on the same configuration, as systemd's `Restart=` would after
    /// the previous one stopped or was killed (that one must be gone). Its log goes on in the
    /// same file.
    func startAgain() async throws {
        try await launch(truncatingLog: false)
    }

    private func launch(truncatingLog: Bool) async throws {
        let log = logPipeWriteEnd ?? open(logPath, O_WRONLY | O_CREAT | O_CLOEXEC | (truncatingLog ? O_TRUNC : O_APPEND), 0o644)
        let pid = try processes.start(command, stdout: log, stderr: log, environment: environment, openFileLimit: openFileLimit, oomScoreAdjustment: oomScoreAdjustment)
        if logPipeWriteEnd == nil { close(log) }
        daemon.withLockedValue { $0 = pid }
        try await eventually("the daemon's control socket", timeout: .seconds(20)) {
            access(self.directory.file("control.sock"), F_OK) == 0
        }
        try await eventually("the broker and the bridge", timeout: .seconds(20)) {
            let report = try? await self.status()
            return report?.pid == pid && report?.bridge == .up && report?.roles.allSatisfy({ $0.pid != nil }) == true
        }
    }

    var streamAddress: String { "unix:" + directory.file("streams.sock") }

    /// What a create request says for the host stream `token` opened on `streams`: its address,
    /// token and secret (a token not opened gets a random secret: the host will refuse it).
    func spec(_ token: String) -> StreamSpec {
        streams.stream(for: bytes(token))?.streamSpec(at: streamAddress)
            ?? StreamSpec(address: streamAddress, mode: .resumable, token: token, secret: .random())
    }
    var daemonPID: pid_t { daemon.withLockedValue { $0 }! }

    func control() async throws -> ControlClient {
        try await ControlClient.connect(to: directory.file("control.sock"))
    }

    func status() async throws -> StatusReport {
        try await bounded("the daemon's status", .seconds(60)) {
            let client = try await self.control()
            defer { client.close() }
            return try await client.call(SupervisorRequest.status, reply: StatusReport.self)
        }
    }

    /// A control call bounded by `timeout`: one never answered fails the test with the daemon's
    /// last log lines instead of hanging the suite. (A call waits for its reply in a way that
    /// ignores cancellation, so neither `withTimeout` nor a suite's time limit could end it; a
    /// full suite once sat 15 minutes in such a wait with nothing said.)
    func bounded<T: Sendable>(_ what: String, _ timeout: Duration, _ body: @escaping @Sendable () async throws -> T) async throws -> T {
        do {
            return try await withDeadline(what, timeout, body)
        } catch let error as TimedOut {
            let tail = log.split(separator: "\n").suffix(30).joined(separator: "\n")
            Issue.record("\(what): no answer in \(timeout); the daemon's log ends with:\n\(tail)")
            throw error
        }
    }

    /// The broker's streams as `status` shows them, asked until the broker answered: `status`
    /// waits at most 2 s for the broker's list and otherwise shows no streams (the broker marked
    /// not answering), which a loaded run's broker can miss. A one-shot `status().streams`
    /// would then fail a check that something is shown, and pass one that something is not
    /// for nothing.
    func brokerStreams() async throws -> [StreamStatus] {
        try await statusTheBrokerAnswered().streams
    }

    /// `status`, asked until the broker answered its part (see `brokerStreams`).
    func statusTheBrokerAnswered() async throws -> StatusReport {
        var answered: StatusReport?
        try await eventually("the broker answering status's list") {
            let report = try await status()
            guard let broker = report.roles.first(where: { $0.name == "broker" }), broker.pid != nil, broker.notAnswering == nil
            else { return false }
            answered = report
            return true
        }
        return answered!
    }

    /// A control client's contract across a live upgrade (README, "Live upgrade"): a request the
    /// old image had read but not begun when it closed its gate is never answered by it (the
    /// connection goes with the image) and was never carried out, so it is sent again on a new
    /// connection, which the new image serves. Had the first been carried out after all, the
    /// second would be answered `repeated` (or refused): recorded as the failure it would be.
    func launch(_ spec: ProcessSpec) async throws -> Int32 {
        var attempt = 0
        while true {
            attempt += 1
            let client = try await bounded("the connection for launch \(spec.id)", .seconds(60)) { try await self.control() }
            do {
                let reply = try await bounded("launch \(spec.id)", .seconds(120)) {
                    try await client.call(SupervisorRequest.launch(spec), reply: LaunchResponse.self)
                }
                client.close()
                if attempt > 1, reply.repeated == true {
                    Issue.record("launch \(spec.id) had run although its connection closed unanswered")
                }
                return reply.pid
            } catch {
                client.close()
                guard (error as? HoldfastError)?.code == .channelClosed, attempt < 5 else { throw error }
            }
        }
    }

    /// Bounded at 4 minutes: no test's process runs that long, and a wait that hangs fails
    /// with the log rather than holding the suite.
    func wait(_ id: String) async throws -> ExitReport {
        try await bounded("the exit of \(id)", .seconds(240)) {
            let client = try await self.control()
            defer { client.close() }
            return try await client.call(SupervisorRequest.wait(WaitRequest(id: id)), reply: ExitReport.self)
        }
    }

    func rolePID(_ name: String) async throws -> pid_t? {
        try await status().roles.first { $0.name == name }?.pid
    }

    /// Whether the role runs as another process than `old` (which may have had the same pid:
    /// the suite's ns_last_pid writes make the kernel give a pid again at once).
    func roleIsAnother(_ name: String, than old: ProcessIdentity?) async throws -> Bool {
        guard let now = try await rolePID(name).flatMap(ProcessIdentity.init) else { return false }
        return now != old
    }

    var log: String { String(decoding: readFile(logPath) ?? [], as: UTF8.self) }

    /// Waits until the log has `line`. Every role's lines reach the file through a writer thread
    /// of their own (`LogLineQueue`), so a line logged before an answer may land after the
    /// answer is read: a test reads the log only through this wait, never once.
    func waitForLog(_ line: String, timeout: Duration = .seconds(30)) async throws {
        try await eventually("the log line '\(line)'", timeout: timeout) { log.contains(line) }
    }

    /// SIGTERM, then the daemon must exit 0 on its own.
    func stop() async throws -> HoldfastPosix.ExitStatus {
        let pid = daemonPID
        kill(pid, SIGTERM)
        let status = try await processes.wait(pid, timeout: .seconds(20))
        return status
    }

    func cleanUp() {
        processes.killAll()
        // What the daemon's processes started, wherever it went (a daemon killed by a test
        // leaves its container processes running).
        endDaemonCgroups(runDirectory: directory.path)
        proxy?.close()
        bridge.close()
        streams.close()
        directory.remove()
        for fd in [logPipe, logPipeWriteEnd].compactMap({ $0 }) { close(fd) }
    }
}

/// A raw host listener that accepts any number of connections and counts what arrives.
final class CountingListener: Sendable {
    let listener: Listener
    private let counts = NIOLockedValueBox<(connections: Int, bytes: Int)>((0, 0))

    init(path: String) throws {
        listener = try Listener(binding: .unix(path: path), unixMode: 0o666)
        Task { [self] in
            while let connection = try? await listener.accept() {
                counts.withLockedValue { $0.connections += 1 }
                Task {
                    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 8)
                    defer { buffer.deallocate() }
                    while let count = try? await connection.read(into: buffer), count > 0 {
                        counts.withLockedValue { $0.bytes += count }
                    }
                    connection.close()
                }
            }
        }
    }

    var connections: Int { counts.withLockedValue { $0.connections } }
    var bytes: Int { counts.withLockedValue { $0.bytes } }
    func close() { listener.close() }
}

/// Collects a host stream's bytes.
func collect(_ stream: some InboundStream) -> Task<[UInt8], Never> {
    Task {
        var all: [UInt8] = []
        for await chunk in stream.chunks() { all += chunk }
        return all
    }
}

/// The lines "WHAT STATUS" a test script prints for each thing it tries, as WHAT → STATUS.
func attemptResults(_ text: String) -> [String: String] {
    var results: [String: String] = [:]
    for line in text.split(separator: "\n") {
        let parts = line.split(separator: " ", maxSplits: 1)
        if parts.count == 2 { results[String(parts[0])] = String(parts[1]) }
    }
    return results
}

/// A host stream's bytes as they arrive (the stream need not end).
final class Accumulated: Sendable {
    let box = NIOLockedValueBox<[UInt8]>([])
    func append(_ chunk: [UInt8]) { box.withLockedValue { $0 += chunk } }
    var bytes: [UInt8] { box.withLockedValue { $0 } }
    var count: Int { box.withLockedValue { $0.count } }
}

func accumulate(_ stream: some InboundStream) -> Accumulated {
    let result = Accumulated()
    Task {
        for await chunk in stream.chunks() { result.append(chunk) }
    }
    return result
}

/// The lines `seq`-style loops print: "line 1\n" ... "line N\n".
func expectedLines(_ count: Int, prefix: String = "line") -> [UInt8] {
    Array((1...count).map { "\(prefix) \($0)\n" }.joined().utf8)
}

/// Whether every thread of `pid` is stopped (state T): a group stop reaches each thread only
/// when it next runs, so a process a test SIGSTOPped may still act for a moment through a thread
/// that was running; a test waits for this before it relies on the stop.
func everyThreadStopped(_ pid: pid_t) -> Bool {
    let states = ProcessAccount.threadStates(of: pid)
    return !states.isEmpty && states.allSatisfy { $0 == "T" }
}

func counterCommand(_ count: Int, prefix: String = "line", pause: String = "0.005") -> [String] {
    ["sh", "-c", "i=0; while [ $i -lt \(count) ]; do i=$((i+1)); echo \(prefix) $i; sleep \(pause); done"]
}

extension DaemonFixture {
    /// Hands a process's fds to the broker as a runtime does: `adopt` over the handoff socket
    /// (as root, which the daemon admits), one resumable stream per `(kind, token)` on the fd at
    /// the same index, to the host stream of that token. The fds are closed once sent (the broker
    /// has its copies). Returns the connection, for the runtime's later requests.
    @discardableResult
    func handOver(
        _ process: String, _ streams: [(kind: StreamKind, token: String)], descriptors: [Int32], on connection: ControlClient? = nil
    ) async throws -> ControlClient {
        let runtime = if let connection { connection } else { try await ControlClient.connect(to: directory.file("broker.sock")) }
        let adopt = BrokerRequest.adopt(AdoptRequest(process: process, streams: streams.enumerated().map { index, stream in
            let spec = self.spec(stream.token)
            return StreamDescription(kind: stream.kind, fd: index, address: spec.address, mode: .resumable, token: spec.token, secret: spec.secret)
        }))
        defer { for fd in descriptors { close(fd) } }
        _ = try await runtime.request(adopt.frameType, body: adopt.body, descriptors: descriptors)
        return runtime
    }
}
