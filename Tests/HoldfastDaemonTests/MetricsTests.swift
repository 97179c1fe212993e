import HoldfastCore
import HoldfastPosix
import HoldfastProtocol
import HoldfastTestSupport
import Testing

@testable import HoldfastSupervisor

#if canImport(Glibc)
import Glibc
#endif

/// Samples of the Prometheus text format: `name{labels} value` → value; comments skipped.
func parsePrometheus(_ text: String) -> [String: Double] {
    var samples: [String: Double] = [:]
    for line in text.split(separator: "\n") where !line.hasPrefix("#") {
        guard let space = line.lastIndex(of: " "), let value = Double(line[line.index(after: space)...]) else { continue }
        samples[String(line[..<space])] = value
    }
    return samples
}

/// One HTTP request over a fresh connection; the whole response.
func httpExchange(_ address: SocketAddress, _ request: String) async throws -> String {
    let connection = try await Dialer.connect(to: address, timeout: .seconds(2))
    defer { connection.close() }
    try await send(connection, Array(request.utf8))
    return String(decoding: try await readAll(connection), as: UTF8.self)
}

@Suite("Metrics: the Prometheus endpoint", .timeLimit(.minutes(5)))
struct MetricsTests {
    @Test func requestHeadsGetTheRightAnswer() async {
        func answer(_ head: String) async -> String {
            String(decoding: await MetricsEndpoint.response(toHead: Array(head.utf8)) { "holdfast_up 1\n" }, as: UTF8.self)
        }
        let ok = await answer("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        #expect(ok.hasPrefix("HTTP/1.1 200 OK\r\n"))
        #expect(ok.contains("Content-Type: text/plain; version=0.0.4"))
        #expect(ok.hasSuffix("\r\n\r\nholdfast_up 1\n"))
        #expect(await answer("GET /metrics?x=1 HTTP/1.0\r\n\r\n").hasPrefix("HTTP/1.1 200"))
        #expect(await answer("HEAD /metrics HTTP/1.1\r\n\r\n").hasSuffix("Content-Length: 0\r\nConnection: close\r\n\r\n"))
        #expect(await answer("GET / HTTP/1.1\r\n\r\n").hasPrefix("HTTP/1.1 404"))
        #expect(await answer("POST /metrics HTTP/1.1\r\n\r\n").hasPrefix("HTTP/1.1 405"))
        #expect(await answer("\u{0}\u{1}garbage\r\n\r\n").hasPrefix("HTTP/1.1 400"))
        #expect(await answer("GET /metrics\r\n\r\n").hasPrefix("HTTP/1.1 400"))
        #expect(MetricsEndpoint.isComplete(Array("GET / HTTP/1.1\r\n\r\n".utf8)))
        #expect(!MetricsEndpoint.isComplete(Array("GET / HTTP/1.1\r\n".utf8)))
        // After each read only the new bytes are looked at (and the 3 before them, where an end
        // split by the read begins): a head sent a byte at a time costs one pass, not a pass
        // per byte. An end before that is not looked for again, so this finds none:
        let head = Array("GET / HTTP/1.1\r\n\r\nmore".utf8)
        #expect(!MetricsEndpoint.headEnds(in: head, lookingFrom: head.count - 1))
        // An end split across reads is found, wherever the split.
        let whole = Array("GET / HTTP/1.1\r\n\r\n".utf8)
        for split in (whole.count - 4)..<whole.count {
            #expect(MetricsEndpoint.headEnds(in: whole, lookingFrom: split), "split at \(split)")
        }
    }

    static let toHost = "holdfast_stream_bytes_total{direction=\"to_host\"}"

    /// A scrape that has the broker's part. A scrape waits at most 2 s for it and otherwise leaves
    /// it out, which a loaded run's broker can miss: the checks of it are made on one that has it.
    static func scrapeWithTheBroker(_ endpoint: SocketAddress) async throws -> [String: Double] {
        var metrics: [String: Double] = [:]
        try await eventually("a scrape with the broker's part") {
            let response = try await httpExchange(endpoint, "GET /metrics HTTP/1.1\r\nHost: guest\r\n\r\n")
            #expect(response.hasPrefix("HTTP/1.1 200 OK"))
            metrics = parsePrometheus(response)
            return metrics[toHost] != nil
        }
        return metrics
    }

    /// A broker that takes over a live stream (here after the last one was killed; a live
    /// upgrade does the same) counts only the bytes it moves: the stream's bytes before it come
    /// back from its checkpoint, and were counted again — every restart reported each live
    /// stream's whole life once more, and the lost-bytes counter came back at its past losses.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own")) func aBrokerThatTakesOverCountsOnlyWhatItMoves() async throws {
        let daemon = try await DaemonFixture(extraConfig: "metrics:\n  address: \"unix:{run}/metrics.sock\"")
        defer { daemon.cleanUp() }
        let endpoint = SocketAddress.unix(path: daemon.directory.file("metrics.sock"))
        let toHost = Self.toHost
        func scrapeWithTheBroker() async throws -> [String: Double] { try await Self.scrapeWithTheBroker(endpoint) }
        let output = Accumulator(try daemon.streams.open(token: bytes("c-out"), direction: .receive))
        let gate = daemon.directory.file("go")
        _ = try await daemon.bridge.create(ProcessSpec(
            id: "c",
            argv: ["sh", "-c", "head -c 50000 /dev/zero; while [ ! -e \(gate) ]; do sleep 0.02; done; head -c 30000 /dev/zero"],
            stdout: daemon.spec("c-out")))
        try await eventually("the first part") { output.count == 50_000 }
        try await eventually("the first broker counted it") { try await scrapeWithTheBroker()[toHost] == 50_000 }
        let first = try #require(try await daemon.rolePID("broker"))
        kill(first, SIGKILL)
        try await eventually("the next broker relaying the stream", timeout: .seconds(30)) {
            let broker = try await daemon.rolePID("broker")
            guard broker != nil, broker != first else { return false }
            return try await daemon.brokerStreams().contains { $0.process == "c" && $0.state == .connected }
        }
        try writeFile(gate, [])
        _ = try await daemon.wait("c")
        try await eventually("every byte at the host") { output.count == 80_000 }
        let after = try await scrapeWithTheBroker()
        #expect(after[toHost] == 30_000, "the next broker counted what it moved, not the stream's first 50,000 again")
        #expect((after["holdfast_stream_lost_bytes_total"] ?? 0) == 0, "nothing lost")
        #expect(try await daemon.stop() == .exited(0))
    }

