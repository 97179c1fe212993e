import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import HoldfastTools
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A process that exits leaving an orphan that holds its stdout and writes on: its exit is
/// reported after the drain timeout (`still-open`) and the broker relays the orphan's output on.
/// Before, the output's checkpoint and replay-ring slots were freed at the exit report and
/// handed to the next process's stream while the orphan's went on writing into them: the
/// orphan's bytes in the other's replay ring, both streams' checkpoints overwritten by the
/// other — so a broker crash resumed the victim at the orphan's offsets. Now they stay out of
/// reuse until the broker says the held-open output ended (or dies).
@Suite("An output held open past its process's exit keeps its slots", .serialized, .timeLimit(.minutes(3)))
struct HeldOpenOutputTests {
    /// Short, so that the exit is reported soon; not shorter: it also bounds an output that makes
    /// no progress (the host not taking it), and at 1 s a loaded machine's host reader stalled
    /// once long enough for the orphan's output to be given up (a full suite: no byte after the
    /// exit); at 3 s once more, in a fresh clone's `make test` (the test took 117 s there).
    static let drainTimeout = "6s"

    /// Slots reused at once (`HOLDFAST_SLOT_QUARANTINE=0`, debug builds), so the victim would be
    /// given the orphan's: its every line arrives once, in order, across four dropped
    /// connections (replays from its ring) and a broker crash (a resume from its checkpoint),
    /// and the orphan's stream carries only the orphan's bytes.
    @Test(.enabled(if: DaemonFixture.canRun && Failpoint.compiledIn, "needs root and a debug build (the slot quarantine is set to 0)"))
    func aVictimStreamIsNeverGivenTheSlotsOfAnOutputAnOrphanHoldsOpen() async throws {
        let daemon = try await DaemonFixture(environment: ["HOLDFAST_SLOT_QUARANTINE": "0"], drainTimeout: Self.drainTimeout)
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let stop = daemon.directory.file("orphan-stop")
        defer { try? writeFile(stop, []) }
        let line = String(repeating: "x", count: 79)
        let orphanOutput = try await Self.exitLeavingAnOrphan(daemon, exits, loop: "echo \(line)", stop: stop)
        try await daemon.waitForLog("process streams drained")
        let countAtExit = orphanOutput.count

        let victimOutput = accumulate(try daemon.streams.open(token: bytes("v-out"), direction: .receive))
        _ = try await daemon.bridge.create(ProcessSpec(id: "victim", argv: ["seq", "1", "300000"], stdout: daemon.spec("v-out")))
        let broker = try #require(try await daemon.rolePID("broker"))
        try await eventually("the victim part-way") { victimOutput.count > 50_000 }
        // Waited for, not sampled: a loaded full suite once sampled it before the orphan's
        // relay had moved a byte since the exit (the victim's first 50 KB came first).
        try await eventually("the orphan's output relayed on after the exit", timeout: .seconds(30)) { orphanOutput.count > countAtExit }
        // Drops (the victim replays from its ring), then a crash (it resumes from its checkpoint).
        for _ in 0..<4 {
            _ = daemon.streams.dropAllConnections()
            try await Task.sleep(for: .milliseconds(150))
        }
        #expect(kill(broker, SIGKILL) == 0)
        try await eventually("the victim's exit", timeout: .seconds(60)) { exits.count("victim") == 1 }
        let expected = Array((1...300_000).map { "\($0)\n" }.joined().utf8)
        try await eventually("every line of the victim", timeout: .seconds(30)) { victimOutput.count >= expected.count }
        #expect(victimOutput.count == expected.count && victimOutput.bytes == expected, "\(victimOutput.count) of \(expected.count) bytes, in order")
        #expect(exits.all.first { $0.id == "victim" }?.undelivered == 0)
        let foreign = orphanOutput.bytes.filter { $0 != UInt8(ascii: "x") && $0 != UInt8(ascii: "\n") }
        #expect(foreign.isEmpty, "the orphan's stream carries only its own bytes: \(foreign.prefix(64))")
        try writeFile(stop, [])
        #expect(try await daemon.stop() == .exited(0))
    }

