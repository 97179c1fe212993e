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

/// examples/handoff.py — the Python client another runtime would use — against a real daemon:
/// what it hands over reaches the host byte for byte, and `release` gives back the same pipes
/// and leaves the broker holding nothing.
@Suite("Another runtime hands stdio to the broker with examples/handoff.py", .timeLimit(.minutes(5)))
struct HandoffExampleTests {
    @Test(.enabled(if: pythonCanPassDescriptors(), "needs python3 3.9+ (socket.send_fds)"), .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own")) func pipesHandedOverFromPythonReachTheHostAndReleaseGivesThemBack() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let broker = try #require(try await daemon.rolePID("broker"))
        let baseline = try await warmUp(daemon, broker: broker)

        // The host: stdout and stdin as resumable streams, stderr on a raw listener.
        let hostOut = try daemon.streams.open(token: bytes("h1-stdout"), direction: .receive, secret: handoffSecret)
        let outReceived = accumulate(hostOut)
        let hostIn = try daemon.streams.open(token: bytes("h1-stdin"), direction: .send, secret: handoffSecret)
        let rawErr = try RecordingListener(path: daemon.directory.file("stderr.sock"))
        defer { rawErr.close() }

        // Three pipes. The process's ends stay with the test (it plays the process); the
        // runtime's ends are inherited by python, which hands them to the broker.
        let out = try PipeEnds.make()
        let err = try PipeEnds.make()
        let input = try PipeEnds.make()
        let identity = (out: descriptorIdentity(out.write), err: descriptorIdentity(err.write), input: descriptorIdentity(input.read))
        let adopted = try await runHandoff(
            daemon,
            [
                "adopt", "--process", "h1",
                "--stdout", daemon.streamAddress, "--stdout-fd", "\(out.read)",
                "--stderr", "unix:" + daemon.directory.file("stderr.sock"), "--stderr-mode", "raw", "--stderr-fd", "\(err.read)",
                "--stdin", daemon.streamAddress, "--stdin-fd", "\(input.write)",
            ],
            keep: [out.read, err.read, input.write])
        #expect(adopted.status == .exited(0), "stderr: \(adopted.stderr)")
        // The broker has its own copies now.
        for fd in [out.read, err.read, input.write] { close(fd) }

        var random = SeededRandom(seed: 0x4F_4646)
        let outBytes = (0..<(512 * 1024)).map { _ in UInt8.random(in: 0...255, using: &random) }
        let errBytes = (0..<(300 * 1024)).map { _ in UInt8.random(in: 0...255, using: &random) }
        let inBytes = (0..<(200 * 1024)).map { _ in UInt8.random(in: 0...255, using: &random) }
        let outWriter = try AsyncFD(adopting: out.write)
        let errWriter = try AsyncFD(adopting: err.write)
        let inReader = try AsyncFD(adopting: input.read)
        defer {
            outWriter.close()
            errWriter.close()
            inReader.close()
        }
        try await withBuffer(outBytes) { try await outWriter.write($0) }
        try await withBuffer(errBytes) { try await errWriter.write($0) }
        try await withBuffer(inBytes) { try await hostIn.send($0) }
        let inReceived = try await withTimeout("stdin through the broker", .seconds(20)) {
            try await readExactly(inReader, count: inBytes.count)
        }
        #expect(sha256Hex(inReceived) == sha256Hex(inBytes), "stdin: host → broker → the process's pipe")
        try await eventually("stdout and stderr at the host", timeout: .seconds(20)) {
            outReceived.count == outBytes.count && rawErr.bytes.count == errBytes.count
        }
        #expect(sha256Hex(outReceived.bytes) == sha256Hex(outBytes), "stdout: pipe → broker → host (resumable)")
        #expect(sha256Hex(rawErr.bytes) == sha256Hex(errBytes), "stderr: pipe → broker → host (raw)")

        let listed = try await runHandoff(daemon, ["list", "--json"])
        #expect(listed.status == .exited(0), "stderr: \(listed.stderr)")
        let streams = try ControlJSON.decode([StreamStatus].self, from: bytes(listed.stdout), frameType: 0)
        #expect(Set(streams.filter { $0.process == "h1" }.map(\.kind)) == [.stdin, .stdout, .stderr])
        #expect(streams.filter { $0.process == "h1" }.allSatisfy { $0.state == .connected }, "\(streams)")

        // Release: python gets the same three pipes back (their inodes), and the broker keeps
        // no copy of any of them.
        let released = try await runHandoff(daemon, ["release", "--process", "h1"])
        #expect(released.status == .exited(0), "stderr: \(released.stderr)")
        let returned = try released.stdout.split(separator: "\n").map {
            try ControlJSON.decode(ReturnedStream.self, from: bytes(String($0)), frameType: 0)
        }
        #expect(returned.count == 3, "every stream comes back: \(released.stdout)")
        #expect(returned.first { $0.kind == "stdout" }?.descriptor == identity.out)
        #expect(returned.first { $0.kind == "stderr" }?.descriptor == identity.err)
        #expect(returned.first { $0.kind == "stdin" }?.descriptor == identity.input)
        #expect(returned.first { $0.kind == "stdout" }?.token == "h1-stdout")
        #expect(returned.first { $0.kind == "stderr" }?.mode == "raw")

        await expectBackAtBaseline(broker, baseline)
        try await eventually("the raw stderr connection closed") { rawErr.closedConnections == 1 }
        #expect(rawErr.bytes.count == errBytes.count, "nothing after the release")
        #expect(outReceived.count == outBytes.count, "nothing after the release")
        let after = try await runHandoff(daemon, ["list", "--json"])
        #expect(try ControlJSON.decode([StreamStatus].self, from: bytes(after.stdout), frameType: 0).isEmpty)
        #expect(try await daemon.stop() == .exited(0))
    }

