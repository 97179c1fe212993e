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

/// Issue 16: a broker killed with SIGKILL loses nothing it does not report. The supervisor holds
/// every process's pipes (no SIGPIPE, no false end-of-file) and the streams' checkpoints; the
/// restarted broker takes the streams over, tells the host of the bytes the crash took (a gap),
/// and reports each exit once.
@Suite("A broker crash: the supervisor holds the fds, the next broker resumes", .timeLimit(.minutes(5)))
struct BrokerCrashTests {
    /// Broker kills in the first test. The role back-off doubles from 100 ms to 5 s while the
    /// broker keeps dying young, so each kill after the sixth costs 5 s.
    static let kills = 10

    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aBrokerKilledAgainAndAgainWhileBytesFlowLosesOnlyWhatItReports() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let id = "crash"
        let output = try daemon.streams.open(token: bytes("\(id)-out"), direction: .receive)
        let input = try daemon.streams.open(token: bytes("\(id)-in"), direction: .send)
        let received = collect(output)
        let exits = NIOLockedValueBox<[ExitReport]>([])
        let exitWatch = Task {
            for await exit in daemon.bridge.exits where exit.id == id { exits.withLockedValue { $0.append(exit) } }
        }
        defer { exitWatch.cancel() }
        let directory = daemon.directory
        let (stop, copy, count) = (directory.file("stop"), directory.file("stdin.copy"), directory.file("count"))
        // It checks every write itself (SIGPIPE would kill it: 141); `cat` copies its stdin until
        // the host ends it (a false end-of-file shows as a short copy). A background job's stdin
        // is /dev/null unless redirected, hence fd 3.
        let script = """
            exec 3<&0
            cat <&3 > \(copy) & reader=$!
            exec 3<&-
            i=0
            while [ ! -e \(stop) ]; do
              i=$((i+1)); echo line $i || exit 3
              [ $((i % 100)) -ne 0 ] || sleep 0.02
            done
            echo $i > \(count)
            wait $reader || exit 4
            """
        _ = try await daemon.bridge.create(ProcessSpec(
            id: id, argv: ["sh", "-c", script], stdin: daemon.spec("\(id)-in"), stdout: daemon.spec("\(id)-out")))
        try await eventually("both streams connected") {
            let streams = try await daemon.brokerStreams().filter { $0.process == id }
            return streams.count == 2 && streams.allSatisfy { $0.state == .connected }
        }
        // The host writes numbered lines to its stdin throughout.
        let typist = NumberedTypist { try await input.send($0) }
        let brokers = try await killBroker(of: daemon, times: Self.kills, pause: 20...400)
        try await Task.sleep(for: .milliseconds(300))
        let sent = await typist.stop()
        let inputUndelivered = await input.finish()
        try writeFile(stop, [])

        try await eventually("the exit", timeout: .seconds(60)) { !exits.withLockedValue { $0 }.isEmpty }
        let data = await received.value
        // A repeat would come within moments (it is pushed as soon as it is queued).
        try await Task.sleep(for: .milliseconds(500))
        let reported = exits.withLockedValue { $0 }
        #expect(reported.count == 1, "one exit: \(reported)")
        let exit = try #require(reported.first)
        #expect(exit.exitCode == 0 && exit.signal == nil, "no SIGPIPE, no write error, no false end-of-file: \(exit)")
        #expect(exit.outputCutShort == nil, "the exit waited for the output: \(exit)")

        // Output: every byte the process wrote, except exactly the ranges reported lost.
        let lines = try #require(Int(String(decoding: readFile(count) ?? [], as: UTF8.self).filter(\.isNumber)))
        let lost = output.statistics.lost
        #expect(lost.ranges.count < GapRecord.keptRanges, "every lost range is listed")
        let outputMatches = matchesAcrossGaps(data, all: expectedLines(lines), gaps: lost.ranges)
        #expect(outputMatches, "stdout: \(data.count) bytes of \(expectedLines(lines).count) written, lost \(lost.summary)")
        #expect(exit.undelivered == 0 && (exit.lost ?? 0) == lost.bytes, "the exit counts the lost bytes, apart from undelivered ones: \(exit)")
        #expect(lost.bytes == 0, "a read a crash interrupted is settled by its window's level: nothing lost (\(lost.summary))")

