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

/// The processes the broker-crash and live-upgrade tests keep streaming while they do their
/// worst: pipes both ways (resumable; stdin copied by cat), a terminal both ways (its input
/// copied by cat, echo off), a raw-mode output to a plain listener, a runc container where the
/// machine has runc, and a process another runtime started and handed over on the handoff
/// socket. Each prints an endless numbered counter, paced so the test does not starve its
/// neighbours, until it is stopped; `checkOutputs` then requires every line up to the last, once.
final class EveryKindOfStream: Sendable {
    let daemon: DaemonFixture
    /// The direct and runc processes, by the id the host created them with.
    let ids: [String]
    let pipeStream: ResumableStream<AsyncFD>
    let pipeIn: ResumableStream<AsyncFD>
    let ttyStream: ResumableStream<AsyncFD>
    let ttyIn: ResumableStream<AsyncFD>
    let handedStream: ResumableStream<AsyncFD>
    let runcStream: ResumableStream<AsyncFD>?
    let raw: RawCollector
    /// Where cat copies the pipes process's stdin and the terminal's input.
    let stdinCopy: String
    let ttyCopy: String
    let handedPID: pid_t
    let runtimeProcesses: TestProcesses
    private let outputs: [String: Task<[UInt8], Never>]

    /// An endless counter `prefix 1`, `prefix 2`... (50 lines, then 20 ms).
    static func counter(_ prefix: String) -> String {
        "i=0; while :; do i=$((i+1)); echo \(prefix) $i || exit 3; [ $((i % 50)) -ne 0 ] || sleep 0.02; done"
    }

    /// Starts them all and returns once every stream is connected.
    init(_ daemon: DaemonFixture) async throws {
        self.daemon = daemon
        let counter = Self.counter
        var outputs: [String: Task<[UInt8], Never>] = [:]
        stdinCopy = daemon.directory.file("stdin.copy")
        pipeStream = try daemon.streams.open(token: bytes("p-out"), direction: .receive)
        outputs["pipe"] = collect(pipeStream)
        pipeIn = try daemon.streams.open(token: bytes("p-in"), direction: .send)
        _ = try await daemon.bridge.create(ProcessSpec(
            id: "pipes", argv: ["sh", "-c", "exec 3<&0; cat <&3 > \(stdinCopy) & exec 3<&-; \(counter("pipe"))"],
            stdin: daemon.spec("p-in"), stdout: daemon.spec("p-out")))
        ttyCopy = daemon.directory.file("tty.copy")
        ttyStream = try daemon.streams.open(token: bytes("t-out"), direction: .receive)
        outputs["tty"] = collect(ttyStream)
        ttyIn = try daemon.streams.open(token: bytes("t-in"), direction: .send)
        _ = try await daemon.bridge.create(ProcessSpec(
            id: "tty", argv: ["sh", "-c", "stty -echo; exec 3<&0; cat <&3 > \(ttyCopy) & exec 3<&-; \(counter("tty"))"], tty: true,
            stdin: daemon.spec("t-in"), stdout: daemon.spec("t-out")))
        raw = try RawCollector(path: daemon.directory.file("raw.sock"))
        _ = try await daemon.bridge.create(ProcessSpec(
            id: "raw", argv: ["sh", "-c", counter("raw")], stdout: StreamSpec(address: "unix:" + daemon.directory.file("raw.sock"), mode: .raw)))
        if TestBundle.canRun {
            let bundle = try TestBundle(in: daemon.directory, name: "counter", args: ["sh", "-c", counter("runc")], terminal: false)
            let stream = try daemon.streams.open(token: bytes("r-out"), direction: .receive)
            runcStream = stream
            outputs["runc"] = collect(stream)
            _ = try await daemon.bridge.create(ProcessSpec(id: "runc", argv: [], stdout: daemon.spec("r-out"), runtime: .runc, bundle: bundle.path))
        } else {
            runcStream = nil
        }
        ids = ["pipes", "tty", "raw"] + (runcStream == nil ? [] : ["runc"])
        // The handed-over process: its runtime keeps managing it through the broker socket.
        runtimeProcesses = TestProcesses()
        handedStream = try daemon.streams.open(token: bytes("h-out"), direction: .receive)
        outputs["handed"] = collect(handedStream)
        let handedPipe = try PipeEnds.make()
        handedPID = try runtimeProcesses.start(["sh", "-c", counter("handed")], stdout: handedPipe.write)
        Glibc.close(handedPipe.write)
        let handedSpec = daemon.spec("h-out")
        let handOver = BrokerRequest.adopt(AdoptRequest(process: "handed", streams: [
            StreamDescription(kind: .stdout, fd: 0, address: handedSpec.address, mode: .resumable, token: handedSpec.token, secret: handedSpec.secret)
        ]))
        let runtime = try await ControlClient.connect(to: daemon.directory.file("broker.sock"))
        _ = try await runtime.request(handOver.frameType, body: handOver.body, descriptors: [handedPipe.read])
        Glibc.close(handedPipe.read)
        self.outputs = outputs

        let expected = runcStream == nil ? 6 : 7
        let raw = raw
        try await eventually("every process streaming", timeout: .seconds(60)) {
            let streams = try await daemon.brokerStreams()
            return streams.filter { $0.state == .connected }.count >= expected && raw.connectionCount >= 1
        }
    }

