import HoldfastCore
import HoldfastHost
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// An fd handed over on the handoff socket is a file *description* the peer may still share:
/// the runtime's own copy, a shell that inherited it. O_NONBLOCK belongs to the description, so
/// any holder can clear it after the broker set it — by malice, or by the habit many programs
/// have of making their stdio blocking. The broker must not depend on it: a read of the empty
/// pipe, or a write to the full one, would otherwise wait in the kernel on the broker's one I/O
/// thread, every stream with it, until the watchdog took the loop to a new thread.
@Suite("A handed-over fd whose description another holder makes blocking", .timeLimit(.minutes(3)))
struct HandoffSharedDescriptionTests {
    /// What the runtime's process writes its stdout into and reads its stdin from.
    enum Transport: String, CaseIterable, Sendable, CustomTestStringConvertible {
        case pipe
        /// A connected pair of Unix stream sockets (systemd-style stdio).
        case socketPair

        var testDescription: String { rawValue }

        /// Two connected fds: bytes written to `write` are read from `read`.
        func make() throws -> (read: Int32, write: Int32) {
            switch self {
            case .pipe:
                let ends = try PipeEnds.make()
                return (ends.read, ends.write)
            case .socketPair:
                var fds: [Int32] = [-1, -1]
                guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
                    throw SystemError.last("socketpair")
                }
                return (fds[0], fds[1])
            }
        }
    }

    /// While a bystander streams for 4 s: it is intact (every line, the roles' pids), no I/O
    /// thread of the broker waited in the kernel (no warning) and the watchdog took nothing over
    /// (its metric 0; the daemon serves metrics at `{run}/metrics.sock`).
    static func expectNothingStalled(_ daemon: DaemonFixture, roles before: [String: (pid: pid_t?, restarts: Int)]) async throws {
        let bystander = try await ContainmentTests.startBystander(daemon)
        try await ContainmentTests.expectIntact(daemon, roles: before, bystander: bystander)
        #expect(!daemon.log.contains("I/O thread stuck in the kernel"), "no I/O thread waited in the kernel")
        let metrics = parsePrometheus(
            try await httpExchange(.unix(path: daemon.directory.file("metrics.sock")), "GET /metrics HTTP/1.1\r\nHost: guest\r\n\r\n"))
        #expect((metrics["holdfast_broker_reactor_stalls_total"] ?? 0) == 0, "\(metrics.filter { $0.key.contains("reactor") })")
    }

    /// The runtime keeps a copy of both pipe ends it hands over and clears O_NONBLOCK on them
    /// while its process leaves its stdout empty and its stdin full. No I/O thread is stuck (the
    /// watchdog's count stays 0, no warning), a bystander streams every line, the handed-over
    /// process's stdout and stdin arrive exact, and the runtime's copies end blocking as it left them.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"), arguments: Transport.allCases)
    func aRuntimeThatClearsNonBlockingOnItsCopiesStallsNothing(transport: Transport) async throws {
        let daemon = try await DaemonFixture(extraConfig: "metrics:\n  address: \"unix:{run}/metrics.sock\"")
        defer { daemon.cleanUp() }
        let processes = TestProcesses()
        defer { processes.killAll() }
        let before = try await ContainmentTests.roles(daemon)
        let output = try daemon.streams.open(token: bytes("s-out"), direction: .receive)
        let input = try daemon.streams.open(token: bytes("s-in"), direction: .send)
        let received = collect(output)
        let (release, copy) = (daemon.directory.file("release"), daemon.directory.file("stdin.copy"))
        // 100 lines, then an empty stdout and an unread stdin until released; then its stdin
        // copied to a file until the end, and 100 lines more.
        let (outPipe, inPipe) = (try transport.make(), try transport.make())
        let pid = try processes.start(
            ["sh", "-c", "i=0; while [ $i -lt 100 ]; do i=$((i+1)); echo s $i; done; while [ ! -e \(release) ]; do sleep 0.05; done; "
                + "cat > \(copy); while [ $i -lt 200 ]; do i=$((i+1)); echo s $i; done"],
            stdin: inPipe.read, stdout: outPipe.write)
        close(outPipe.write)
        close(inPipe.read)

        let runtime = try await ControlClient.connect(to: daemon.directory.file("broker.sock"))
        let (outSpec, inSpec) = (daemon.spec("s-out"), daemon.spec("s-in"))
        let adopt = BrokerRequest.adopt(AdoptRequest(process: "shared", streams: [
            StreamDescription(kind: .stdout, fd: 0, address: outSpec.address, mode: .resumable, token: outSpec.token, secret: outSpec.secret),
            StreamDescription(kind: .stdin, fd: 1, address: inSpec.address, mode: .resumable, token: inSpec.token, secret: inSpec.secret),
        ]))
        _ = try await runtime.request(adopt.frameType, body: adopt.body, descriptors: [outPipe.read, inPipe.write])
        // The broker made both descriptions non-blocking; the runtime's copies are the same ones.
        #expect(fcntl(outPipe.read, F_GETFL) & O_NONBLOCK != 0 && fcntl(inPipe.write, F_GETFL) & O_NONBLOCK != 0)
        for fd in [outPipe.read, inPipe.write] { _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) }

        // More stdin than the pipe (or socket) holds: 1 MiB, while the process reads none: the broker's write finds
        // the pipe full. Its stdout is empty after the first 100 lines: the next read finds nothing.
        let sent = (0..<15000).flatMap { bytes(String(format: "in %05d ", $0) + String(repeating: "x", count: 60) + "\n") }
        // (Sent meanwhile: the host's send waits while the broker cannot write.)
        let sending = Task { try await input.send(sent) }
        try await eventually("the first 100 lines at the host, the stdin's first 64 KiB at the broker", timeout: .seconds(20)) {
            let streams = try await daemon.brokerStreams().filter { $0.process == "shared" }
            return streams.contains { $0.kind == .stdout && $0.bytesToHost >= 492 } && streams.contains { $0.kind == .stdin && $0.bytesFromHost >= 65536 }
        }
        try await Task.sleep(for: .seconds(1))
        // Again, in case anything set it back, while a bystander streams for 4 s.
        for fd in [outPipe.read, inPipe.write] { _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) }
        try await Self.expectNothingStalled(daemon, roles: before)

        try writeFile(release, [])
        // The runtime lets go of its stdin copy, or `cat` would never see the end.
        close(inPipe.write)
        try await sending.value
        #expect(await input.finish() == 0, "every stdin byte acknowledged")
        #expect(try await processes.wait(pid) == .exited(0))
        let exited = BrokerRequest.processExited(ProcessExitedRequest(process: "shared"))
        _ = try await runtime.request(exited.frameType, body: exited.body)
        let data = try await withTimeout("the output", .seconds(60)) { await received.value }
        #expect(data == expectedLines(200, prefix: "s"), "stdout: every line once, in order (\(data.count) bytes)")
        #expect(readFile(copy) == sent, "stdin: exact (\(readFile(copy)?.count ?? -1) of \(sent.count) bytes)")
        // Every stream of it ended: the broker's copies are closed; the runtime's are as it left them.
        try await eventually("the process gone from the broker", timeout: .seconds(20)) {
            try await daemon.brokerStreams().allSatisfy { $0.process != "shared" }
        }
        #expect(fcntl(outPipe.read, F_GETFL) & O_NONBLOCK == 0)
        close(outPipe.read)
        #expect(try await daemon.stop() == .exited(0))
    }

    /// The same for a terminal, where no per-call flag exists (a pty master takes neither
    /// RWF_NOWAIT nor MSG_DONTWAIT: only its description's O_NONBLOCK keeps a read of it from
    /// waiting). The runtime keeps its copy of the master and clears O_NONBLOCK on it, twice;
    /// then a line is typed, which the terminal echoes and its process answers 3 s later. Before, the broker's next read of the master waited in
    /// the kernel: the watchdog took the loop to a new thread, the read's thread stayed stuck
    /// until the terminal printed, and every read after it did the same. Now the broker sets the
    /// flag again before it reads or writes a handed-over terminal: nothing stalls, and the
    /// runtime's copy is left blocking again, as it made it, when the broker lets go.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aRuntimeThatClearsNonBlockingOnItsTerminalStallsNothing() async throws {
        let daemon = try await DaemonFixture(extraConfig: "metrics:\n  address: \"unix:{run}/metrics.sock\"")
        defer { daemon.cleanUp() }
        let processes = TestProcesses()
        defer { processes.killAll() }
        let before = try await ContainmentTests.roles(daemon)
        let output = try daemon.streams.open(token: bytes("t-out"), direction: .receive)
        let input = try daemon.streams.open(token: bytes("t-in"), direction: .send)
        let received = collect(output)
        var (master, slave): (Int32, Int32) = (-1, -1)
        try #require(openpty(&master, &slave, nil, nil, nil) == 0)
        defer { close(master) }
        // Prints nothing until it reads a line, and then for 3 s: the broker's read of the master
        // after the terminal's echo finds nothing.
        let pid = try processes.start(["sh", "-c", "read line; sleep 3; echo \"got $line\""], stdin: slave, stdout: slave, stderr: slave)
        close(slave)

        let runtime = try await ControlClient.connect(to: daemon.directory.file("broker.sock"))
        defer { runtime.close() }
        let (outSpec, inSpec) = (daemon.spec("t-out"), daemon.spec("t-in"))
        let adopt = BrokerRequest.adopt(AdoptRequest(process: "terminal", streams: [
            StreamDescription(
                kind: .tty, fd: 0, address: outSpec.address, mode: .resumable, token: outSpec.token, secret: outSpec.secret,
                inputAddress: inSpec.address, inputToken: inSpec.token, inputSecret: inSpec.secret)
        ]))
        _ = try await runtime.request(adopt.frameType, body: adopt.body, descriptors: [master])
        #expect(fcntl(master, F_GETFL) & O_NONBLOCK != 0, "the broker made the description non-blocking")
        _ = fcntl(master, F_SETFL, fcntl(master, F_GETFL) & ~O_NONBLOCK)
        try await Task.sleep(for: .seconds(1))
        _ = fcntl(master, F_SETFL, fcntl(master, F_GETFL) & ~O_NONBLOCK)
        // The line typed: its echo is read, and the read after it finds the terminal empty.
        try await input.send(bytes("hello\n"))
        try await Self.expectNothingStalled(daemon, roles: before)

        // The terminal works: the typed line was echoed and is answered, then it ends.
        #expect(try await processes.wait(pid) == .exited(0))
        let exited = BrokerRequest.processExited(ProcessExitedRequest(process: "terminal"))
        _ = try await runtime.request(exited.frameType, body: exited.body)
        let data = try await withTimeout("the terminal's output", .seconds(30)) { await received.value }
        #expect(String(decoding: data, as: UTF8.self) == "hello\r\ngot hello\r\n")
        try await eventually("the process gone from the broker", timeout: .seconds(20)) {
            try await daemon.brokerStreams().allSatisfy { $0.process != "terminal" }
        }
        #expect(fcntl(master, F_GETFL) & O_NONBLOCK == 0, "the runtime's copy blocking again, as it made it")
        #expect(try await daemon.stop() == .exited(0))
    }
}