    @Test(.enabled(if: pythonCanPassDescriptors(), "needs python3 3.9+ (socket.send_fds)"), .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own")) func pythonStartsACommandOnPipesTheBrokerRelaysAndARefusalIsPrintedPlainly() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let broker = try #require(try await daemon.rolePID("broker"))
        let baseline = try await warmUp(daemon, broker: broker)
        var random = SeededRandom(seed: 0xC0FFEE)
        let data = (0..<(384 * 1024)).map { _ in UInt8.random(in: 0...255, using: &random) }
        try writeFile(daemon.directory.file("data"), data)
        let host = try daemon.streams.open(token: bytes("h2-stdout"), direction: .receive, secret: handoffSecret)
        let received = collect(host)

        // The runtime starts `cat FILE` with its stdout on a pipe whose other end the broker
        // holds; --wait returns when cat has written everything into the pipe and exited.
        let adopted = try await runHandoff(
            daemon,
            ["adopt", "--process", "h2", "--stdout", daemon.streamAddress, "--wait", "--", "cat", daemon.directory.file("data")])
        #expect(adopted.status == .exited(0), "stderr: \(adopted.stderr)")
        #expect(adopted.stdout.contains("\"pid\": "), "\(adopted.stdout)")
        let all = try await withTimeout("stdout to its end", .seconds(20)) { await received.value }
        #expect(sha256Hex(all) == sha256Hex(data), "every byte once, in order, then END")

        let again = try await runHandoff(
            daemon, ["adopt", "--process", "h2", "--stdout", daemon.streamAddress, "--", "true"])
        #expect(again.status == .exited(1))
        #expect(
            again.stderr.contains("handoff.py: the broker refused adopt: process-exists: process 'h2' already has streams"),
            "stderr: \(again.stderr)")

        let released = try await runHandoff(daemon, ["release", "--process", "h2"])
        #expect(released.status == .exited(0), "stderr: \(released.stderr)")
        #expect(released.stdout.contains("\"kind\": \"stdout\""), "\(released.stdout)")
        let missing = try await runHandoff(daemon, ["release", "--process", "h2"])
        #expect(missing.status == .exited(1))
        #expect(missing.stderr.contains("no-such-process"), "stderr: \(missing.stderr)")
        await expectBackAtBaseline(broker, baseline)
        #expect(try await daemon.stop() == .exited(0))
    }
}

extension HandoffExampleTests {
    /// The broker dies inside `handoff.py release`, before its answer: the command asks the
    /// restarted broker again, which answers with the fds it kept (HandoffReleaseCrashTests has
    /// the rest of it), and prints the same pipe that was handed over.
    @Test(
        .enabled(if: pythonCanPassDescriptors(), "needs python3 3.9+ (socket.send_fds)"),
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"),
        .enabled(if: Failpoint.compiledIn, "the broker dies at a failpoint, which only debug builds have"))
    func releaseAsksAgainWhenTheBrokerDiesInsideIt() async throws {
        let daemon = try await DaemonFixture(environment: ["HOLDFAST_FAILPOINT": "\(Failpoint.brokerReleaseMarked):h4"], brokerRestartBackoffMax: "200ms")
        defer { daemon.cleanUp() }
        _ = try daemon.streams.open(token: bytes("h4-stdout"), direction: .receive, secret: handoffSecret)
        let out = try PipeEnds.make()
        defer { close(out.write) }
        let identity = descriptorIdentity(out.write)
        let adopted = try await runHandoff(
            daemon, ["adopt", "--process", "h4", "--stdout", daemon.streamAddress, "--stdout-fd", "\(out.read)"], keep: [out.read])
        #expect(adopted.status == .exited(0), "stderr: \(adopted.stderr)")
        close(out.read)
        try await eventually("the deposit kept", timeout: .seconds(20)) { daemon.log.contains("keeping a handoff process's fds") }
        let firstBroker = try await daemon.rolePID("broker")

        let released = try await runHandoff(daemon, ["release", "--process", "h4"])
        #expect(released.status == .exited(0), "stderr: \(released.stderr)")
        #expect(released.stderr.contains("handoff.py: the release got no answer"), "stderr: \(released.stderr)")
        #expect(released.stdout.contains("\"descriptor\": \"\(identity)\""), "the pipe handed over: \(released.stdout)")
        #expect(try await daemon.rolePID("broker") != firstBroker, "the broker did die inside")
        try await daemon.waitForLog("a release kept for its peer handed over")
        #expect(try await daemon.stop() == .exited(0))
    }

