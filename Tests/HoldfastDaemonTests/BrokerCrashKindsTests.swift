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

/// Issue 16's "done when": the broker killed with SIGKILL 100 times at random moments while
/// processes of every kind stream — pipes both ways (resumable), a terminal (resumable), a
/// raw-mode output, a runc container, and a process a runtime handed over on the handoff
/// socket — checked per kind.
@Suite("A hundred broker crashes across every kind of stream", .timeLimit(.minutes(5)))
struct BrokerCrashKindsTests {
    static let kills = 100

    /// A raw-mode listener that keeps each connection's bytes apart, in the order they were
    /// accepted (a dead broker's connection may still be read while its successor's starts).
    final class RawCollector: Sendable {
        let listener: Listener
        private let connections = NIOLockedValueBox<[NIOLockedValueBox<[UInt8]>]>([])
        private let readers = NIOLockedValueBox<[Task<Void, Never>]>([])

        init(path: String) throws {
            listener = try Listener(binding: .unix(path: path), unixMode: 0o666)
            Task { [self] in
                while let connection = try? await listener.accept() {
                    let bytes = NIOLockedValueBox<[UInt8]>([])
                    connections.withLockedValue { $0.append(bytes) }
                    let reader = Task {
                        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 8)
                        defer { buffer.deallocate() }
                        while let count = try? await connection.read(into: buffer), count > 0 {
                            bytes.withLockedValue { $0 += UnsafeRawBufferPointer(rebasing: buffer[..<count]) }
                        }
                        connection.close()
                    }
                    readers.withLockedValue { $0.append(reader) }
                }
            }
        }

        var connectionCount: Int { connections.withLockedValue { $0.count } }
        /// Every connection's bytes, in accept order.
        var all: [UInt8] { connections.withLockedValue { $0 }.flatMap { $0.withLockedValue { $0 } } }