        // Input: every byte the host sent, in order, once: a write into the stage a crash
        // interrupted is settled by the stage's level. (Were it not, the log would name the
        // bytes that might repeat, and the exit would count them.) The last broker's lines of
        // its take-over are read once its line for the process's streams, logged after them
        // through the same writer thread, is in the file.
        try await daemon.waitForLog("resumed streams the previous broker held pid=\(brokers.last!) process=\(id) ")
        let repeats = inputRepeats(in: daemon.log, process: id)
        let copied = readFile(copy) ?? []
        #expect(inputUndelivered == 0)
        let inputMatches = matches(copied, sent: sent, repeats: repeats)
        #expect((exit.inputRepeated ?? 0) == UInt64(repeats.reduce(0) { $0 + $1.count }), "the exit counts what the log names as possibly repeated: \(exit)")
        #expect(inputMatches, "stdin: \(copied.count) bytes copied, \(sent.count) sent, repeats \(repeats)")
        #expect(repeats.isEmpty && copied == sent, "stdin: every byte once")

        // Pids come back over a long suite (pid_max 32,768 here): each broker differs from the one
        // before it, and the restart count says one per kill.
        #expect(brokers.count == Self.kills + 1 && zip(brokers, brokers.dropFirst()).allSatisfy { $0 != $1 }, "a new broker each time: \(brokers)")
        #expect(try await daemon.status().roles.first { $0.name == "broker" }?.restarts == Self.kills)
        // Each take-over says why the broker changed: its predecessor's death, not an upgrade.
        #expect(daemon.log.contains("the restarted broker took processes over") && daemon.log.contains("after=the previous broker's end (killed by signal 9"))
        #expect(!daemon.log.contains("after=a live upgrade"))
        print(
            "\(Self.kills) broker kills: stdout \(data.count) bytes received, \(lost.bytes) lost in \(lost.ranges.count) ranges (\(lost.summary)); "
                + "stdin \(sent.count) bytes sent, \(repeats.count) possible repeats")
        #expect(try await daemon.stop() == .exited(0))
    }

    /// The process's pipes keep a holder while the broker is dead (the supervisor's copies, seen
    /// in /proc), so a process writing 2 MiB across the crash and reading its stdin after it
    /// sees neither SIGPIPE nor end-of-file, and the host gets every byte.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func theSupervisorHoldsEveryPipeWhileTheBrokerIsDead() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let id = "held"
        let output = try daemon.streams.open(token: bytes("\(id)-out"), direction: .receive)
        let input = try daemon.streams.open(token: bytes("\(id)-in"), direction: .send)
        let received = collect(output)
        let payload = (0..<(2 << 20)).map { _ in UInt8.random(in: 0...255) }
        let (go, payloadPath) = (daemon.directory.file("go"), daemon.directory.file("payload"))
        try writeFile(payloadPath, payload)
        let pid = try await daemon.launch(ProcessSpec(
            id: id,
            argv: ["sh", "-c", "while [ ! -e \(go) ]; do sleep 0.01; done; cat \(payloadPath) || exit 3; read -r line || exit 4; echo \"$line\""],
            stdin: daemon.spec("\(id)-in"), stdout: daemon.spec("\(id)-out")))
        try await eventually("both streams connected") {
            let streams = try await daemon.brokerStreams().filter { $0.process == id }
            return streams.count == 2 && streams.allSatisfy { $0.state == .connected }
        }
        let broker = try #require(try await daemon.rolePID("broker"))
        let killedBroker = ProcessIdentity(broker)
        let pipes = descriptorTable(pid: pid)
        let (stdin, stdout) = (try #require(pipes[0]), try #require(pipes[1]))
        kill(broker, SIGKILL)
        try await eventually("the broker reaped") { access("/proc/\(broker)", F_OK) != 0 }
        try writeFile(go, [])
        // Whether or not its successor is up yet: the supervisor has both pipes.
        let supervisor = Set(descriptorTable(pid: daemon.daemonPID).values)
        #expect(supervisor.contains(stdin), "the supervisor holds the stdin pipe (\(stdin)): \(holders(of: stdin))")
        #expect(supervisor.contains(stdout), "the supervisor holds the stdout pipe (\(stdout)): \(holders(of: stdout))")
        try await eventually("a new broker") { try await daemon.roleIsAnother("broker", than: killedBroker) }
        try await input.send(bytes("after the crash\n"))
        _ = await input.finish()
        let report = try await daemon.wait(id)
        #expect(report.exitCode == 0, "no SIGPIPE, no end-of-file: \(report)")
        let lost = output.statistics.lost
        let data = await received.value
        #expect(matchesAcrossGaps(data, all: payload + bytes("after the crash\n"), gaps: lost.ranges), "\(data.count) bytes received, lost \(lost.summary)")
        #expect(report.undelivered == 0 && (report.lost ?? 0) == lost.bytes, "\(report)")
        #expect(lost.bytes == 0, "nothing lost: \(lost.summary)")
        print("2 MiB across a broker crash: \(lost.bytes) bytes lost (\(lost.summary))")
        #expect(try await daemon.stop() == .exited(0))
    }

    /// A process that exited while its output could not drain (the host refusing its streams)
    /// is handed to the restarted broker with its exit: the output still arrives, whole, and the
    /// exit is reported once, after it — not cut short when its broker died.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func anExitWaitingForItsDrainSurvivesABrokerCrash() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let id = "draining"
        let output = try daemon.streams.open(token: bytes("\(id)-out"), direction: .receive)
        let received = collect(output)
        let payload = (0..<(256 << 10)).map { _ in UInt8.random(in: 0...255) }
        let payloadPath = daemon.directory.file("payload")
        try writeFile(payloadPath, payload)
        daemon.streams.setRefusing(true)
        _ = try await daemon.launch(ProcessSpec(id: id, argv: ["cat", payloadPath], stdout: daemon.spec("\(id)-out")))
        try await eventually("the process exited, its output waiting") {
            try await daemon.status().processes.first { $0.id == id }?.state == .exited
        }
        let broker = try #require(try await daemon.rolePID("broker"))
        let killedBroker = ProcessIdentity(broker)
        kill(broker, SIGKILL)
        try await eventually("a new broker") { try await daemon.roleIsAnother("broker", than: killedBroker) }
        try await eventually("the stream handed over again") {
            try await daemon.brokerStreams().contains { $0.process == id }
        }
        #expect(try await daemon.status().processes.first { $0.id == id }?.state == .exited, "not reported while undrained")
        daemon.streams.setRefusing(false)
        let report = try await daemon.wait(id)
        let data = await received.value
        // What the dead broker had read into its replay ring while parked is in the shared ring
        // area: the next broker sends it. Nothing is lost.
        let lost = output.statistics.lost
        #expect(lost.bytes == 0, "lost \(lost.summary)")
        #expect(report.exitCode == 0 && report.outputCutShort == nil && report.undelivered == 0 && (report.lost ?? 0) == lost.bytes, "\(report)")
        #expect(matchesAcrossGaps(data, all: payload, gaps: lost.ranges), "\(data.count) bytes received, lost \(lost.summary)")
        print("an exit waiting for its drain across a broker crash: \(lost.bytes) of \(payload.count) bytes lost (\(lost.summary))")
        #expect(try await daemon.stop() == .exited(0))
    }
}