    /// Where the broker dies inside an adopt: before it handed the process to the supervisor
    /// (the fds it received die with it), or after, before its answer (the next broker is handed
    /// the process back).
    enum AdoptCrashMoment: String, CaseIterable, Sendable {
        case beforeItsHandover, beforeItsAnswer
        var failpoint: String { self == .beforeItsHandover ? Failpoint.brokerAdoptReceived : Failpoint.brokerAdoptTaken }
    }

    /// The broker dies inside `handoff.py adopt`: the command cannot tell from the silence
    /// whether the process was taken, so it asks the restarted broker's `list` and adopts again
    /// only if the process is not there. Either way the command starts and its output reaches
    /// the host whole, once (sha256), and the process is held once: one stream, by the broker
    /// that runs now.
    @Test(
        .enabled(if: pythonCanPassDescriptors(), "needs python3 3.9+ (socket.send_fds)"),
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"),
        .enabled(if: Failpoint.compiledIn, "the broker dies at a failpoint, which only debug builds have"),
        arguments: AdoptCrashMoment.allCases)
    func adoptSettlesWhetherTheBrokerTookItWhenItDiesInside(moment: AdoptCrashMoment) async throws {
        let daemon = try await DaemonFixture(environment: ["HOLDFAST_FAILPOINT": "\(moment.failpoint):h5"], brokerRestartBackoffMax: "200ms")
        defer { daemon.cleanUp() }
        let firstBroker = try await daemon.rolePID("broker")
        var random = SeededRandom(seed: 0xAD0D7)
        let data = (0..<(256 * 1024)).map { _ in UInt8.random(in: 0...255, using: &random) }
        try writeFile(daemon.directory.file("data"), data)
        let host = try daemon.streams.open(token: bytes("h5-stdout"), direction: .receive, secret: handoffSecret)
        let received = collect(host)

        let adopted = try await runHandoff(
            daemon, ["adopt", "--process", "h5", "--stdout", daemon.streamAddress, "--wait", "--", "cat", daemon.directory.file("data")])
        #expect(adopted.status == .exited(0), "stderr: \(adopted.stderr)")
        #expect(adopted.stderr.contains("handoff.py: the adopt got no answer"), "stderr: \(adopted.stderr)")
        let taken = adopted.stderr.contains("the broker had taken it before it died: not adopted again")
        #expect(taken == (moment == .beforeItsAnswer), "settled by list: \(adopted.stderr)")
        #expect(try await daemon.rolePID("broker") != firstBroker, "the broker did die inside")
        let all = try await withTimeout("stdout to its end", .seconds(30)) { await received.value }
        #expect(sha256Hex(all) == sha256Hex(data), "every byte once, in order, then END")
        let streams = try await daemon.brokerStreams().filter { $0.process == "h5" }
        #expect(streams.count == 1 && streams.first?.kind == .stdout, "held once: \(streams)")
        #expect(try await runHandoff(daemon, ["release", "--process", "h5"]).status == .exited(0))
        #expect(try await daemon.stop() == .exited(0))
    }

