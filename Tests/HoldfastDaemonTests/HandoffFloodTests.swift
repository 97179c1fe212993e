import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import NIOConcurrencyHelpers
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// Any process that may connect to the handoff socket costs the broker an fd per connection, and
/// the broker's fds are what its streams redial with. Before the connection budgets, a process
/// that opened connections without end — refused or admitted — took them all: at its hard
/// limit the broker could accept nothing and no stream could redial.
@Suite("Handoff socket floods: what a peer may hold of the broker's fds", .timeLimit(.minutes(5)))
struct HandoffFloodTests {
    static var hasPython: Bool { access("/usr/bin/python3", X_OK) == 0 }

    /// Opens up to `count` connections to `path` as fast as it can and holds them until
    /// `release` exists; then, once every connection was answered or closed (at most 30 s: the
    /// refusals' answers come 2 s late, later on a loaded machine), says how many the broker
    /// answered (a refusal frame), closed, or left open.
    static let flooder = """
        import os, resource, socket, sys, time
        path, count, ready, release = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        held, failed, start = [], 0, time.monotonic()
        while len(held) + failed < count and time.monotonic() - start < 10:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.settimeout(1)
            try:
                s.connect(path)
                held.append(s)
            except OSError:
                failed += 1
                s.close()
        open(ready, "w").close()
        while not os.path.exists(release):
            time.sleep(0.02)
        def tally():
            answered = closed = still_open = 0
            for s in held:
                try:
                    if s.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                        answered += 1
                    else:
                        closed += 1
                except BlockingIOError:
                    still_open += 1
                except OSError:
                    closed += 1
            return answered, closed, still_open
        deadline = time.monotonic() + 30
        answered, closed, still_open = tally()
        while still_open and time.monotonic() < deadline:
            time.sleep(0.05)
            answered, closed, still_open = tally()
        print("connected", len(held), "failed", failed, "answered", answered, "closed", closed, "open", still_open, flush=True)
        """

