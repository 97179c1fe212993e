import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A new broker is handed every process's streams in batches of copied fds. A broker that dies
/// in the middle of a batch must not leave the copies of the batch's later processes open in
/// the supervisor: a broker that keeps dying (a crash loop, or a kill just after a live
/// upgrade's new image started handing it everything, as the soak did) would leak a batch's
/// worth of fds at every death.
@Suite("A broker killed while it is handed the streams", .timeLimit(.minutes(5)))
struct BrokerCrashReadoptionTests {
    static let handedLine = "streams handed to the restarted broker"

    /// The daemon log from `offset`: its new lines only (the log grows by thousands of lines).
    static func logTail(_ path: String, from offset: Int) -> (text: String, end: Int) {
        let bytes = readFile(path) ?? []
        guard bytes.count > offset else { return ("", offset) }
        return (String(decoding: bytes[offset...], as: UTF8.self), bytes.count)
    }

    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aBrokerKilledWhileItIsHandedTheStreamsLeavesNoCopyOfTheirFDsOpen() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let count = 48
        let go = daemon.directory.file("go")
        // One broker restart first: what a restart opens once for good (a timer for its
        // back-off's clock) is then in the count the end is compared with.
        _ = try await killBroker(of: daemon, times: 1, pause: 0...0)
        // Pipes only: every copy is one (the processes' pipes and their windows), while the
        // sockets come and go with each control connection a status call makes.
        func pipes() -> [Int32: String] { descriptorTable(pid: daemon.daemonPID).filter { $0.value.hasPrefix("pipe:") } }
        let idle = pipes()

        var outputs: [String: Task<[UInt8], Never>] = [:]
        for index in 0..<count {
            let id = "h\(index)"
            outputs[id] = collect(try daemon.streams.open(token: bytes("\(id)-out"), direction: .receive))
            _ = try await daemon.launch(ProcessSpec(
                id: id, argv: ["sh", "-c", "while [ ! -e \(go) ]; do sleep 1; done; echo \(id) done"], stdout: daemon.spec("\(id)-out")))
        }
        #expect(pipes().count > idle.count + count, "the supervisor holds each process's fds")

        // Three times: kill the broker, and kill its successor as soon as it was handed its
        // first process (the supervisor is then inside a batch of 8, its copies made).
        for round in 1...3 {
            // The broker to kill has every process, and the log has every line of its handing:
            // lines go out through a writer thread, so one about the last broker could otherwise
            // land after the offset below and pass for its successor's.
            try await eventually("round \(round): every process with the broker", timeout: .seconds(30)) {
                try await daemon.brokerStreams().count >= count
            }
            var size = -1
            try await eventually("round \(round): the log written out") {
                let now = (readFile(daemon.logPath) ?? []).count
                defer { size = now }
                try await Task.sleep(for: .milliseconds(100))
                return now == size
            }
            let broker = try #require(try await daemon.rolePID("broker"))
            let killed = ProcessIdentity(broker)
            var offset = (readFile(daemon.logPath) ?? []).count
            kill(broker, SIGKILL)
            var handed = 0
            let deadline = ContinuousClock.now + .seconds(30)
            while handed == 0 && ContinuousClock.now < deadline {
                let tail = Self.logTail(daemon.logPath, from: offset)
                offset = tail.end
                handed = tail.text.components(separatedBy: Self.handedLine).count - 1
                // A millisecond's sleep, not a busy usleep: this loop runs on the concurrency
                // pool, whose threads the daemon fixture's and other tests' tasks need.
                if handed == 0 { try await Task.sleep(for: .milliseconds(1)) }
            }
            try #require(handed > 0, "round \(round): the successor was handed a process within 30 s")
            let successor = try #require(try await daemon.rolePID("broker"))
            // Another process, even under the same pid (the suite's ns_last_pid writes make
            // the kernel give one again at once).
            let successorIdentity = ProcessIdentity(successor)
            #expect(successorIdentity != killed, "round \(round): a new broker")
            kill(successor, SIGKILL)
            // Waits for the next broker to have everything (the one killed may have had it all).
            try await eventually("round \(round): a broker that lives", timeout: .seconds(30)) {
                let pid = try await daemon.rolePID("broker")
                return pid.flatMap(ProcessIdentity.init).map { $0 != successorIdentity && $0.isAlive } ?? false
            }
        }
        // The last broker takes every process over.
        try await eventually("every process handed to a broker that lives", timeout: .seconds(30)) {
            let streams = try await daemon.brokerStreams()
            return streams.count >= count
        }
        try writeFile(go, [])
        for index in 0..<count {
            let id = "h\(index)"
            let report = try await daemon.wait(id)
            #expect(report.exitCode == 0 && report.undelivered == 0, "\(id): \(report)")
            #expect(await outputs[id]!.value == bytes("\(id) done\n"), "\(id)'s output, exact")
        }
        // Every process done: the supervisor holds the pipes it held before any was started,
        // and no copy made for a broker that died.
        do {
            try await eventually("the supervisor's pipes back to the \(idle.count) it held before", timeout: .seconds(15)) { pipes() == idle }
        } catch {
            let extra = pipes().filter { idle[$0.key] != $0.value }.sorted { $0.key < $1.key }
            Issue.record("\(extra.count) pipe fds the supervisor did not hold before the processes: \(extra.map { "\($0.key):\($0.value)" })")
        }
        #expect(try await daemon.stop() == .exited(0))
    }
}