    /// A handoff peer manages only what its own uid handed over: not the supervisor's
    /// processes, not another allowed uid's; `list` shows it its own.
    /// A broker that dies with a request of the runtime's unread leaves ECONNRESET pending on the
    /// runtime's end, reported ahead of the answer it wrote before it died: handoff.py reads on.
    /// (A stand-in broker that answers without reading, then closes: no daemon needed.)
    @Test(.enabled(if: pythonCanPassDescriptors(), "needs python3 3.9+ (socket.send_fds)"))
    func anAnswerBehindTheResetOfABrokerThatDiedIsRead() async throws {
        let directory = try TemporaryDirectory()
        defer { directory.remove() }
        let path = directory.file("broker.sock")
        let listener = try Listener(binding: .unix(path: path), kind: .seqpacket)
        defer { listener.close() }
        let processes = TestProcesses()
        defer { processes.killAll() }
        let output = directory.file("out")
        let examples = String(handoffScript().dropLast("/handoff.py".count))
        let program = """
            import sys; sys.path.insert(0, sys.argv[1]); import handoff
            answer, fds = handoff.Client(sys.argv[2]).request(0x0103, {})
            open(sys.argv[3], "w").write(repr(answer))
            """
        let pid = try processes.start(["python3", "-c", program, examples, path, output])
        let connection = try await listener.accept()
        defer { connection.close() }
        let channel = FDChannel(connection)
        try await eventually("the request waits unread", timeout: .seconds(20)) { channel.hasUnreadMessage }
        // Stopped while it waits for the answer, so that the answer and the close both come
        // before its next read (otherwise it could read the answer before the close).
        kill(pid, SIGSTOP)
        try await eventually("python stopped", timeout: .seconds(20)) { ProcessAccount.threadStates(of: pid).allSatisfy { $0 == "T" } }
        let body = Array(#"{"streams": [], "total": 0}"#.utf8)
        try await channel.send(ControlFrame(type: RPCFrameType.ok, id: 1, body: body).encoded)
        channel.close()
        kill(pid, SIGCONT)
        let status = try await processes.wait(pid, timeout: .seconds(30))
        #expect(status == .exited(0), "handoff.py read the answer behind the reset")
        #expect(String(decoding: readFile(output) ?? [], as: UTF8.self) == "{'streams': [], 'total': 0}")
    }

    /// The broker answers `list` a page at a time (at most 1,000 streams, and what fits one
    /// frame, with the `total`). handoff.py read the first page only: its `adopt`, settling a
    /// try the broker died inside, missed a process taken once a runtime held more streams than
    /// a page, adopted it again and failed `process-exists`. It asks for every page now. (A
    /// stand-in for the broker's answers: 2,500 streams.)
    @Test(.enabled(if: pythonCanPassDescriptors(), "needs python3 3.9+ (socket.send_fds)"))
    func handoffPyListsEveryPageOfTheBrokersStreams() async throws {
        let processes = TestProcesses()
        defer { processes.killAll() }
        let examples = String(handoffScript().dropLast("/handoff.py".count))
        let program = """
            import sys; sys.path.insert(0, sys.argv[1]); import handoff
            every = [{"process": "p%d" % i} for i in range(2500)]
            asked = []
            class Broker(handoff.Client):
                def __init__(self): pass
                def request(self, kind, body):
                    start = body.get("offset", 0)
                    asked.append(start)
                    return {"streams": every[start:start + 1000], "total": len(every)}, []
            listed = Broker().list()
            if listed != every or asked != [0, 1000, 2000]:
                sys.exit("listed %d streams, asked for pages at %r" % (len(listed), asked))
            """
        let pid = try processes.start(["python3", "-c", program, examples])
        #expect(try await processes.wait(pid, timeout: .seconds(30)) == .exited(0), "every page, in order, once")
    }

    @Test(.enabled(if: pythonCanPassDescriptors(), "needs python3 3.9+ (socket.send_fds)"), .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own")) func aHandoffPeerManagesOnlyWhatItsUIDHandedOver() async throws {
        let daemon = try await DaemonFixture(extraConfig: "handoff:\n  mode: \"0666\"\n  allowed_uids: [0, 65534]\n")
        defer { daemon.cleanUp() }
        chmod(daemon.directory.path, 0o755)
        _ = try daemon.streams.open(token: bytes("sup-out"), direction: .receive, secret: handoffSecret)
        _ = try await daemon.launch(ProcessSpec(
            id: "sup", argv: ["sleep", "30"], stdout: daemon.spec("sup-out")))
        let stolen = try await runHandoff(daemon, ["release", "--process", "sup"])
        #expect(stolen.status == .exited(1))
        #expect(stolen.stderr.contains("permission-denied"), "\(stolen.stderr)")

        _ = try daemon.streams.open(token: bytes("h3-stdout"), direction: .receive, secret: handoffSecret)
        let adopted = try await runHandoff(daemon, ["adopt", "--process", "h3", "--stdout", daemon.streamAddress, "--wait", "--", "true"])
        #expect(adopted.status == .exited(0), "stderr: \(adopted.stderr)")
        for attempt in [["release", "--process", "h3"], ["list", "--json"]] {
            let other = try await runHandoff(daemon, attempt, asUser: 65534)
            if attempt[0] == "release" {
                #expect(other.status == .exited(1))
                #expect(other.stderr.contains("permission-denied") && other.stderr.contains("uid 0"), "\(other.stderr)")
            } else {
                #expect(try ControlJSON.decode([StreamStatus].self, from: bytes(other.stdout), frameType: 0).isEmpty, "\(other.stdout)")
            }
        }
        let listed = try await runHandoff(daemon, ["list", "--json"])
        let processes = Set(try ControlJSON.decode([StreamStatus].self, from: bytes(listed.stdout), frameType: 0).map(\.process))
        #expect(processes == ["h3"], "a peer sees its own processes only")
        #expect(try await runHandoff(daemon, ["release", "--process", "h3"]).status == .exited(0))
        #expect(try await daemon.brokerStreams().contains { $0.process == "sup" }, "the supervisor's process kept its stream")
        #expect(try await daemon.stop() == .exited(0))
    }
}

/// A line `handoff.py release` prints for each stream that came back.
private struct ReturnedStream: Decodable {
    var kind: String
    var mode: String
    var token: String?
    var descriptor: String
}

/// examples/handoff.py in this checkout (three levels above this file).
private func handoffScript() -> String {
    let source: String = #filePath
    var parts = source.split(separator: "/", omittingEmptySubsequences: false)
    parts.removeLast(3)
    return parts.joined(separator: "/") + "/examples/handoff.py"
}

private func pythonCanPassDescriptors() -> Bool {
    var options = SpawnOptions(executable: "python3", arguments: ["python3", "-c", "import socket; socket.send_fds"])
    options.stdout = -1
    options.stderr = -1
    guard let pid = try? Spawner.spawn(options) else { return false }
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    return status == 0
}

private struct HandoffRun {
    var status: HoldfastPosix.ExitStatus
    var stdout: String
    var stderr: String
}

/// The secret of every resumable stream these tests hand over: the host streams are opened with
/// it, and `runHandoff` passes it to an adopt in a file (`--secret-file`).
private let handoffSecret = StreamSecret.random()

/// Writes `handoffSecret` where the adopting user (root, or `user`) alone can read it.
private func handoffSecretFile(_ daemon: DaemonFixture, for user: uid_t?) throws -> String {
    let path = daemon.directory.file("handoff-\(user ?? 0).key")
    if access(path, F_OK) != 0 {
        try writeFile(path, Array((handoffSecret.hex + "\n").utf8), mode: 0o600)
        if let user { chown(path, user, user) }
    }
    return path
}

/// Runs `python3 examples/handoff.py --socket <the daemon's> ARGS`, with `keep` inherited at
/// the same numbers, and waits for it (it is ended by pid if the test fails first). An adopt
/// gets `--secret-file` with `handoffSecret`.
private func runHandoff(
    _ daemon: DaemonFixture, _ arguments: [String], keep: [Int32] = [], asUser user: uid_t? = nil
) async throws -> HandoffRun {
    var arguments = arguments
    if arguments.first == "adopt" { arguments.insert(contentsOf: ["--secret-file", try handoffSecretFile(daemon, for: user)], at: 1) }
    let name = "handoff-\(UInt32.random(in: 0...UInt32.max))"
    let outPath = daemon.directory.file(name + ".out")
    let errPath = daemon.directory.file(name + ".err")
    let outFD = open(outPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
    let errFD = open(errPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
    // Another uid cannot read the script in a checkout only its owner can enter (a 0700 home):
    // it runs a copy in the daemon's directory then.
    let script = user == nil ? handoffScript() : try readableByOthers(handoffScript(), copyInto: daemon.directory.path)
    var options = SpawnOptions(
        executable: "python3",
        arguments: ["python3", script, "--socket", daemon.directory.file("broker.sock")] + arguments)
    options.stdout = outFD
    options.stderr = errFD
    options.keepDescriptors = keep
    options.parentDeathSignal = SIGKILL
    if let user { options.user = (user, user, [user]) }
    let pid: pid_t
    do {
        pid = try Spawner.spawn(options)
    } catch {
        close(outFD)
        close(errFD)
        throw error
    }
    daemon.processes.adopt(pid)
    close(outFD)
    close(errFD)
    let status = try await daemon.processes.wait(pid, timeout: .seconds(30))
    return HandoffRun(
        status: status, stdout: String(decoding: readFile(outPath) ?? [], as: UTF8.self),
        stderr: String(decoding: readFile(errPath) ?? [], as: UTF8.self))
}

/// What /proc says an fd is ("pipe:[12345]": both ends of a pipe share the inode).
private func descriptorIdentity(_ fd: Int32) -> String {
    var buffer = [CChar](repeating: 0, count: 256)
    let length = readlink("/proc/self/fd/\(fd)", &buffer, buffer.count - 1)
    return String(decoding: buffer[..<max(0, length)].map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// `body` with a copy of `bytes` in memory that stays put across suspensions.
private func withBuffer(_ bytes: [UInt8], _ body: (UnsafeRawBufferPointer) async throws -> Void) async throws {
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes.count, alignment: 16)
    defer { buffer.deallocate() }
    buffer.copyBytes(from: bytes)
    try await body(UnsafeRawBufferPointer(buffer))
}

private func readExactly(_ fd: AsyncFD, count: Int) async throws -> [UInt8] {
    var result: [UInt8] = []
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 8)
    defer { buffer.deallocate() }
    while result.count < count {
        let got = try await fd.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[..<min(buffer.count, count - result.count)]))
        if got == 0 { break }
        result += buffer[..<got]
    }
    return result
}

/// A raw host listener that keeps every byte it is sent and counts connections that ended.
private final class RecordingListener: Sendable {
    let listener: Listener
    private let state = NIOLockedValueBox<(bytes: [UInt8], closed: Int)>(([], 0))