    /// The signal that stops a process: a container's pid 1 ignores SIGTERM (it has no
    /// handler), so SIGKILL there.
    func stopSignal(_ id: String) -> Int32 { id == "runc" ? SIGKILL : SIGTERM }

    /// Waits until cat has copied every byte typed into the terminal. Call it before `stopAll`:
    /// the terminal's input has no end to send and wait for (the pipes' stdin has), and a broker
    /// restarted just before may still be handing the last bytes in when the process is stopped
    /// (the 100-kill test's copy came out short once, the process already gone).
    func waitForTerminalCopy(of ttySent: [UInt8]) async throws {
        try await eventually("the terminal's copy complete", timeout: .seconds(30)) { (readFile(self.ttyCopy) ?? []).count >= ttySent.count }
    }

    /// Stops every process: the handed-over one by its runtime (which tells the broker running
    /// now, as it told the first), the others over the bridge.
    func stopAll() async throws {
        #expect(kill(handedPID, 0) == 0, "the handed-over process still runs")
        kill(handedPID, SIGTERM)
        #expect(try await runtimeProcesses.wait(handedPID) == .signaled(SIGTERM))
        let runtime = try await ControlClient.connect(to: daemon.directory.file("broker.sock"))
        let exited = BrokerRequest.processExited(ProcessExitedRequest(process: "handed"))
        _ = try await runtime.request(exited.frameType, body: exited.body)
        for id in ids { try await daemon.bridge.signal(id, stopSignal(id)) }
    }

    /// After `stopAll`: every resumable output — pipe, terminal, handed-over, runc — holds every
    /// line up to its last, once, in order, and reported no gap; the raw output every line once,
    /// in order, across its connections; stdin and the terminal's input what was typed, exactly.
    /// Returns a summary line for the test's report.
    func checkOutputs(stdinSent: [UInt8], ttySent: [UInt8]) async throws -> String {
        var summary: [String] = []
        let streams: [(String, ResumableStream<AsyncFD>?, String)] = [
            ("pipe", pipeStream, "\n"), ("tty", ttyStream, "\r\n"), ("handed", handedStream, "\n"), ("runc", runcStream, "\n"),
        ]
        for (name, stream, lineEnd) in streams {
            guard let stream, let output = outputs[name] else { continue }
            let data = try await withTimeout("the \(name) output", .seconds(60)) { await output.value }
            let numbers = Self.numbers(data, prefix: name)
            guard let last = numbers.last else {
                Issue.record("\(name): no output")
                continue
            }
            let all = Array((1...last).map { "\(name) \($0)\(lineEnd)" }.joined().utf8)
            #expect(stream.statistics.lost.bytes == 0, "\(name): no gap reported: \(stream.statistics.lost.summary)")
            #expect(data.count == all.count && data == all, "\(name): \(data.count) bytes of \(all.count) written, every one exact")
            summary.append("\(name) \(data.count) B, \(stream.statistics.lost.bytes) lost")
        }
        let rawNumbers = Self.numbers(raw.all, prefix: "raw")
        #expect(rawNumbers == Array(1...(rawNumbers.last ?? 0)), "raw: every line once, in order")
        summary.append("raw \(raw.all.count) B over \(raw.connectionCount) connections")
        try await eventually("cat's copy complete", timeout: .seconds(20)) { (readFile(self.stdinCopy) ?? []).count >= stdinSent.count }
        #expect(readFile(stdinCopy) == stdinSent, "stdin exact: \(stdinSent.count) bytes sent")
        try await eventually("the terminal's copy complete", timeout: .seconds(30)) { (readFile(self.ttyCopy) ?? []).count >= ttySent.count }
        #expect(readFile(ttyCopy) == ttySent, "terminal input exact: \(ttySent.count) bytes typed")
        summary.append("stdin \(stdinSent.count) B, terminal input \(ttySent.count) B")
        return summary.joined(separator: ", ")
    }

    func close() {
        raw.close()
        runtimeProcesses.killAll()
    }

    /// The numbers of the lines `prefix N` in `data`, in order.
    static func numbers(_ data: [UInt8], prefix: String) -> [Int] {
        String(decoding: data, as: UTF8.self).replacingOccurrences(of: "\r", with: "").split(separator: "\n").compactMap { line in
            line.hasPrefix(prefix + " ") ? Int(line.dropFirst(prefix.count + 1)) : nil
        }
    }

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
}