    /// Once the orphan lets go, the broker says the output ended (`output-settled`) and its slot
    /// is free again: the next stream is given it (slots reused at once).
    @Test(.enabled(if: DaemonFixture.canRun && Failpoint.compiledIn, "needs root and a debug build (the slot quarantine is set to 0)"))
    func theSlotsOfAnOutputHeldOpenAreFreeOnceItEnds() async throws {
        let daemon = try await DaemonFixture(environment: ["HOLDFAST_SLOT_QUARANTINE": "0"], drainTimeout: Self.drainTimeout)
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let stop = daemon.directory.file("orphan-stop")
        defer { try? writeFile(stop, []) }
        let orphanOutput = try await Self.exitLeavingAnOrphan(daemon, exits, loop: "echo held; sleep 0.05", after: "echo last", stop: stop)
        try await daemon.waitForLog("process=attacker role=broker slots=")
        #expect(daemon.log.contains("process=attacker role=broker slots=stdout:0"), "the attacker has slot 0")
        try writeFile(stop, [])
        try await eventually("the orphan's last line") { String(decoding: orphanOutput.bytes, as: UTF8.self).hasSuffix("held\nlast\n") }
        try await daemon.waitForLog("an output held open past its exit ended: its slots are free")
        let output = accumulate(try daemon.streams.open(token: bytes("n-out"), direction: .receive))
        _ = try await daemon.bridge.create(ProcessSpec(id: "next", argv: ["echo", "next"], stdout: daemon.spec("n-out")))
        try await eventually("the next process's output") { output.count >= 5 }
        // Its adopt's line, whichever slot it names, reaches the file through the log's writer
        // thread: waited for before it is read.
        try await daemon.waitForLog("process=next role=broker slots=")
        #expect(daemon.log.contains("process=next role=broker slots=stdout:0"), "the freed slot is given out again: \(daemon.log.suffix(1500))")
        #expect(try await daemon.stop() == .exited(0))
    }