    init(path: String) throws {
        listener = try Listener(binding: .unix(path: path), unixMode: 0o666)
        Task { [self] in
            while let connection = try? await listener.accept() {
                Task {
                    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 8)
                    defer { buffer.deallocate() }
                    while let count = try? await connection.read(into: buffer), count > 0 {
                        state.withLockedValue { $0.bytes += buffer[..<count] }
                    }
                    connection.close()
                    state.withLockedValue { $0.closed += 1 }
                }
            }
        }
    }

    var bytes: [UInt8] { state.withLockedValue { $0.bytes } }
    var closedConnections: Int { state.withLockedValue { $0.closed } }
    func close() { listener.close() }
}

/// One adopt/release cycle before the broker's fds are counted: the first streams make the
/// Swift runtime open what it opens once (a Dispatch timerfd). Returns the count it settles at.
private func warmUp(_ daemon: DaemonFixture, broker: pid_t) async throws -> (count: Int, fds: [String]) {
    let host = try daemon.streams.open(token: bytes("warm-up-stdout"), direction: .receive, secret: handoffSecret)
    let received = collect(host)
    let pipe = try PipeEnds.make()
    let adopted = try await runHandoff(
        daemon, ["adopt", "--process", "warm-up", "--stdout", daemon.streamAddress, "--stdout-fd", "\(pipe.read)"], keep: [pipe.read])
    close(pipe.read)
    #expect(adopted.status == .exited(0), "warm-up adopt: \(adopted.stderr)")
    _ = bytes("warm").withUnsafeBytes { write(pipe.write, $0.baseAddress, $0.count) }
    close(pipe.write)
    #expect(try await withTimeout("the warm-up stream", .seconds(20)) { await received.value } == bytes("warm"))
    let released = try await runHandoff(daemon, ["release", "--process", "warm-up"])
    #expect(released.status == .exited(0), "warm-up release: \(released.stderr)")
    // Settled: the same count twice, 200 ms apart.
    var last = openDescriptorCount(pid: broker)
    for _ in 0..<50 {
        try await Task.sleep(for: .milliseconds(200))
        let now = openDescriptorCount(pid: broker)
        if now == last { break }
        last = now
    }
    return (last, brokerFDs(broker))
}

