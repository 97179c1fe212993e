import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import HoldfastTools
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// The host end of a stream dies (a host agent killed or restarted) and a new one takes the
/// stream up where the old one's consumer stopped: `StreamServer.open(resumeAt:)`, and
/// `holdfast receive --output FILE --resume` built on it.
@Suite("A host end that restarts resumes its streams", .timeLimit(.minutes(5)))
struct HostRestartTests {
    /// `holdfast pipe` sends 24 MiB at a bounded pace; the `holdfast receive` writing it into a
    /// file is SIGKILLed three times mid-stream and started again with the same command line:
    /// the file ends up exactly the input (sha256), and every run after the first resumed
    /// where the file ended.
    @Test func aReceiverKilledMidStreamResumesItsFileExactly() async throws {
        let processes = TestProcesses()
        defer { processes.killAll() }
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let mib = 24
        let data = directory.file("data")
        let out = open(data, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        let head = try processes.start(["head", "-c", String(mib << 20), "/dev/urandom"], stdout: out)
        close(out)
        #expect(try await processes.wait(head, timeout: .seconds(60)) == .exited(0))
        let expected = sha256Hex(readFile(data) ?? [])

        let socket = "unix:" + directory.file("s.sock")
        let received = directory.file("received")
        let receive = [
            holdfastExecutable(), "receive", "--mode", "resumable", "--listen", socket, "--token", "out",
            "--secret-file", directory.file("s.key"), "--output", received, "--resume",
        ]
        var receiver = try processes.start(receive)
        // A MiB every 40 ms, in parts of 6 MiB each fed once the kill before it is done: the kills
        // land mid-stream (at worst at a part's end), never after the whole stream went by on a
        // machine that let the test see the file late; the sender's ring and pipe hold what
        // arrives while no receiver is there.
        let gate = directory.file("gate")
        let sender = try await startPipe(processes, socket: socket, key: directory.file("s.key"), feed: data, mib: mib, gates: (gate, 6))
        var sizes: [Int] = []
        for (index, threshold) in [3, 9, 15].enumerated() {
            try await eventually("the file past \(threshold) MiB", timeout: .seconds(60)) { fileSize(received) >= threshold << 20 }
            processes.kill(receiver)
            let kept = fileSize(received)
            sizes.append(kept)
            try writeFile(gate + String(index + 1), [])
            try await Task.sleep(for: .milliseconds(300))
            #expect(fileSize(received) == kept, "nothing is written while no receiver runs")
            receiver = try processes.start(receive)
        }
        #expect(try await processes.wait(sender, timeout: .seconds(120)) == .exited(0))
        #expect(try await processes.wait(receiver, timeout: .seconds(30)) == .exited(0))
        #expect(fileSize(received) == mib << 20)
        #expect(sha256Hex(readFile(received) ?? []) == expected)
        print("receiver killed at \(sizes.map { "\($0) bytes" }.joined(separator: ", ")) written; each run after resumed there: \(mib) MiB exact")
    }
}

extension HostRestartTests {
    /// A container process created over the bridge writes 2,000,000 numbered lines (14.9 MB) to
    /// a stdout whose host end is a separate `holdfast receive --resume` process — the host
    /// agent of this stream — SIGKILLed twice mid-stream and started again: the file holds every
    /// line once, in order, and the process's exit says nothing undelivered and nothing lost.
    /// Meanwhile the broker parked the stream and the process blocked on its full pipe.
    ///
    /// The lines come in three parts of about 5 MB, the process waiting for a gate file before
    /// the second and the third; a gate opens just after a kill. So however late a loaded
    /// machine lets the test see the file grow (an ungated `seq` could finish before the first
    /// kill), the process has a whole part ahead of it while no agent runs — more than the
    /// guest can hold (a 1 MiB ring and a 1 MiB pipe) — and can only wait. (A kill lands
    /// mid-part or, when the test sees the file late, as the process waits at its gate: the
    /// agent resumes at the file's size either way.)
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aContainersOutputSurvivesItsHostAgentBeingKilled() async throws {
        try await withBridgeDaemon { daemon, exits in
            let key = daemon.directory.file("agent.key")
            let secret = try SecretFile.readOrCreate(key)
            let socket = daemon.directory.file("agent.sock")
            let received = daemon.directory.file("agent.out")
            let receive = [
                holdfastExecutable(), "receive", "--mode", "resumable", "--listen", "unix:" + socket, "--token", "seq-out",
                "--secret-file", key, "--output", received, "--resume",
            ]
            // The broker dials as its own unprivileged uid: each new listener opened to it (the
            // killed agent's socket file removed first, so the chmod is the new one's).
            func startAgent() async throws -> pid_t {
                unlink(socket)
                let pid = try daemon.processes.start(receive)
                try await eventually("the agent listening") { access(socket, F_OK) == 0 && chmod(socket, 0o666) == 0 }
                return pid
            }
            var agent = try await startAgent()
            let lines = 2_000_000
            let parts = [(1, 700_000), (700_001, 1_400_000), (1_400_001, lines)]
            let gates = [daemon.directory.file("gate1"), daemon.directory.file("gate2")]
            let script = "seq \(parts[0].0) \(parts[0].1); while [ ! -e \(gates[0]) ]; do sleep 0.01; done; "
                + "seq \(parts[1].0) \(parts[1].1); while [ ! -e \(gates[1]) ]; do sleep 0.01; done; "
                + "exec seq \(parts[2].0) \(parts[2].1)"
            _ = try await daemon.bridge.create(ProcessSpec(
                id: "seq", argv: ["sh", "-c", script],
                stdout: StreamSpec(address: "unix:" + socket, mode: .resumable, token: "seq-out", secret: secret)))
            func sizeOfLines(through line: Int) -> Int { (1...line).reduce(0) { $0 + String($1).utf8.count + 1 } }
            var killedAt: [Int] = []
            for (index, threshold) in [2 << 20, sizeOfLines(through: parts[0].1) + (2 << 20)].enumerated() {
                try await eventually("the agent's file past \(threshold) bytes", timeout: .seconds(60)) { fileSize(received) >= threshold }
                daemon.processes.kill(agent)
                killedAt.append(fileSize(received))
                try writeFile(gates[index], [])
                try await Task.sleep(for: .milliseconds(500))
                #expect(exits.count("seq") == 0, "the process waits on its pipe while no host end is there")
                agent = try await startAgent()
            }
            try await eventually("the exit", timeout: .seconds(60)) { exits.count("seq") == 1 }
            #expect(try await daemon.processes.wait(agent, timeout: .seconds(30)) == .exited(0))
            let expected = (1...lines).map { "\($0)\n" }.joined()
            let got = readFile(received) ?? []
            #expect(got.count == expected.utf8.count)
            #expect(sha256Hex(got) == sha256Hex(Array(expected.utf8)), "every line once, in order")
            let report = try #require(exits.all.first { $0.id == "seq" })
            #expect(report.exitCode == 0 && report.undelivered == 0 && report.lost == nil && report.outputCutShort == nil, "\(report)")
            print("host agent killed with \(killedAt.map(String.init).joined(separator: " and ")) bytes written; \(got.count) bytes exact, exit clean")
            #expect(try await daemon.stop() == .exited(0))
        }
    }
}

extension HostRestartTests {
    /// A write that fails (here /dev/full: ENOSPC) ends `receive` with exit 1 and how much was
    /// written, not exit 0 with a short file a script would take for the stream.
    @Test func aFailedWriteEndsReceiveWithAnError() async throws {
        let processes = TestProcesses()
        defer { processes.killAll() }
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let socket = "unix:" + directory.file("s.sock")
        let errPath = directory.file("err")
        let receiver = try startReceiver(processes, socket: socket, in: directory, token: "out", output: ["--output", "/dev/full"], stderr: errPath)
        _ = try await startPipe(processes, socket: socket, key: directory.file("s.key"), feed: "/dev/zero", mib: 1)
        #expect(try await processes.wait(receiver, timeout: .seconds(30)) == .exited(1))
        let said = String(decoding: readFile(errPath) ?? [], as: UTF8.self)
        #expect(said.contains("holdfast receive: writing the stream failed after 0 bytes; the sender still holds the rest"), "\(said)")
    }