/// The host typing numbered lines ("in 1", "in 2", ...) into a process's stdin until `stop()`,
/// paced like the processes (20 lines, then 20 ms) so a crash test does not starve the tests
/// beside it. `stop()` returns every byte it sent, in order.
final class NumberedTypist: Sendable {
    private let sending = NIOLockedValueBox(true)
    private let task: Task<[UInt8], Never>

    init(_ send: @escaping @Sendable ([UInt8]) async throws -> Void) {
        let sending = self.sending
        task = Task {
            var sent: [UInt8] = []
            var number = 0
            while sending.withLockedValue({ $0 }) {
                number += 1
                let line = bytes("in \(number)\n")
                do { try await send(line) } catch { break }
                sent += line
                if number % 20 == 0 { try? await Task.sleep(for: .milliseconds(20)) }
            }
            return sent
        }
    }

    func stop() async -> [UInt8] {
        sending.withLockedValue { $0 = false }
        return await task.value
    }
}

/// Kills the daemon's broker with SIGKILL `count` times, a random `pause` (ms) before each,
/// waiting each time for its successor (and for `afterEach`, given the round). Returns every
/// broker's pid, the first one's included.
func killBroker(
    of daemon: DaemonFixture, times count: Int, pause: ClosedRange<Int>, afterEach: (Int) async throws -> Void = { _ in }
) async throws -> [pid_t] {
    var brokers = [try #require(try await daemon.rolePID("broker"))]
    for round in 1...count {
        try await Task.sleep(for: .milliseconds(Int.random(in: pause)))
        kill(brokers.last!, SIGKILL)
        try await eventually("broker \(round + 1)", timeout: .seconds(30)) {
            let pid = try await daemon.rolePID("broker")
            return pid != nil && pid != brokers.last
        }
        brokers.append(try #require(try await daemon.rolePID("broker")))
        try await afterEach(round + 1)
    }
    return brokers
}

/// The input bytes the daemon's log says may reach the process twice: (first offset, count),
/// in the order the broker resumed them.
func inputRepeats(in log: String, process: String) -> [(from: Int, count: Int)] {
    log.split(separator: "\n").filter { $0.contains("may reach the process twice") && $0.contains("process=\(process) ") }.compactMap { line in
        func field(_ name: String) -> Int? {
            guard let start = line.range(of: " \(name)=") else { return nil }
            return Int(line[start.upperBound...].prefix { $0.isNumber })
        }
        guard let from = field("from"), let count = field("uncertain") else { return nil }
        return (from, count)
    }
}

/// Whether `copied` is `sent` with, at each of `repeats`, at most `count` bytes from `from`
/// delivered a second time (what a crash mid-write may do), and no other difference.
func matches(_ copied: [UInt8], sent: [UInt8], repeats: [(from: Int, count: Int)]) -> Bool {
    var copiedAt = 0
    var sentAt = 0
    for (from, count) in repeats.sorted(by: { $0.from < $1.from }) {
        // Up to the repeat: the same bytes.
        guard from >= sentAt, from <= sent.count, copiedAt + (from - sentAt) <= copied.count,
            copied[copiedAt..<(copiedAt + from - sentAt)] == sent[sentAt..<from]
        else { return false }
        copiedAt += from - sentAt
        sentAt = from
        // Some bytes from `from` again: the longest repeat after which the copy goes on as sent.
        let repeated = (0...count).reversed().first { length in
            let check = min(64, sent.count - from)
            return from + length <= sent.count && copiedAt + length + check <= copied.count
                && copied[copiedAt..<(copiedAt + length)] == sent[from..<(from + length)]
                && copied[(copiedAt + length)..<(copiedAt + length + check)] == sent[from..<(from + check)]
        }
        copiedAt += repeated ?? 0
    }
    return copied[copiedAt...].elementsEqual(sent[sentAt...])
}

/// Whether `data` (what the host received) is `all` (what the process wrote) less what the
/// reported `gaps` (stream offsets, sorted) took. A gap over a read a crash interrupted names the
/// read's whole length: the process lost between 0 and that many bytes there (the stream's
/// offsets after it are ahead of the process's by the difference), so each gap is matched by
/// the skip in `all` that lets the bytes after it continue exactly.
func matchesAcrossGaps(_ data: [UInt8], all: [UInt8], gaps: [Range<UInt64>]) -> Bool {
    var dataAt = 0
    var allAt = 0
    var streamAt: UInt64 = 0
    for (index, gap) in gaps.enumerated() {
        let before = Int(gap.lowerBound - streamAt)
        guard dataAt + before <= data.count, allAt + before <= all.count,
            data[dataAt..<(dataAt + before)] == all[allAt..<(allAt + before)]
        else { return false }
        dataAt += before
        allAt += before
        streamAt = gap.upperBound
        // The bytes after the gap (up to the next one, at most 4 KiB) fix how many it took.
        let nextGap = index + 1 < gaps.count ? Int(gaps[index + 1].lowerBound - streamAt) : data.count - dataAt
        let probe = min(4096, nextGap, data.count - dataAt)
        guard
            let skipped = (0...gap.count).first(where: { skip in
                allAt + skip + probe <= all.count && all[(allAt + skip)..<(allAt + skip + probe)] == data[dataAt..<(dataAt + probe)]
            })
        else { return false }
        allAt += skipped
    }
    return data[dataAt...].elementsEqual(all[allAt...])
}

@Suite("The crash tests' own check of output across reported gaps")
struct GapMatchingTests {
    @Test func aGapThatTookFewerBytesThanItNamesStillMatchesAndAnythingElseDoesNot() {
        let all = expectedLines(5000)
        // A read at 10,000 asked for 4,096 bytes and took 1,000 before the kill: the stream
        // skips 4,096 offsets, the host gets everything but those 1,000 bytes.
        let data = Array(all[..<10_000] + all[11_000...])
        #expect(matchesAcrossGaps(data, all: all, gaps: [10_000..<14_096]))
        #expect(!matchesAcrossGaps(data, all: all, gaps: []), "a loss nobody reported")
        var corrupted = data
        corrupted[12_000] ^= 1
        #expect(!matchesAcrossGaps(corrupted, all: all, gaps: [10_000..<14_096]), "a wrong byte after the gap")
        // Two gaps, the second after the shift of the first.
        let twice = Array(all[..<5_000] + all[5_500..<20_000] + all[20_100...])
        #expect(matchesAcrossGaps(twice, all: all, gaps: [5_000..<6_000, 20_500..<21_500]))
        // Nothing lost.
        #expect(matchesAcrossGaps(all, all: all, gaps: []))
    }
}