private func expectBackAtBaseline(_ broker: pid_t, _ baseline: (count: Int, fds: [String])) async {
    let back = (try? await eventually("the broker's fds back at \(baseline.count)", timeout: .seconds(10)) {
        openDescriptorCount(pid: broker) == baseline.count
    }) != nil
    #expect(back, "broker fds now: \(brokerFDs(broker)); at the baseline: \(baseline.fds)")
}

/// The broker's open fds and what they are, for a failure message.
private func brokerFDs(_ pid: pid_t) -> [String] {
    var result: [String] = []
    guard let directory = opendir("/proc/\(pid)/fd") else { return [] }
    defer { closedir(directory) }
    while let entry = readdir(directory) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self) }
        var buffer = [CChar](repeating: 0, count: 256)
        let length = readlink("/proc/\(pid)/fd/\(name)", &buffer, buffer.count - 1)
        guard name != "." && name != ".." else { continue }
        result.append(name + "=" + String(decoding: buffer[..<max(0, length)].map { UInt8(bitPattern: $0) }, as: UTF8.self))
    }
    return result.sorted()
}

extension HandoffExampleTests {
    /// `handoff.py adopt` tells its user whether the process survives a broker crash: a
    /// process the broker could not keep (every checkpoint slot of its range taken: a
    /// debug-build failpoint) gets a line on stderr and `"survivesBrokerCrash": false` in the
    /// report, both with the broker's reason; one it kept, `true` and no line. Both are relayed.
    @Test(
        .enabled(if: pythonCanPassDescriptors(), "needs python3 3.9+ (socket.send_fds)"),
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"),
        .enabled(if: Failpoint.compiledIn, "the broker's slots are taken at a failpoint, which only debug builds have"))
    func pythonSaysWhetherTheProcessSurvivesABrokerCrash() async throws {
        let daemon = try await DaemonFixture(environment: ["HOLDFAST_FAILPOINT": "\(Failpoint.handoffSlotsTaken):h6"])
        defer { daemon.cleanUp() }
        for (process, survives) in [("h6", false), ("h7", true)] {
            let host = collect(try daemon.streams.open(token: bytes("\(process)-stdout"), direction: .receive, secret: handoffSecret))
            let adopted = try await runHandoff(
                daemon, ["adopt", "--process", process, "--stdout", daemon.streamAddress, "--wait", "--", "echo", "from \(process)"])
            #expect(adopted.status == .exited(0), "stderr: \(adopted.stderr)")
            #expect(adopted.stdout.contains("\"survivesBrokerCrash\": \(survives)"), "\(process): \(adopted.stdout)")
            let warned = adopted.stderr.contains("could not make it survive a broker crash: no free checkpoint slots")
            #expect(warned == !survives, "\(process): why, from the broker's answer: stderr: \(adopted.stderr)")
            #expect(adopted.stdout.contains("\"reason\": \"no free checkpoint slots") == !survives, "\(process): \(adopted.stdout)")
            #expect(try await withTimeout("\(process)'s output", .seconds(20)) { await host.value } == bytes("from \(process)\n"))
        }
        #expect(try await daemon.stop() == .exited(0))
    }
}

extension HandoffExampleTests {
    /// The design's runc console socket, from a runtime's side: `handoff.py adopt --tty
    /// --console-socket -- runc create ... --console-socket {console-socket}` makes the socket,
    /// runs runc, takes the container's pty master runc sends there and hands it to the broker,
    /// keeping no copy. Then `runc start`: the container's terminal reaches the host and the
    /// host's typing reaches the container, exact, and its end ends the stream. A runtime that
    /// ends without sending one, or a COMMAND that does not say where the socket goes, is told.
    @Test(
        .enabled(if: pythonCanPassDescriptors(), "needs python3 3.9+ (socket.send_fds)"),
        .enabled(if: DaemonFixture.canRun && TestBundle.canRun, "needs root, runc and busybox-static"))
    func aRuncContainersTerminalReachesTheBrokerThroughAConsoleSocket() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let root = daemon.directory.file("runc-root")
        defer { _ = try? runCommand(["runc", "--root", root, "delete", "--force", "c1"]) }
        let bundle = try TestBundle(
            in: daemon.directory, name: "c1", args: ["sh", "-c", "echo ready; read line; echo \"got $line\""], terminal: true)
        let output = Accumulator(try daemon.streams.open(token: bytes("c1-tty"), direction: .receive, secret: handoffSecret))
        let input = try daemon.streams.open(token: bytes("c1-tty-input"), direction: .send, secret: handoffSecret)