    /// A sender refused again and again (here: it names another stream) is said on stderr, with
    /// why, rather than waited for in silence.
    @Test func aRefusedSenderIsSaid() async throws {
        let processes = TestProcesses()
        defer { processes.killAll() }
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let socket = "unix:" + directory.file("s.sock")
        let errPath = directory.file("err")
        _ = try startReceiver(
            processes, socket: socket, in: directory, token: "another", output: ["--output", directory.file("out"), "--resume"], stderr: errPath)
        _ = try await startPipe(processes, socket: socket, key: directory.file("s.key"), feed: "/dev/zero", mib: 1)
        try await eventually("the refusal said") {
            String(decoding: readFile(errPath) ?? [], as: UTF8.self)
                .contains("holdfast receive: refused a connection: a hello for a stream this end does not have")
        }
    }

    /// Both directions open at the offset a restarted host gives; what cannot resume says so:
    /// `receive --resume` without a file or in raw mode.
    @Test func whatCannotResumeIsRefusedWithTheReason() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let server = try StreamServer(listeningOn: .unix(path: directory.file("s.sock")))
        defer { server.close() }
        // A stream the host sends resumes too: at what the earlier life had handed over.
        let sending = try server.open(token: bytes("in"), direction: .send, resumeAt: 10)
        #expect(sending.statistics.acknowledged == 10, "the stream goes on after what the earlier host had handed over")
        let resumed = try server.open(token: bytes("out"), direction: .receive, resumeAt: 10)
        #expect(resumed.statistics.offset == 10, "the stream goes on where its consumer stopped")