    /// 600 connections from `nobody` (not admitted) held open, with the broker's hard limit at
    /// 256: its fds stay within the refusals it answers, a stream cut meanwhile redials and every
    /// byte arrives, root is served all along, and the journal gets at most 8 lines and a summary,
    /// not 600.
    @Test(
        .enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"),
        .enabled(if: Self.hasPython, "needs python3 (the flood runs as another uid)"))
    func aFloodOfRefusedConnectionsTakesNeitherTheBrokersFDsNorARuntimesPlace() async throws {
        let daemon = try await DaemonFixture(
            extraConfig: "handoff:\n  mode: \"0666\"\n  allowed_uids: [0]\n", openFileLimit: (soft: 64, hard: 256))
        defer { daemon.cleanUp() }
        let broker = try #require(try await daemon.rolePID("broker"))
        let output = try daemon.streams.open(token: bytes("victim-out"), direction: .receive)
        let received = collect(output)
        // The victim waits half-way until the flood is over: a loaded machine could otherwise see
        // it done before the flood, with no stream left to cut.
        let floodOver = daemon.directory.file("flood-over")
        _ = try await daemon.launch(ProcessSpec(
            id: "victim",
            argv: ["sh", "-c", "i=0; while [ $i -lt 1500 ]; do i=$((i+1)); echo line $i; sleep 0.004; if [ $i -eq 750 ]; then while [ ! -e \(floodOver) ]; do sleep 0.01; done; fi; done"],
            stdout: daemon.spec("victim-out")))
        try await eventually("the victim's stream connected") { try await daemon.brokerStreams().contains { $0.process == "victim" && $0.state == .connected } }
        let baseline = openDescriptorCount(pid: broker)

        try writeFile(daemon.directory.file("flood.py"), bytes(Self.flooder))
        // Where `nobody` may say it is ready.
        let signals = daemon.directory.file("flood")
        mkdir(signals, 0o777)
        chmod(signals, 0o777)
        let (ready, release) = (signals + "/ready", signals + "/release")
        let out = daemon.directory.file("flood.out")
        let outFD = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        var options = SpawnOptions(
            executable: "python3", arguments: ["python3", daemon.directory.file("flood.py"), daemon.directory.file("broker.sock"), "600", ready, release])
        options.user = (65534, 65534, [65534])
        options.stdout = outFD
        options.stderr = outFD
        options.newSession = true
        let flooder = try Spawner.spawn(options)
        daemon.processes.adopt(flooder)
        close(outFD)

        let most = NIOLockedValueBox(0)
        let sampler = Task {
            while !Task.isCancelled {
                let count = openDescriptorCount(pid: broker)
                most.withLockedValue { $0 = max($0, count) }
                try? await Task.sleep(for: .milliseconds(20))
            }
        }
        try await eventually("the flood's connections made", timeout: .seconds(30)) { access(ready, F_OK) == 0 }
        // While the flood holds its connections: the host loses the victim's stream, which must
        // redial, and a runtime as root is served.
        #expect(daemon.streams.dropAllConnections() >= 1)
        let runtime = try await ControlClient.connect(to: daemon.directory.file("broker.sock"))
        let stats = try await runtime.call(BrokerRequest.stats, reply: BrokerStats.self)
        #expect(stats.handoffConnections == 1, "root's connection, the only one served")
        #expect((stats.handoffTurnedAway ?? 0) >= 500, "the flood's connections, turned away: \(stats)")
        let streams = try await runtime.call(BrokerRequest.list(ListRequest()), reply: ListResponse.self)
        #expect(streams.streams.isEmpty, "root handed nothing over: it sees none of the supervisor's streams")
        try await eventually("the victim's stream redialled during the flood") {
            try await daemon.brokerStreams().contains { $0.process == "victim" && $0.state == .connected && $0.reconnects >= 1 }
        }
        try writeFile(release, [])
        #expect(try await daemon.processes.wait(flooder, timeout: .seconds(60)) == .exited(0))
        try writeFile(floodOver, [])
        sampler.cancel()
        runtime.close()

        let printed = String(decoding: readFile(out) ?? [], as: UTF8.self)
        let counts = Self.counts(printed)
        #expect(counts["connected"] == 600, "every connect accepted: \(printed)")
        #expect((1...8).contains(counts["answered"] ?? 0), "at most 8 refusals answered at once: \(printed)")
        #expect(counts["open"] == 0, "none held: \(printed)")
        // Bounded whatever the flood's size: up to 8 refusals being answered, up to 8 closes in
        // flight on the closer threads (the accept loop waits at most 50 ms for them to catch
        // up, which a loaded machine can outlast), root's connection, the victim's redial, and
        // a few taken for a moment. 600 connections held would be 600.
        #expect(most.withLockedValue { $0 } <= baseline + 24, "the broker's fds: \(baseline) before, \(most.withLockedValue { $0 }) at most during the flood")

        let report = try await daemon.wait("victim")
        #expect(report.exitCode == 0)
        #expect(await received.value == expectedLines(1500), "the victim's every byte, once")
        #expect(try await daemon.rolePID("broker") == broker, "the same broker")
        // The journal: at most 8 lines of their own in 10 s, then one summary of the rest.
        try await eventually("the flood summed up", timeout: .seconds(20)) { daemon.log.contains("turned away without a line of their own") }
        let log = daemon.log
        let ownLines = log.components(separatedBy: "handoff peer refused").count - 1
            + log.components(separatedBy: "handoff connection closed at once").count - 1
        #expect((1...8).contains(ownLines), "lines of their own: \(ownLines)")
        let summary = try #require(log.split(separator: "\n").first { $0.contains("turned away without a line of their own") })
        #expect(summary.contains("closedAtOnce=5") || summary.contains("closedAtOnce=6"), "the rest of the 600 counted: \(summary)")
        #expect(!log.contains("handoff accept failed"), "the broker never ran out of fds to accept with")
        #expect(try await daemon.stop() == .exited(0))
    }

    /// Root (admitted) opens more connections than `handoff.max_connections` (16 here): the 17th
    /// is answered `too-many-connections`, 300 more are closed at once, the broker's fds stay
    /// bounded, and a place freed is served again.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func anAdmittedPeerGetsAtMostMaxConnectionsAndAClearRefusalBeyond() async throws {
        let daemon = try await DaemonFixture(extraConfig: "handoff:\n  max_connections: 16\n")
        defer { daemon.cleanUp() }
        let broker = try #require(try await daemon.rolePID("broker"))
        let path = daemon.directory.file("broker.sock")
        var served: [ControlClient] = []
        // Counted once the broker serves the socket (the first connection answered, so it is
        // past its start-up and the supervisor's `open-handoff`), less that connection's fd.
        var baseline = 0
        for _ in 0..<16 {
            let client = try await ControlClient.connect(to: path)
            _ = try await client.call(BrokerRequest.stats, reply: BrokerStats.self)
            if served.isEmpty { baseline = openDescriptorCount(pid: broker) - 1 }
            served.append(client)
        }
        let extra = try await ControlClient.connect(to: path)
        do {
            _ = try await extra.call(BrokerRequest.stats, reply: BrokerStats.self)
            Issue.record("the 17th connection was served")
        } catch {
            #expect(error.code == .tooManyConnections, "\(error)")
            #expect(error.message.contains("16 handoff connections at once (handoff.max_connections)"), "\(error)")
        }
        extra.close()