    /// A daemon with the endpoint on a Unix socket: scraped before and after a process sends
    /// 100,000 bytes and a migration: the byte counter moves by exactly that, reconnects and the
    /// latency histogram count move, the bridge is up, one direct process started.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own")) func countersMoveWhenBytesFlowAndStreamsReconnect() async throws {
        let daemon = try await DaemonFixture(extraConfig: "metrics:\n  address: \"unix:{run}/metrics.sock\"")
        defer { daemon.cleanUp() }
        let endpoint = SocketAddress.unix(path: daemon.directory.file("metrics.sock"))
        let toHost = Self.toHost
        func scrapeWithTheBroker() async throws -> [String: Double] { try await Self.scrapeWithTheBroker(endpoint) }
        let before = try await scrapeWithTheBroker()
        #expect(before["holdfast_bridge_up"] == 1)
        #expect((before["holdfast_bridge_connects_total"] ?? 0) >= 1)
        #expect(before["holdfast_role_restarts_total{role=\"broker\"}"] == 0)
        #expect(before[toHost] == 0, "the broker's metrics in the scrape: \(before.keys.sorted())")

        let output = Accumulator(try daemon.streams.open(token: bytes("m-out"), direction: .receive))
        let gate = daemon.directory.file("go")
        _ = try await daemon.bridge.create(ProcessSpec(
            id: "m",
            argv: ["sh", "-c", "head -c 50000 /dev/zero; while [ ! -e \(gate) ]; do sleep 0.02; done; head -c 50000 /dev/zero"],
            stdout: daemon.spec("m-out")))
        // Half the bytes, a migration, the stream back (the process waits for the gate), the rest.
        try await eventually("the first half") { output.count == 50_000 }
        blackout(daemon)
        try await Task.sleep(for: .milliseconds(100))
        lightsOn(daemon)
        try await eventually("the stream to reconnect") {
            try await daemon.brokerStreams().first { $0.process == "m" }.map { $0.reconnects >= 1 && $0.state == .connected } ?? false
        }
        try writeFile(gate, [])
        _ = try await daemon.wait("m")
        try await eventually("every byte at the host") { output.count == 100_000 }
        let after = try await scrapeWithTheBroker()
        #expect(after[toHost] == 100_000, "the counter moved by exactly the bytes the host received")
        #expect((after["holdfast_stream_reconnects_total"] ?? 0) >= 1)
        #expect((after["holdfast_stream_reconnect_seconds_count"] ?? 0) >= 1)
        #expect((after["holdfast_stream_dial_attempts_total"] ?? 0) >= 2)
        #expect(after["holdfast_processes_started_total{runtime=\"direct\"}"] == 1)
        #expect(after["holdfast_process_exits_total"] == 1)
        #expect((after["holdfast_broker_open_fds"] ?? 0) > 0)
        #expect((after["holdfast_broker_malloc_in_use_bytes"] ?? 0) > 0)
        #expect((after["holdfast_supervisor_open_fds"] ?? 0) > 10)
        #expect((after["holdfast_supervisor_fd_limit"] ?? 0) >= (after["holdfast_supervisor_open_fds"] ?? .infinity))
        #expect(try await httpExchange(endpoint, "GET /nope HTTP/1.1\r\n\r\n").hasPrefix("HTTP/1.1 404"))
        // A scrape does not move anything by itself.
        #expect(try await scrapeWithTheBroker()[toHost] == 100_000)
        #expect(try await daemon.stop() == .exited(0))
    }

    /// Any process in the guest may bind a TCP port above 1023, the endpoint's before the daemon
    /// starts among them. The daemon failed to start then (`bind: Address already in use`, exit
    /// 1, every container denied its service by a process holding a port); now it serves, says
    /// so, and listens once the port is free.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aPortTakenFirstKeepsNoContainerFromBeingServedAndIsListenedOnOnceFree() async throws {
        let squatter = try Listener(binding: .tcp(host: "127.0.0.1", port: 0))
        guard case .tcp(_, let port) = squatter.boundAddress else { throw SystemError("no port", errno: .invalidArgument) }
        let endpoint = SocketAddress.tcp(host: "127.0.0.1", port: port)
        let daemon = try await DaemonFixture(extraConfig: "metrics:\n  address: \"tcp://127.0.0.1:\(port)\"")
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        try await daemon.waitForLog("metrics endpoint: cannot listen; containers are served meanwhile")
        #expect(daemon.log.contains("Address already in use"), "the reason logged")
        _ = try await daemon.bridge.create(ProcessSpec(id: "served", argv: ["true"]))
        try await eventually("a container served meanwhile") { exits.count("served") == 1 }
        squatter.close()
        try await daemon.waitForLog("metrics endpoint: listening at last", timeout: .seconds(40))
        let response = try await httpExchange(endpoint, "GET /metrics HTTP/1.1\r\nHost: guest\r\n\r\n")
        #expect(response.hasPrefix("HTTP/1.1 200 OK"), "\(response.prefix(200))")
        #expect(parsePrometheus(response)["holdfast_process_exits_total"] == 1, "the daemon's own metrics")
        #expect(try await daemon.stop() == .exited(0))
    }

    /// Any process in the guest may dial the endpoint, and each connection is an fd of the
    /// supervisor. 300 connections that never send a head: the supervisor holds at most
    /// `maxConnections` of them at any moment (sampled while they come; before, it held every
    /// one for 5 s), closes the oldest as newer ones come, and a scrape among them is answered.
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aFloodOfSilentConnectionsNeitherExhaustsTheSupervisorNorKeepsAScraperOut() async throws {
        let daemon = try await DaemonFixture(extraConfig: "metrics:\n  address: \"unix:{run}/metrics.sock\"")
        defer { daemon.cleanUp() }
        let endpoint = SocketAddress.unix(path: daemon.directory.file("metrics.sock"))
        #expect(try await httpExchange(endpoint, "GET /metrics HTTP/1.0\r\n\r\n").hasPrefix("HTTP/1.1 200 OK"))
        let baseline = openDescriptorCount(pid: daemon.daemonPID)
        var silent: [AsyncFD] = []
        defer { for connection in silent { connection.close() } }
        var most = baseline
        for index in 0..<300 {
            silent.append(try await Dialer.connect(to: endpoint, timeout: .seconds(10)))
            if index % 10 == 0 { most = max(most, openDescriptorCount(pid: daemon.daemonPID)) }
        }
        for _ in 0..<20 {
            most = max(most, openDescriptorCount(pid: daemon.daemonPID))
            try await Task.sleep(for: .milliseconds(10))
        }
        // The broker's reply to a scrape and a control client come and go: a little slack.
        #expect(most - baseline <= MetricsEndpoint.maxConnections + 4, "the supervisor held \(most - baseline) more fds at most")
        let scrape = try await httpExchange(endpoint, "GET /metrics HTTP/1.0\r\n\r\n")
        #expect(scrape.hasPrefix("HTTP/1.1 200 OK"), "a scrape among the flood: \(scrape.prefix(200))")
        func closedByTheServer(_ connection: AsyncFD) -> Bool {
            var byte: UInt8 = 0
            return (try? withUnsafeMutableBytes(of: &byte) { try connection.readNow(into: $0) }) == 0
        }
        try await eventually("the oldest closed by the supervisor") { silent.prefix(200).allSatisfy(closedByTheServer) }
        try await eventually("the supervisor's fds back near the baseline") {
            openDescriptorCount(pid: daemon.daemonPID) - baseline <= MetricsEndpoint.maxWaitingForHead + 4
        }
        #expect(try await daemon.stop() == .exited(0))
    }

    /// Scrapes in flight together share one question to the broker (each answer costs it a walk
    /// of every stream and of its fds, on the channel it serves one request at a time): 12
    /// scrapes sent while the broker is stopped for a moment (so they all come before its
    /// answer) put one question to it, and every one of them gets the broker's part. Before,
    /// each asked its own: 12 renders queued in the broker, adopts and resizes behind them.
    /// (12: the endpoint keeps 16 connections waiting for their head, and closes the oldest
    /// beyond that.)
    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func scrapesInFlightTogetherShareOneQuestionToTheBroker() async throws {
        let daemon = try await DaemonFixture(extraConfig: "metrics:\n  address: \"unix:{run}/metrics.sock\"")
        defer { daemon.cleanUp() }
        let endpoint = SocketAddress.unix(path: daemon.directory.file("metrics.sock"))
        func scrape() async throws -> [String: Double] {
            parsePrometheus(try await httpExchange(endpoint, "GET /metrics HTTP/1.0\r\n\r\n"))
        }
        let before = try await scrape()
        let broker = try #require(try await daemon.rolePID("broker"))
        let pinned = try #require(PinnedProcess(broker))
        #expect(kill(broker, SIGSTOP) == 0)
        defer { pinned.signal(SIGCONT) }
        try await eventually("every thread of the broker stopped") { everyThreadStopped(broker) }
        let scrapes = Task {
            try await withThrowingTaskGroup(of: [String: Double].self) { group in
                for _ in 0..<12 { group.addTask { try await scrape() } }
                var all: [[String: Double]] = []
                for try await one in group { all.append(one) }
                return all
            }
        }
        try await Task.sleep(for: .milliseconds(700))  // within the 2 s the broker is given
        #expect(kill(broker, SIGCONT) == 0)
        let all = try await withTimeout("the scrapes", .seconds(30)) { try await scrapes.value }
        let withTheBroker = all.filter { $0["holdfast_broker_processes"] != nil }.count
        let after = try await scrape()
        let asked = (after["holdfast_questions_to_broker_total"] ?? 0) - (before["holdfast_questions_to_broker_total"] ?? 0)
        let shared = (after["holdfast_questions_to_broker_shared_total"] ?? 0) - (before["holdfast_questions_to_broker_shared_total"] ?? 0)
        print("12 scrapes in flight together: \(Int(asked)) questions to the broker (the check's own scrape among them), \(Int(shared)) shared")
        #expect(all.count == 12 && withTheBroker == 12, "every scrape has the broker's part: \(withTheBroker)")
        // Those that came while the first was in flight shared it (on a loaded machine a
        // straggler may come after its answer and ask anew): never one question each.
        #expect(asked <= 6 && shared >= 6 && asked + shared >= 13, "asked \(asked), shared \(shared)")
        #expect(try await daemon.stop() == .exited(0))
    }
}