        let adopted = try await runHandoff(daemon, [
            "adopt", "--process", "c1", "--tty", daemon.streamAddress, "--tty-input", daemon.streamAddress, "--console-socket",
            "--wait", "--", "runc", "--root", root, "create", "--bundle", bundle.path, "--console-socket", "{console-socket}", "c1",
        ])
        #expect(adopted.status == .exited(0), "stderr: \(adopted.stderr)")
        #expect(adopted.stdout.contains("\"survivesBrokerCrash\": true"), "\(adopted.stdout)")
        let streams = try await daemon.brokerStreams().filter { $0.process == "c1" }
        #expect(streams.count == 2 && streams.allSatisfy { $0.kind == .tty }, "the terminal's output and input: \(streams)")
        #expect(try runCommand(["runc", "--root", root, "start", "c1"]) == .exited(0))

        try await eventually("the container's first line", timeout: .seconds(20)) { output.text == "ready\n" }
        try await input.send(bytes("hello\n"))
        // The terminal echoes the line, then the shell answers; its end ends the stream.
        try await eventually("the echo, the answer and the end", timeout: .seconds(20)) { output.text == "ready\nhello\ngot hello\n" }
        try await eventually("the container gone", timeout: .seconds(20)) {
            (try? commandOutput(["runc", "--root", root, "state", "c1"], in: daemon.directory))?.contains("\"stopped\"") == true
        }
        try await eventually("the terminal's stream ended (END sent once the last slave closed)", timeout: .seconds(20)) {
            try await daemon.brokerStreams().first { $0.process == "c1" && $0.direction == nil }?.state == .closed
        }