        // 300 more, never used: closed as they come (8 may wait 2 s for a request to refuse).
        var flood: [Int32] = []
        defer { for fd in flood { close(fd) } }
        for _ in 0..<300 {
            let fd = socket(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            try #require(fd >= 0)
            flood.append(fd)
            var address = sockaddr_un()
            address.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &address.sun_path) { raw in
                for (index, byte) in path.utf8.enumerated() { raw[index] = byte }
            }
            let result = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            try #require(result == 0, "connect: \(errno)")
        }
        try await eventually("all 300 accepted and turned away") {
            (try? await served[0].call(BrokerRequest.stats, reply: BrokerStats.self).handoffTurnedAway) == 301
        }
        // Turned-away connections are closed on the broker's closer threads (`ForeignCloser`),
        // a moment after they are counted; its queue is a pipe (2 fds).
        do {
            try await eventually("the turned-away connections' fds closed") { openDescriptorCount(pid: broker) <= baseline + 16 + 8 + 2 + 2 }
        } catch {
            Issue.record("the broker's fds: \(openDescriptorCount(pid: broker)), \(baseline) before")
        }
        #expect(try await served[0].call(BrokerRequest.stats, reply: BrokerStats.self).handoffConnections == 16)
        let metrics = try await served[0].call(BrokerRequest.metrics, reply: MetricsResponse.self).text
        #expect(metrics.contains("holdfast_broker_handoff_connections 16"), "\(metrics)")
        #expect(metrics.contains("holdfast_broker_handoff_connections_refused_total 301"), "\(metrics)")

        served.removeLast().close()
        try await eventually("a place freed") {
            (try? await served[0].call(BrokerRequest.stats, reply: BrokerStats.self).handoffConnections) == 15
        }
        let again = try await ControlClient.connect(to: path)
        #expect(try await again.call(BrokerRequest.stats, reply: BrokerStats.self).handoffConnections == 16, "served in the freed place")
        again.close()
        for client in served { client.close() }
        try await daemon.waitForLog("handoff connection refused: the broker serves 16 at once")
        #expect(try await daemon.stop() == .exited(0))
    }

    /// "connected 600 failed 0 answered 8 ..." as a dictionary.
    static func counts(_ printed: String) -> [String: Int] {
        let words = printed.split(whereSeparator: \.isWhitespace).map(String.init)
        var result: [String: Int] = [:]
        for index in stride(from: 0, to: words.count - 1, by: 2) {
            if let value = Int(words[index + 1]) { result[words[index]] = value }
        }
        return result
    }

    /// A runtime that says `process-exited` again and again, each time naming a day's drain
    /// timeout, is answered each time and starts one drain. Each repeat started a drain of its
    /// own (a task, a timer per output, its own `drained`), kept as long as the timeout it named:
    /// repeated without end, the broker grew without bound.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aProcessExitedSaidAgainAndAgainStartsOneDrain() async throws {
        let daemon = try await DaemonFixture()
        defer { daemon.cleanUp() }
        let received = collect(try daemon.streams.open(token: bytes("rep-out"), direction: .receive))
        let pipe = try PipeEnds.make()
        let runtime = try await daemon.handOver("rep", [(.stdout, "rep-out")], descriptors: [pipe.read])
        let line = bytes("before the exit\n")
        #expect(line.withUnsafeBytes { write(pipe.write, $0.baseAddress, $0.count) } == line.count)
        let exited = BrokerRequest.processExited(ProcessExitedRequest(process: "rep", drainTimeoutMilliseconds: 86_400_000))
        for _ in 0..<200 { _ = try await runtime.request(exited.frameType, body: exited.body) }
        // The process's last holder lets go: the drain ends at end-of-file, every repeat's too.
        close(pipe.write)
        #expect(try await withTimeout("the output to its end", .seconds(30)) { await received.value } == line)
        try await eventually("the drain logged") { daemon.log.contains("process streams drained") && daemon.log.contains("process=rep") }
        #expect(try await daemon.stop() == .exited(0))
        let drains = daemon.log.split(separator: "\n").filter { $0.contains("process streams drained") && $0.contains("process=rep") }
        #expect(drains.count == 1, "one drain for 200 words of one exit: \(drains.count)")
    }

}