        func close() { listener.close() }
    }

    /// The numbers of the lines `prefix N` in `text`, in order.
    static func numbers(_ data: [UInt8], prefix: String) -> [Int] {
        String(decoding: data, as: UTF8.self).replacingOccurrences(of: "\r", with: "").split(separator: "\n").compactMap { line in
            line.hasPrefix(prefix + " ") ? Int(line.dropFirst(prefix.count + 1)) : nil
        }
    }

    @Test(.enabled(if: DaemonFixture.canRun, "needs root: the daemon's broker runs as a uid of its own"))
    func aHundredBrokerKillsAcrossPipesATerminalRawModeAndRunc() async throws {
        // A broker that keeps dying comes back within 200 ms (the default back-off grows to 5 s).
        let daemon = try await DaemonFixture(brokerRestartBackoffMax: "200ms")
        defer { daemon.cleanUp() }
        let exits = ExitLog(daemon.bridge)
        defer { exits.cancel() }
        // Endless counters, paced so the test does not starve its neighbours; each is stopped
        // with SIGTERM at the end and its output checked up to its last line.
        func counter(_ prefix: String) -> String {
            "i=0; while :; do i=$((i+1)); echo \(prefix) $i || exit 3; [ $((i % 50)) -ne 0 ] || sleep 0.02; done"
        }

        // Pipes: output counter, and stdin copied by cat (a false end-of-file ends the copy early).
        let copy = daemon.directory.file("stdin.copy")
        let pipeStream = try daemon.streams.open(token: bytes("p-out"), direction: .receive)
        let pipeOut = collect(pipeStream)
        let pipeIn = try daemon.streams.open(token: bytes("p-in"), direction: .send)
        _ = try await daemon.bridge.create(ProcessSpec(
            id: "pipes", argv: ["sh", "-c", "exec 3<&0; cat <&3 > \(copy) & exec 3<&-; \(counter("pipe"))"],
            stdin: daemon.spec("p-in"), stdout: daemon.spec("p-out")))
        // A terminal.
        let ttyStream = try daemon.streams.open(token: bytes("t-out"), direction: .receive)
        let ttyOut = collect(ttyStream)
        _ = try await daemon.bridge.create(ProcessSpec(
            id: "tty", argv: ["sh", "-c", counter("tty")], tty: true, stdout: daemon.spec("t-out")))
        // Raw mode.
        let raw = try RawCollector(path: daemon.directory.file("raw.sock"))
        defer { raw.close() }
        _ = try await daemon.bridge.create(ProcessSpec(
            id: "raw", argv: ["sh", "-c", counter("raw")],
            stdout: StreamSpec(address: "unix:" + daemon.directory.file("raw.sock"), mode: .raw)))
        // runc, where the machine has it.
        let withRunc = TestBundle.canRun
        var runcOut: Task<[UInt8], Never>?
        var runcLost: (() -> GapRecord)?
        if withRunc {
            let bundle = try TestBundle(in: daemon.directory, name: "counter", args: ["sh", "-c", counter("runc")], terminal: false)
            let stream = try daemon.streams.open(token: bytes("r-out"), direction: .receive)
            runcLost = { stream.statistics.lost }
            runcOut = collect(stream)
            _ = try await daemon.bridge.create(ProcessSpec(
                id: "runc", argv: [], stdout: daemon.spec("r-out"), runtime: .runc, bundle: bundle.path))
        }
        // A process another runtime started and handed over on the handoff socket.
        let runtimeProcesses = TestProcesses()
        defer { runtimeProcesses.killAll() }
        let handedStream = try daemon.streams.open(token: bytes("h-out"), direction: .receive)
        let handedOut = collect(handedStream)
        let handedPipe = try PipeEnds.make()
        let handedPID = try runtimeProcesses.start(["sh", "-c", counter("handed")], stdout: handedPipe.write)
        close(handedPipe.write)
        let handedSpec = daemon.spec("h-out")
        let handOver = BrokerRequest.adopt(AdoptRequest(process: "handed", streams: [
            StreamDescription(kind: .stdout, fd: 0, address: handedSpec.address, mode: .resumable, token: handedSpec.token, secret: handedSpec.secret)
        ]))
        let runtime = try await ControlClient.connect(to: daemon.directory.file("broker.sock"))
        _ = try await runtime.request(handOver.frameType, body: handOver.body, descriptors: [handedPipe.read])
        close(handedPipe.read)

        let ids = ["pipes", "tty", "raw"] + (withRunc ? ["runc"] : [])
        try await eventually("every process streaming", timeout: .seconds(60)) {
            let streams = try await daemon.status().streams
            return streams.filter { $0.state == .connected }.count >= (withRunc ? 6 : 5) && raw.connectionCount >= 1
        }

        // The host types numbered lines into the pipes process's stdin throughout.
        let typist = NumberedTypist { try await pipeIn.send($0) }
        let started = ContinuousClock.now
        let brokers = try await killBroker(of: daemon, times: Self.kills, pause: 20...300)
        let killing = ContinuousClock.now - started
        try await Task.sleep(for: .milliseconds(500))
        let sent = await typist.stop()
        #expect(await pipeIn.finish() == 0, "every stdin byte acknowledged")
        // Every process is still the one we started: none died of SIGPIPE or a write error.
        let listed = try await daemon.bridge.list().processes
        for id in ids {
            #expect(listed.contains { $0.id == id && $0.state == .running }, "\(id) still running after \(Self.kills) broker kills: \(listed)")
        }
        #expect(kill(handedPID, 0) == 0, "the handed-over process still runs")
        // Its runtime ends it and tells the last broker, as it would have told the first.
        kill(handedPID, SIGTERM)
        #expect(try await runtimeProcesses.wait(handedPID) == .signaled(SIGTERM))
        let runtimeNow = try await ControlClient.connect(to: daemon.directory.file("broker.sock"))
        let handedExited = BrokerRequest.processExited(ProcessExitedRequest(process: "handed"))
        _ = try await runtimeNow.request(handedExited.frameType, body: handedExited.body)
        // A container's pid 1 ignores SIGTERM (it has no handler): SIGKILL there.
        func stopSignal(_ id: String) -> Int32 { id == "runc" ? SIGKILL : SIGTERM }
        for id in ids { try await daemon.bridge.signal(id, stopSignal(id)) }
        do {
            try await eventually("every exit", timeout: .seconds(60)) { ids.allSatisfy { exits.count($0) == 1 } }
        } catch {
            let status = try? await daemon.status()
            Issue.record("exits so far: \(exits.all); processes: \(String(describing: status?.processes)); streams: \(String(describing: status?.streams))\n\(daemon.log.suffix(6000))")
            throw error
        }
        try await Task.sleep(for: .milliseconds(300))
        #expect(exits.all.count == ids.count, "each exit once: \(exits.all)")
        for report in exits.all {
            #expect(report.signal == stopSignal(report.id), "ended by our signal, not SIGPIPE or an exit of its own: \(report)")
        }

        // Resumable outputs: every byte up to the last line, except exactly the reported gaps.
        func checkResumable(_ name: String, _ data: [UInt8], _ lost: GapRecord, lineEnd: String) -> String {
            let numbers = Self.numbers(data, prefix: name)
            guard let last = numbers.last else {
                Issue.record("\(name): no output")
                return "\(name): none"
            }
            let all = Array((1...last).map { "\(name) \($0)\(lineEnd)" }.joined().utf8)
            #expect(
                matchesAcrossGaps(data, all: all, gaps: lost.ranges),
                "\(name): \(data.count) bytes of \(all.count) written, lost \(lost.summary): every byte outside the reported gaps exact")
            #expect(lost.bytes == 0, "\(name): every read a crash interrupted was settled by its window's level: \(lost.summary)")
            return "\(name) \(data.count) bytes, \(lost.bytes) lost"
        }
        var summary: [String] = []
        summary.append(checkResumable("pipe", await pipeOut.value, pipeStream.statistics.lost, lineEnd: "\n"))
        let ttyLost = ttyStream.statistics.lost
        summary.append(checkResumable("tty", await ttyOut.value, ttyLost, lineEnd: "\r\n"))
        summary.append(checkResumable("handed", try await withTimeout("the handed-over output", .seconds(60)) { await handedOut.value }, handedStream.statistics.lost, lineEnd: "\n"))
        if let runcOut, let runcLost {
            summary.append(checkResumable("runc", await runcOut.value, runcLost(), lineEnd: "\n"))
        }
        // stdin: what the host sent, in order; the log names any bytes a crash may have
        // written twice, and nothing else may differ.
        try await eventually("cat's copy complete", timeout: .seconds(20)) { (readFile(copy) ?? []).count >= sent.count }
        let copied = readFile(copy) ?? []
        let repeats = inputRepeats(in: daemon.log, process: "pipes")
        let pipesExit = exits.all.first { $0.id == "pipes" }
        #expect((pipesExit?.inputRepeated ?? 0) == UInt64(repeats.reduce(0) { $0 + $1.count }), "the exit counts the possible repeats the log names: \(String(describing: pipesExit))")
        #expect(matches(copied, sent: sent, repeats: repeats), "stdin: \(copied.count) bytes copied, \(sent.count) sent, repeats \(repeats)")
        #expect(repeats.isEmpty && copied == sent, "stdin: every byte once")
        // Raw: the relay splices from the pipe into the socket, so a byte is either still in the
        // pipe (the next broker sends it) or in the dead broker's socket (the kernel delivers
        // it): in order, each once, none missing.
        let rawNumbers = Self.numbers(raw.all, prefix: "raw")
        let increasing = zip(rawNumbers, rawNumbers.dropFirst()).allSatisfy { $0 < $1 }
        #expect(increasing, "raw: lines in order, none twice")
        let rawMissing = (rawNumbers.last ?? 0) - rawNumbers.count
        #expect(rawMissing == 0, "raw: a pipe's bytes are spliced straight into the socket, so a crash loses none")
        summary.append("raw \(raw.all.count) bytes over \(raw.connectionCount) connections, \(rawMissing) lines missing")

        #expect(Set(brokers).count == Self.kills + 1, "a new broker each time")
        #expect(try await daemon.status().roles.first { $0.name == "broker" }?.restarts == Self.kills)
        // How often a kill landed inside a read or a write and its window settled it.
        let settled = daemon.log.components(separatedBy: "settled by its window's level").count - 1
        print(
            "\(Self.kills) broker kills in \(killing): " + summary.joined(separator: "; ")
                + "; stdin \(sent.count) bytes, \(repeats.count) possible repeats; \(settled) interrupted takes settled by their windows")
        #expect(try await daemon.stop() == .exited(0))
    }
}
