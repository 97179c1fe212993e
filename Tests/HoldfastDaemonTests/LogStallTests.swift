import CHoldfastShims
import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import NIOConcurrencyHelpers
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The daemon's stderr is its journal under systemd. journald stopped (SIGSTOP) or too slow, or
/// `holdfast daemon 2>&1 | less` left paused: nobody reads, the pipe fills, and a `write(2)` of a
/// log line blocks. Before log lines went through a writer thread of their own, the thread that
/// logged waited there: on this machine's two cooperative threads, the supervisor stopped
/// answering creates, and the broker its control channel.
@Suite("A log nobody reads", .timeLimit(.minutes(5)))
struct LogStallTests {
    /// Bytes waiting in the pipe `fd` reads.
    static func waiting(_ fd: Int32) -> Int {
        var count: Int32 = 0
        return hf_ioctl_fionread(fd, &count) == 0 ? Int(count) : -1
    }

    /// The daemon's stdout and stderr: a 4 KiB pipe, filled and then not read. Processes are
    /// created, stream and exit, `status` answers, the broker is killed and its successor takes
    /// the streams over, and a live upgrade replaces all three with a stream flowing across it —
    /// all while every line any of the processes logs waits. Read again, the log gives what was
    /// logged meanwhile, in order.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aLogNobodyReadsStallsNeitherCreatesNorStreamsNorABrokerRestartNorAnUpgrade() async throws {
        let binary = try InstalledBinary()
        defer { binary.remove() }
        let daemon = try await DaemonFixture(executable: binary.path, logToPipe: true)
        defer { daemon.cleanUp() }
        let log = try #require(daemon.logPipe)

        // Fill the pipe: start-up logged some; each create logs more. A line that does not fit
        // what is left of the pipe's one page waits whole, so the pipe is full when a few more
        // creates leave it as it was.
        var fillers = 0
        var unchanged = 0
        while unchanged < 5 {
            fillers += 1
            try #require(fillers < 500, "the pipe never filled: \(Self.waiting(log)) bytes")
            let before = Self.waiting(log)
            let id = "filler\(fillers)"
            _ = try await withDeadline("the create of \(id)") { try await daemon.launch(ProcessSpec(id: id, argv: ["true"])) }
            _ = try await withDeadline("the exit of \(id)") { try await daemon.wait(id) }
            try await Task.sleep(for: .milliseconds(20))
            unchanged = Self.waiting(log) == before && before > 3500 ? unchanged + 1 : 0
        }
        let full = Self.waiting(log)

        // From here every log line of the supervisor, the broker and the bridge worker waits.
        for round in 0..<3 {
            var received: [String: Task<[UInt8], Never>] = [:]
            for index in 0..<4 {
                let id = "r\(round)p\(index)"
                let output = try daemon.streams.open(token: bytes("\(id)-out"), direction: .receive)
                received[id] = collect(output)
                _ = try await withDeadline("the create of \(id)", .seconds(20)) {
                    try await daemon.launch(ProcessSpec(id: id, argv: counterCommand(300, prefix: id, pause: "0.001"), stdout: daemon.spec("\(id)-out")))
                }
            }
            for (id, output) in received {
                let report = try await withDeadline("the exit of \(id)", .seconds(30)) { try await daemon.wait(id) }
                #expect(report.exitCode == 0, "\(id): \(report)")
                #expect(await output.value == expectedLines(300, prefix: id), "\(id)'s output, exact")
            }
            #expect(try await withDeadline("status", .seconds(10)) { try await daemon.status() }.bridge == .up)
            #expect(Self.waiting(log) == full, "the pipe stays as full as it was: nobody read it, nothing more fit")
        }

        // A broker crash, which logs in all three processes, and a stream it must take over.
        let output = try daemon.streams.open(token: bytes("crash-out"), direction: .receive)
        let crashReceived = collect(output)
        _ = try await withDeadline("the create of crash") { try await daemon.launch(ProcessSpec(id: "crash", argv: counterCommand(1000, prefix: "crash", pause: "0.002"), stdout: daemon.spec("crash-out"))) }
        let broker = try #require(try await withDeadline("the broker's pid") { try await daemon.rolePID("broker") })
        let identity = ProcessIdentity(broker)
        try await Task.sleep(for: .milliseconds(300))
        kill(broker, SIGKILL)
        try await withDeadline("a new broker", .seconds(40)) {
            try await eventually("a new broker", timeout: .seconds(30)) { try await daemon.roleIsAnother("broker", than: identity) }
        }
        let report = try await withDeadline("the exit of crash", .seconds(60)) { try await daemon.wait("crash") }
        #expect(report.exitCode == 0)
        #expect(await crashReceived.value == expectedLines(1000, prefix: "crash"), "taken over by the next broker, exact")

        // A live upgrade: each image waits at most 0.5 s for its queue before the exec (what is
        // still queued then is lost), the broker as long before its quiesce exit.
        let across = collect(try daemon.streams.open(token: bytes("across-out"), direction: .receive))
        _ = try await withDeadline("the create of across") {
            try await daemon.launch(ProcessSpec(id: "across", argv: counterCommand(800, prefix: "across", pause: "0.003"), stdout: daemon.spec("across-out")))
        }
        try await Task.sleep(for: .milliseconds(300))
        let upgrade = try await runUpgrade(daemon, processes: daemon.processes)
        #expect(upgrade.status == .exited(0), "\(upgrade.output)")
        let acrossReport = try await withDeadline("the exit of across", .seconds(60)) { try await daemon.wait("across") }
        #expect(acrossReport.exitCode == 0)
        #expect(await across.value == expectedLines(800, prefix: "across"), "streamed across the upgrade, exact")
        #expect(Self.waiting(log) == full, "the pipe still as full: nobody read it")

        // The reader is back: what was logged meanwhile comes out, and it reads on to the end.
        let drained = NIOLockedValueBox<[UInt8]>([])
        let reading = NIOLockedValueBox(true)
        let reader = Task.detached {
            var buffer = [UInt8](repeating: 0, count: 65536)
            while reading.withLockedValue({ $0 }) {
                var poller = pollfd(fd: log, events: Int16(POLLIN), revents: 0)
                guard poll(&poller, 1, 50) > 0 else { continue }
                let count = buffer.withUnsafeMutableBytes { read(log, $0.baseAddress, $0.count) }
                if count > 0 { drained.withLockedValue { $0 += buffer[..<count] } }
            }
        }
        func text() -> String { String(decoding: drained.withLockedValue { $0 }, as: UTF8.self) }
        // The old image's queue went with its exec (nobody read for its 0.5 s): the new image says
        // how many lines that was, in a warning logged just after its "resumed" line (which a
        // read can come between: wait for the warning itself).
        try await eventually("the new image's lines", timeout: .seconds(20)) {
            text().contains("resumed after a live upgrade") && text().contains("were not written")
        }
        let lostLine = try #require(text().split(separator: "\n").first { $0.contains("log lines of the image before this live upgrade were not written") })
        let lost = lostLine.components(separatedBy: "up to ").last?.split(separator: " ").first.flatMap { Int($0) } ?? 0
        #expect(lost > 0, "\(lostLine)")
        #expect(!text().contains("log lines dropped"), "a few hundred lines fit the queue: none dropped")
        #expect(try await withDeadline("the stop") { try await daemon.stop() } == .exited(0))
        try await eventually("the supervisor's last line, written before it exited", timeout: .seconds(10)) { text().contains("holdfast daemon stopped") }
        reading.withLockedValue { $0 = false }
        await reader.value
    }
}
