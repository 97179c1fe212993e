import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// An exit the old image had written down but not yet reported when it wrote its state.
///
/// A process's watcher records its exit in the table (`exited`), and only then reports it
/// (`complete`, or the broker told to drain it first). A live upgrade that writes its state in
/// between hands the next image a process already `exited`, whose exit nobody then reported:
/// the new image watched only running processes. Seen once in the 20-upgrade test under load
/// (one of 275 creates' exits never reached the host). The window is a few instructions wide, so
/// this test writes the state as it is in that window: a wrapper around the new binary marks two
/// processes `exited` with their report (the stdio store not yet told, as there) and kills them
/// (the old image had reaped them) before it execs the real binary.
@Suite("Live upgrade: an exit recorded but not yet reported when the state is written", .serialized, .timeLimit(.minutes(3)))
struct LiveUpgradeRecordedExitTests {
    @Test(.enabled(if: DaemonFixture.canRun && ContainmentTests.hasPython, "needs root (the daemon's broker runs as a uid of its own) and python3"))
    func theNextImageReportsEachExitOnceWithItsOutput() async throws {
        let binary = try InstalledBinary()
        defer { binary.remove() }
        // The "new binary" the daemon execs (by fd: a script cannot be) is a copy of env(1),
        // which runs the first argument it is given, `daemon`, from PATH: the script below.
        let (real, standInPath) = try binary.prepareStandIn()
        let daemon = try await DaemonFixture(environment: ["PATH": standInPath], executable: binary.path)
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        // Without streams (its exit is reported at once), with an output stream (reported once
        // drained), and one that goes on running across the upgrade.
        let quietPID = try await daemon.bridge.create(ProcessSpec(id: "quiet", argv: ["sleep", "1000"]))
        let loudOutput = collect(try daemon.streams.open(token: bytes("loud"), direction: .receive))
        let loudPID = try await daemon.bridge.create(ProcessSpec(
            id: "loud", argv: ["sh", "-c", "i=0; while [ $i -lt 500 ]; do i=$((i+1)); echo loud $i; done; exec sleep 1000"],
            stdout: daemon.spec("loud")))
        let steadyOutput = collect(try daemon.streams.open(token: bytes("steady"), direction: .receive))
        _ = try await daemon.bridge.create(ProcessSpec(
            id: "steady", argv: counterCommand(1500, prefix: "steady", pause: "0.002"), stdout: daemon.spec("steady")))
        try await eventually("every stream connected", timeout: .seconds(30)) {
            try await daemon.brokerStreams().filter { $0.state == .connected }.count == 2
        }

        // The state as the old image writes it in the window, then the real binary with it.
        let state = binary.directory.file("state.json")
        let edit = """
            import json, os, signal, sys
            mode, source, target = sys.argv[1:4]
            state = json.load(open(source))
            for entry in state["table"]["processes"]:
                if entry["id"] in ("quiet", "loud"):
                    entry["phase"] = "exited"
                    entry["report"] = {"id": entry["id"], "exitCode": 137, "signal": 9, "undelivered": 0}
                    if mode == "--resume-from":
                        os.kill(entry["pid"], signal.SIGKILL)
            json.dump(state, open(target, "w"))
            """
        // Called as `daemon --config FILE --resume-from FD` (or `--check-resume-snapshot FD`).
        try binary.installStandIn(script: "#!/bin/sh\npython3 - \"$3\" /proc/self/fd/$4 \(state) <<'EOF'\n\(edit)\nEOF\nexec \(real) daemon \"$1\" \"$2\" \"$3\" 9 9<\(state)\n")
        let upgrade = try await runUpgrade(daemon, processes: daemon.processes)
        #expect(upgrade.status == .exited(0), "\(upgrade.output)")
        #expect(kill(quietPID, 0) != 0 && kill(loudPID, 0) != 0, "the wrapper ended both")
        // The new image's lines reach the file through its log's writer thread, maybe after the
        // upgrade's answer: both waited for before they are read.
        func found() -> [Substring] { daemon.log.split(separator: "\n").filter { $0.contains("process exited before the live upgrade, not reported yet") } }
        try await eventually("the new image's line for each recorded exit") { found().count >= 2 }
        let said = found()
        #expect(said.count == 2 && said.contains { $0.contains("process=quiet") && $0.contains("after=nothing") }
            && said.contains { $0.contains("process=loud") && $0.contains("after=its output drains") }, "the new image says what it found: \(said)")

        // Each exit reaches the host once, with the report the old image wrote down; the
        // stream's output first, every line.
        try await eventually("both exits at the host", timeout: .seconds(30)) { exits.count("quiet") == 1 && exits.count("loud") == 1 }
        for id in ["quiet", "loud"] {
            let report = try #require(exits.all.first { $0.id == id })
            #expect(report.signal == SIGKILL && report.outputCutShort == nil, "\(report)")
        }
        #expect(try await withTimeout("loud's output", .seconds(30)) { await loudOutput.value } == expectedLines(500, prefix: "loud"))
        #expect(try await withTimeout("steady's output", .seconds(60)) { await steadyOutput.value } == expectedLines(1500, prefix: "steady"))
        try await eventually("steady's exit", timeout: .seconds(30)) { exits.count("steady") == 1 }
        try await Task.sleep(for: .milliseconds(300))
        #expect(exits.all.map(\.id).sorted() == ["loud", "quiet", "steady"], "each exit once: \(exits.all.map(\.id))")
        // Acknowledged, they are forgotten: nothing of them is left in the table.
        try await eventually("the table forgets them", timeout: .seconds(10)) { try await daemon.status().processes.isEmpty }
        #expect(try await daemon.stop() == .exited(0))
    }
}