    /// An output held open past its process's exit is in `status` (said to be so) and its bytes
    /// in the broker's counters while the orphan writes, and once it ends the counter holds every
    /// byte the host received. Before, it vanished from `status` at the exit and the counters
    /// stopped at the bytes it had then: an orphan writing for months was seen nowhere.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func anOutputHeldOpenIsListedAndCountedUntilItEnds() async throws {
        let daemon = try await DaemonFixture(drainTimeout: Self.drainTimeout)
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let stop = daemon.directory.file("orphan-stop")
        defer { try? writeFile(stop, []) }
        let output = try await Self.exitLeavingAnOrphan(daemon, exits, loop: "echo held-open-line; sleep 0.01", after: "echo last", stop: stop)
        try await daemon.waitForLog("process streams drained")
        try await eventually("listed as held open past the exit") {
            try await daemon.brokerStreams().contains { $0.process == "attacker" && $0.kind == .stdout && $0.heldOpenPastExit == true }
        }
        let shown = StatusPrinter.render(try await daemon.statusTheBrokerAnswered(), colour: false)
        #expect(shown.contains("attacker stdout: held open past its process's exit"), "\(shown)")
        // Counted as it goes: the counter passes what the host had at the drain.
        let atDrain = output.count
        try await eventually("the counter past the drain's bytes", timeout: .seconds(20)) {
            (try await daemon.bridge.stats().bytesToHost) > UInt64(atDrain + 2000)
        }
        // Its token is still in use: a new process given it is refused (it would splice onto
        // the orphan's stream at the host).
        do {
            let pid = try await daemon.bridge.create(ProcessSpec(id: "reuser", argv: ["echo", "x"], stdout: daemon.spec("a-out")))
            Issue.record("a stream took the token of an output held open: pid \(pid)")
        } catch {
            #expect(error.code == .tokenInUse && error.message.contains("an orphan holds open past its exit"), "\(error)")
        }
        try writeFile(stop, [])
        try await eventually("the orphan's last line", timeout: .seconds(30)) { String(decoding: output.bytes, as: UTF8.self).hasSuffix("\nlast\n") }
        try await daemon.waitForLog("an output held open past its process's exit ended")
        try await eventually("no longer listed") { try await !daemon.brokerStreams().contains { $0.process == "attacker" } }
        let stats = try await daemon.bridge.stats()
        #expect(stats.bytesToHost == UInt64(output.count), "every byte the host received, counted once: \(stats.bytesToHost) of \(output.count)")
        #expect(stats.undelivered == 0)
        #expect(try await daemon.stop() == .exited(0))
    }

    /// The broker relaying an orphan's output past its process's exit is killed, and then the
    /// daemon is live-upgraded: the orphan writes on, and every line it writes reaches the host
    /// once, in order, to its last. Before, the supervisor closed its copies of the output's fds
    /// at the exit report: the dying broker's were the pipe's last reader, so the orphan's next
    /// write took SIGPIPE — its output cut, nothing said — at every broker crash and `dpkg -i`.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func anOrphansOutputOutlivesABrokerCrashAndALiveUpgrade() async throws {
        try await Self.orphanCountsThroughABrokerKill(environment: [:], thenAnUpgrade: true)
    }

    /// The same across a broker crash whose successor cannot copy the output's fds at first (out
    /// of fds, as right after a crash: a debug failpoint fails its first tries): it is handed over
    /// once they can be copied. Before, it was let go at the first failure — the supervisor's
    /// copies closed, the orphan left a pipe without a reader.
    @Test(.enabled(if: DaemonFixture.canRun && Failpoint.compiledIn, "needs root and a debug build (a failpoint fails the copies)"))
    func anOrphansOutputWaitsOutAShortageOfFdsAfterABrokerCrash() async throws {
        try await Self.orphanCountsThroughABrokerKill(environment: ["HOLDFAST_FAILPOINT": "\(Failpoint.readoptionCopyFails):attacker"], thenAnUpgrade: false)
    }

    /// An orphan counting lines on its process's stdout past the exit; its broker SIGKILLed (and,
    /// with `thenAnUpgrade`, the daemon live-upgraded after): its output relayed on after each,
    /// then every line once, in order, to its last, and its slots freed once it ended.
    static func orphanCountsThroughABrokerKill(environment: [String: String], thenAnUpgrade: Bool) async throws {
        let daemon = try await DaemonFixture(environment: environment, drainTimeout: Self.drainTimeout)
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let stop = daemon.directory.file("orphan-stop")
        defer { try? writeFile(stop, []) }
        let output = try await Self.exitLeavingAnOrphan(daemon, exits, loop: "i=$((i+1)); echo $i; sleep 0.005", after: "echo last", stop: stop)
        try await daemon.waitForLog("process streams drained")

        let broker = try #require(try await daemon.rolePID("broker").flatMap(ProcessIdentity.init))
        #expect(kill(broker.pid, SIGKILL) == 0)
        try await eventually("a new broker") { try await daemon.roleIsAnother("broker", than: broker) }
        let atRestart = output.count
        try await eventually("the orphan's output relayed on by the new broker", timeout: .seconds(30)) { output.count > atRestart + 200 }
        // Through the log's writer thread: waited for (read at once, a fresh clone's loaded run
        // found it not yet written).
        try await daemon.waitForLog("an output held open past its process's exit handed to the restarted broker")

        if thenAnUpgrade {
            let upgrade = try await runUpgrade(daemon, processes: daemon.processes)
            #expect(upgrade.status == .exited(0), "\(upgrade.output)")
            let atUpgrade = output.count
            try await eventually("the orphan's output relayed on after the upgrade") { output.count > atUpgrade + 200 }
        }

        try writeFile(stop, [])
        try await eventually("the orphan's last line", timeout: .seconds(30)) { String(decoding: output.bytes, as: UTF8.self).hasSuffix("\nlast\n") }
        let lines = String(decoding: output.bytes, as: UTF8.self).split(separator: "\n")
        let numbers = lines.dropLast().map { Int($0) }
        #expect(numbers == Array(1...max(1, numbers.count)), "every line once, in order: \(lines.count) lines")
        try await daemon.waitForLog("an output held open past its exit ended: its slots are free")
        #expect(try await daemon.stop() == .exited(0))
    }

    /// An orphan that holds the output and stays quiet longer than the drain timeout (a
    /// heartbeat every minute) is still relayed when it writes again, and its writes go on
    /// succeeding. Before, the broker gave the stream up one drain timeout after the exit, the
    /// host connected all along: the next line was dropped, and the one after died of SIGPIPE
    /// (the pipe had no reader left).
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aQuietOrphansNextLinesArriveAndItsWritesSucceed() async throws {
        let daemon = try await DaemonFixture(drainTimeout: "2s")
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        let done = daemon.directory.file("orphan-done")
        let output = accumulate(try daemon.streams.open(token: bytes("q-out"), direction: .receive))
        _ = try await daemon.bridge.create(ProcessSpec(
            id: "quiet", argv: ["sh", "-c", "(sleep 6; echo late; sleep 1; echo later; touch \(done)) & echo hi"], stdout: daemon.spec("q-out")))
        try await eventually("the exit, its output held open", timeout: .seconds(30)) { exits.count("quiet") == 1 }
        let expected = "hi\nlate\nlater\n"
        do {
            try await eventually("the orphan's lines", timeout: .seconds(60)) { output.count >= expected.utf8.count }
        } catch {
            Issue.record("got \(String(decoding: output.bytes, as: UTF8.self))")
            throw error
        }
        #expect(String(decoding: output.bytes, as: UTF8.self) == expected)
        try await eventually("the orphan's end, its writes having succeeded") { readFile(done) != nil }
        #expect(try await daemon.stop() == .exited(0))
    }

    /// Starts "attacker" over the bridge with its stdout to the host: it exits at once, leaving
    /// an orphan that runs `loop` until the file `stop` exists (then `after`) on that stdout;
    /// returns once the exit came (its output held open). What the host receives of it.
    static func exitLeavingAnOrphan(
        _ daemon: DaemonFixture, _ exits: ExitLog, loop: String, after: String = ":", stop: String
    ) async throws -> Accumulated {
        let output = accumulate(try daemon.streams.open(token: bytes("a-out"), direction: .receive))
        _ = try await daemon.bridge.create(ProcessSpec(
            id: "attacker", argv: ["sh", "-c", "(while [ ! -e \(stop) ]; do \(loop); done; \(after)) & exit 0"], stdout: daemon.spec("a-out")))
        try await eventually("the attacker's exit, its output held open", timeout: .seconds(30)) { exits.count("attacker") == 1 }
        return output
    }
}