        let processes = TestProcesses()
        defer { processes.killAll() }
        for (arguments, reason) in [
            (["--mode", "resumable", "--secret-file", directory.file("k"), "--resume"], "--resume needs --output FILE"),
            (["--mode", "raw", "--output", directory.file("o"), "--resume"], "--resume needs --mode resumable"),
        ] {
            let errPath = directory.file("err")
            let err = open(errPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            let pid = try processes.start(
                [holdfastExecutable(), "receive", "--listen", "unix:" + directory.file("r.sock")] + arguments, stderr: err)
            close(err)
            #expect(try await processes.wait(pid) == .exited(64))
            let said = String(decoding: readFile(errPath) ?? [], as: UTF8.self)
            #expect(said.contains(reason), "\(said)")
        }
    }
}

/// `holdfast receive --mode resumable` of stream `token` on `socket` (its secret file in
/// `directory`), with `output`'s options, its stderr into the file `stderr`.
private func startReceiver(
    _ processes: TestProcesses, socket: String, in directory: TemporaryDirectory, token: String, output: [String], stderr: String
) throws -> pid_t {
    let err = open(stderr, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
    defer { close(err) }
    return try processes.start(
        [holdfastExecutable(), "receive", "--mode", "resumable", "--listen", socket, "--token", token,
         "--secret-file", directory.file("s.key")] + output, stderr: err)
}

/// `holdfast pipe` reading `feed` a MiB every 40 ms, to `socket`.
/// Starts `holdfast pipe` reading `mib` MiB of `feed`, a MiB every 40 ms, from a feeder of its
/// own: two processes, each started (and so ended) by its pid — a shell pipeline would leave
/// `holdfast pipe` a child of the shell, out of the test's reach. Returns `holdfast pipe`'s pid.
/// With `gates`, the feeder stops after each `every` MiB until the file `path` + N exists
/// (N = 1, 2, …): the test opens a gate when it is ready for more, whatever the machine's pace.
private func startPipe(
    _ processes: TestProcesses, socket: String, key: String, feed: String, mib: Int, gates: (path: String, every: Int)? = nil
) async throws -> pid_t {
    try await eventually("the secret file") { access(key, R_OK) == 0 }
    let pipe = try PipeEnds.make()
    defer { close(pipe.read); close(pipe.write) }
    let gate = gates.map { "if [ $((i % \($0.every))) -eq 0 ] && [ $i -lt \(mib) ]; then while [ ! -e \($0.path)$((i / \($0.every))) ]; do sleep 0.01; done; fi; " } ?? ""
    _ = try processes.start(
        ["sh", "-c", "i=0; while [ $i -lt \(mib) ]; do dd if=\(feed) bs=1048576 skip=$i count=1 status=none; i=$((i+1)); sleep 0.04; \(gate)done"],
        stdout: pipe.write)
    return try processes.start(
        [holdfastExecutable(), "pipe", "--mode", "resumable", "--to", socket, "--token", "out", "--secret-file", key], stdin: pipe.read)
}

private func fileSize(_ path: String) -> Int {
    var info = stat()
    return stat(path, &info) == 0 ? Int(info.st_size) : 0
}