        // COMMAND must say where the socket goes; a runtime that ends without sending a terminal.
        let unsaid = try await runHandoff(daemon, ["adopt", "--process", "c2", "--tty", daemon.streamAddress, "--console-socket", "--", "true"])
        #expect(unsaid.status == .exited(2) && unsaid.stderr.contains("say where COMMAND takes the socket's path with {console-socket}"), "\(unsaid.stderr)")
        let silent = try await runHandoff(daemon, [
            "adopt", "--process", "c3", "--tty", daemon.streamAddress, "--console-socket", "--", "sh", "-c", "exit 3", "{console-socket}",
        ])
        #expect(silent.status == .exited(2), "\(silent.stderr)")
        #expect(silent.stderr.contains("the runtime ended without sending a terminal to the console socket (it exited with status 3)"), "\(silent.stderr)")
        #expect(try await daemon.brokerStreams().allSatisfy { $0.process == "c1" }, "nothing adopted for c2 or c3")
        #expect(try await daemon.stop() == .exited(0))
    }

    /// `handoff.py adopt --tty ADDRESS -- COMMAND`: COMMAND on a new terminal (its stdio and
    /// controlling terminal, a session of its own) whose master the broker holds; `handoff.py
    /// resize` sets its size, `handoff.py exited` lets the broker forget it.
    @Test(
        .enabled(if: pythonCanPassDescriptors(), "needs python3 3.9+ (socket.send_fds)"),
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func pythonStartsACommandOnATerminalTheBrokerRelays() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let output = Accumulator(try daemon.streams.open(token: bytes("p1-tty"), direction: .receive, secret: handoffSecret))
        let input = try daemon.streams.open(token: bytes("p1-tty-input"), direction: .send, secret: handoffSecret)
        let adopted = Task {
            try await runHandoff(daemon, [
                "adopt", "--process", "p1", "--tty", daemon.streamAddress, "--tty-input", daemon.streamAddress, "--wait", "--",
                "sh", "-c", "[ -t 0 ] && [ -t 1 ] && echo on a terminal; read line; stty size; echo \"got $line\"",
            ])
        }
        try await eventually("the first line", timeout: .seconds(20)) { output.text == "on a terminal\n" }
        let resized = try await runHandoff(daemon, ["resize", "--process", "p1", "--rows", "30", "--columns", "90"])
        #expect(resized.status == .exited(0), "\(resized.stderr)")
        try await input.send(bytes("typed\n"))
        try await eventually("the echo, the size and the answer", timeout: .seconds(20)) {
            output.text == "on a terminal\ntyped\n30 90\ngot typed\n"
        }
        let run = try await adopted.value
        #expect(run.status == .exited(0), "\(run.stderr)")
        #expect(run.stdout.contains("\"inputToken\": \"p1-tty-input\""), "\(run.stdout)")
        let exited = try await runHandoff(daemon, ["exited", "--process", "p1"])
        #expect(exited.status == .exited(0), "\(exited.stderr)")
        try await eventually("the broker let it go", timeout: .seconds(20)) {
            try await daemon.brokerStreams().allSatisfy { $0.process != "p1" }
        }
        #expect(try await daemon.stop() == .exited(0))
    }

    /// `handoff.py close-stdin` ends a handed-over process's stdin: `cat` reads end-of-file
    /// and the shell goes on; `resize` of a process without a terminal is refused with the
    /// broker's code.
    @Test(
        .enabled(if: pythonCanPassDescriptors(), "needs python3 3.9+ (socket.send_fds)"),
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func pythonEndsAHandedOverProcesssStdin() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let output = Accumulator(try daemon.streams.open(token: bytes("p2-stdout"), direction: .receive, secret: handoffSecret))
        let input = try daemon.streams.open(token: bytes("p2-stdin"), direction: .send, secret: handoffSecret)
        let adopted = try await runHandoff(daemon, [
            "adopt", "--process", "p2", "--stdin", daemon.streamAddress, "--stdout", daemon.streamAddress, "--", "sh", "-c", "cat; echo done",
        ])
        #expect(adopted.status == .exited(0), "\(adopted.stderr)")
        try await input.send(bytes("line\n"))
        try await eventually("cat's copy", timeout: .seconds(20)) { output.text == "line\n" }
        let closed = try await runHandoff(daemon, ["close-stdin", "--process", "p2"])
        #expect(closed.status == .exited(0), "\(closed.stderr)")
        try await eventually("cat at end-of-file, the shell after it", timeout: .seconds(20)) { output.text == "line\ndone\n" }
        let refused = try await runHandoff(daemon, ["resize", "--process", "p2", "--rows", "30", "--columns", "90"])
        #expect(refused.status == .exited(1) && refused.stderr.contains("the broker refused resize: no-tty"), "\(refused.stderr)")
        let bad = try await runHandoff(daemon, ["resize", "--process", "p2", "--rows", "0", "--columns", "90"])
        #expect(bad.status == .exited(2) && bad.stderr.contains("0 is not 1 to 65535"), "\(bad.stderr)")
        // A drain timeout out of range is refused and changes nothing (before, any was taken:
        // Int.min let a process go at once while its pipe was still open).
        let negative = try await runHandoff(daemon, ["exited", "--process", "p2", "--drain-timeout", "-1"])
        #expect(negative.status == .exited(1), "\(negative.stderr)")
        #expect(negative.stderr.contains("bad-request: drainTimeoutMilliseconds: -1000 is not 0 to 86400000 (a day)"), "\(negative.stderr)")
        #expect(try await daemon.brokerStreams().contains { $0.process == "p2" })
        let exited = try await runHandoff(daemon, ["exited", "--process", "p2", "--drain-timeout", "5"])
        #expect(exited.status == .exited(0), "\(exited.stderr)")
        try await eventually("the broker let it go", timeout: .seconds(20)) {
            try await daemon.brokerStreams().allSatisfy { $0.process != "p2" }
        }
        #expect(try await daemon.stop() == .exited(0))
    }

    /// `handoff.py adopt --tty ADDRESS --tty-fd N`: a pty master the command inherited, handed
    /// over (no command started); what its process writes on the slave reaches the host. `--tty`
    /// with another stream, and `--tty-fd` without `--tty`, are usage errors.
    @Test(
        .enabled(if: pythonCanPassDescriptors(), "needs python3 3.9+ (socket.send_fds)"),
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func pythonHandsOverAnInheritedTerminal() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let output = Accumulator(try daemon.streams.open(token: bytes("p4-tty"), direction: .receive, secret: handoffSecret))
        var (master, slave): (Int32, Int32) = (-1, -1)
        try #require(openpty(&master, &slave, nil, nil, nil) == 0)
        defer { close(slave) }
        let adopted = try await runHandoff(
            daemon, ["adopt", "--process", "p4", "--tty", daemon.streamAddress, "--tty-fd", String(master)], keep: [master])
        close(master)
        #expect(adopted.status == .exited(0), "\(adopted.stderr)")
        #expect(adopted.stdout.contains("\"kind\": \"tty\"") && !adopted.stdout.contains("\"pid\""), "\(adopted.stdout)")
        let line = Array("from the slave".utf8)
        #expect(line.withUnsafeBytes { write(slave, $0.baseAddress, $0.count) } == line.count)
        try await eventually("the slave's line at the host", timeout: .seconds(20)) { output.text == "from the slave" }

        let both = try await runHandoff(daemon, ["adopt", "--process", "p5", "--tty", daemon.streamAddress, "--stdout", daemon.streamAddress, "--", "true"])
        #expect(both.status == .exited(2) && both.stderr.contains("--tty is the process's whole stdio: not with --stdout"), "\(both.stderr)")
        let orphan = try await runHandoff(daemon, ["adopt", "--process", "p5", "--stdout", daemon.streamAddress, "--tty-fd", "3", "--", "true"])
        #expect(orphan.status == .exited(2) && orphan.stderr.contains("--tty-fd, --tty-input and --console-socket go with --tty ADDRESS"), "\(orphan.stderr)")
        #expect(try await daemon.brokerStreams().map(\.process) == ["p4"])
        #expect(try await daemon.stop() == .exited(0))
    }
}
